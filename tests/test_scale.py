"""Scale-out on 8 simulated CPU devices: data parallel, FSDP, and two processes on localhost."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import data as data_lib
from chatgot_jax import train_lib
from chatgot_jax.tools.params import planned_bytes_per_device, state_bytes_per_device
from conftest import MICRO_OVERRIDES, ROOT

# Warmup 0: every one of the steps is a real update at lr 1e-2 (with warmup 1 the first
# update is zero), so the final params show what the updates did.
MICRO = MICRO_OVERRIDES + ["model.vocab_size=48", "train.batch_size=8",
                           "train.warmup_steps=0", "train.lr=1e-2"]


def micro_cfg(data: int, fsdp: int, *extra: str):
    return config_lib.load_config("tiny", overrides=MICRO + [f"mesh.data={data}",
                                                            f"mesh.fsdp={fsdp}", *extra])


def five_steps(data: int, fsdp: int, *extra: str):
    """5 optimizer steps on a (data, fsdp) mesh, the same batches whatever the mesh
    -> (loss of each micro-step, initial params on the host, final state)."""
    cfg = micro_cfg(data, fsdp, *extra)
    mesh = train_lib.make_mesh(cfg.mesh)
    state, shardings = train_lib.create_sharded_state(cfg, mesh)
    init = jax.device_get(state["params"])  # the state is donated to the step
    step = train_lib.make_train_step(cfg, mesh, shardings)
    hyper = train_lib.train_hyperparams(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, 48, 5000)
    losses = []
    for i in range(5 * cfg.train.grad_accum):
        x, y = data_lib.get_batch(tokens, seed=0, step=i, batch_size=8, seq_len=32)
        state, metrics = step(state, hyper, *train_lib.put_batch(mesh, x, y))
        losses.append(float(metrics["loss"]))
    assert train_lib.optimizer_step(state) == 5
    return losses, init, state


@pytest.fixture(scope="module")
def trained():
    """five_steps, each (mesh, config) trained once per module."""
    return functools.cache(five_steps)


@pytest.fixture(scope="module")
def one_device(trained):
    return trained(1, 1)


def updates(init, state):
    """The change of every param over the run, as one flat host vector."""
    final = jax.device_get(state["params"])
    return np.concatenate([(b - a).ravel() for a, b in zip(jax.tree.leaves(init),
                                                            jax.tree.leaves(final))])


def assert_params_close_fp32(state, expected_state):
    # Measured after 5 updates at lr 1e-2 (params moved up to 5e-2): max |difference|
    # 2.0e-5 (data 8, fsdp 8), 2.8e-5 (fsdp 4 x data 2), 1.6e-5 (the same with grad_accum
    # 2). The gradients differ in float32 rounding only (other reduction orders), which
    # Adam's division by sqrt(v) magnifies for small gradients; atol 1e-4 is 3.5x the
    # largest and 1% of one update at lr 1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 jax.device_get(state["params"]), jax.device_get(expected_state["params"]))


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4), (1, 8)])
def test_sharded_runs_match_one_device(trained, one_device, data, fsdp):
    losses, init, state = trained(data, fsdp)
    print(f"mesh data={data} fsdp={fsdp}: losses {losses}")
    np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)  # measured: 4.3e-7
    assert np.abs(updates(init, state)).max() > 1e-2  # the params really moved
    assert_params_close_fp32(state, one_device[2])
    qkv = state["params"]["blocks"]["qkv"]["kernel"]  # (L=2, D=32, 3D=96)
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")["blocks"]["qkv"]["kernel"]
    expected = P() if fsdp == 1 else P(None, None, "fsdp")  # largest dim that fsdp divides
    assert qkv.sharding.spec == expected and mu.sharding.spec == expected
    held = state_bytes_per_device(state)
    total = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    assert held["params"] < total / fsdp * 1.2 if fsdp > 1 else held["params"] == total
    cfg = config_lib.load_config("tiny", overrides=MICRO)
    assert planned_bytes_per_device(cfg, fsdp) == held  # the no-device estimate


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_with_gradient_accumulation_matches_one_device(trained, dtype):
    """FSDP 4 x data 2 with grad_accum 2 (and bfloat16 compute) == one device, same config."""
    extra = ("train.grad_accum=2", f"model.compute_dtype={dtype}")
    one_losses, one_init, one = trained(1, 1, *extra)
    losses, init, fsdp = trained(2, 4, *extra)
    assert fsdp["params"]["blocks"]["qkv"]["kernel"].sharding.spec == P(None, None, "fsdp")
    if dtype == "float32":
        np.testing.assert_allclose(losses, one_losses, rtol=2e-5)  # measured: 3.1e-7
        assert_params_close_fp32(fsdp, one)
        return
    # bfloat16 rounds every matmul's inputs to 8 significant bits, and the two meshes sum
    # in other orders, so the roundings differ. Measured: losses within 1.5e-4 relative
    # (rtol 1e-3 is 6x that, a quarter of bf16's 2^-8); the params' change over the run
    # differs by 6.0% in norm (fsdp 4 x data 2; 5.7% fsdp 4, 6.1% data 8), about what
    # bf16 vs float32 differ by on one device (6.7%). Elementwise bounds would be
    # meaningless: Adam turns a small gradient's rounding into a whole update of either
    # sign. A gradient from only the local rows (no reduction over data) differs by 98%;
    # 15% leaves 2.5x headroom.
    np.testing.assert_allclose(losses, one_losses, rtol=1e-3)
    ours, theirs = updates(init, fsdp), updates(one_init, one)
    assert np.linalg.norm(theirs) > 0.1  # five real updates
    assert np.linalg.norm(ours - theirs) < 0.15 * np.linalg.norm(theirs)


@pytest.mark.parametrize("source, target", [((2, 4), (1, 1)), ((1, 1), (2, 4)),
                                            ((2, 4), (1, 8))],
                         ids=["fsdp4-to-one", "one-to-fsdp4", "fsdp4-to-fsdp8"])
def test_checkpoint_restores_into_another_mesh(trained, tmp_path, source, target):
    """A checkpoint saved from one mesh resumes on another (checkpoint.restore_common into
    train_lib.sharded_abstract_state, the resume path): the same values, laid out as the
    target mesh shards them."""
    state = trained(*source)[2]
    tokenizer = data_lib.CharTokenizer.from_text("SANSA: the lone wolf dies")
    manager = ckpt.make_manager(tmp_path / "run")
    ckpt.save(manager, state, micro_cfg(*source), tokenizer, opt_step=5)
    cfg = micro_cfg(*target)
    mesh = train_lib.make_mesh(cfg.mesh)
    step, [restored] = ckpt.restore_common([manager], train_lib.sharded_abstract_state(cfg, mesh))
    manager.close()
    assert step == 5
    shardings = train_lib.state_shardings(mesh, train_lib.abstract_state(cfg))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 jax.device_get(state))
    assert train_lib.optimizer_step(restored) == 5
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    assert shardings["params"]["blocks"]["qkv"]["kernel"].mesh.shape == dict(
        data=target[0], fsdp=target[1])
    qkv = restored["params"]["blocks"]["qkv"]["kernel"]  # (2, 32, 96): 96 split over fsdp
    assert {s.data.shape for s in qkv.addressable_shards} == {(2, 32, 96 // target[1])}
    assert len(qkv.sharding.device_set) == target[0] * target[1]


def test_batch_must_divide_devices():
    cfg = config_lib.load_config("tiny", overrides=MICRO + ["train.batch_size=6"])
    with pytest.raises(config_lib.UserError, match="divisible by the number of devices"):
        train_lib.check_batch(cfg, train_lib.make_mesh(cfg.mesh))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(corpus, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus),
            "--out", str(out), "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
            *MICRO_OVERRIDES, "train.batch_size=8", "train.log_every=1", "train.eval_windows=8",
            "train.sample_tokens=8", *extra]


def _env(devices: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")
            if '"loss"' in line]


def test_two_processes_match_one(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"SANSA: the lone wolf dies number {i}" for i in range(200)))
    single = subprocess.run(_train_cmd(corpus, tmp_path / "single"), env=_env(4),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]

    port = _free_port()
    procs = [subprocess.Popen(
        _train_cmd(corpus, tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(i)),
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "4 device(s)" in outs[0][0] + outs[0][1] and "done: 4 steps" in outs[0][0]
    # Only process 0 prints. (Gloo logs "[Gloo] Rank R is connected to N peer ranks"
    # on every rank from two threads whose writes interleave mid-line, so process 1's
    # stdout is checked for the trainer's own lines, not for emptiness.)
    for ours in ("model:", "val loss", "sample", "done:", "checkpoints:", "next:"):
        assert ours not in outs[1][0], outs[1][0][-500:]
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                               rtol=2e-5)
    params, cfg, _, step = ckpt.load_for_inference(str(tmp_path / "multi"))
    assert step == 4 and params["blocks"]["qkv"]["kernel"].shape == (2, 32, 96)
