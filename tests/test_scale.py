"""Scale-out on 8 simulated CPU devices: data parallel, FSDP, and two processes on localhost."""

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

MICRO = MICRO_OVERRIDES + ["model.vocab_size=48", "train.batch_size=8",
                           "train.warmup_steps=1", "train.lr=1e-2"]


def five_step_losses(data: int, fsdp: int):
    cfg = config_lib.load_config("tiny", overrides=MICRO + [f"mesh.data={data}",
                                                            f"mesh.fsdp={fsdp}"])
    mesh = train_lib.make_mesh(cfg.mesh)
    state, shardings = train_lib.create_sharded_state(cfg, mesh)
    step = train_lib.make_train_step(cfg, mesh, shardings)
    hyper = train_lib.train_hyperparams(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, 48, 5000)
    losses = []
    for i in range(5):
        x, y = data_lib.get_batch(tokens, seed=0, step=i, batch_size=8, seq_len=32)
        state, metrics = step(state, hyper, *train_lib.put_batch(mesh, x, y))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def one_device():
    return five_step_losses(1, 1)


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4), (1, 8)])
def test_sharded_runs_match_one_device(one_device, data, fsdp):
    losses, state = five_step_losses(data, fsdp)
    print(f"mesh data={data} fsdp={fsdp}: losses {losses}")
    np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)
    qkv = state["params"]["blocks"]["qkv"]["kernel"]  # (L=2, D=32, 3D=96)
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")["blocks"]["qkv"]["kernel"]
    expected = P() if fsdp == 1 else P(None, None, "fsdp")  # largest dim that fsdp divides
    assert qkv.sharding.spec == expected and mu.sharding.spec == expected
    held = state_bytes_per_device(state)
    total = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    assert held["params"] < total / fsdp * 1.2 if fsdp > 1 else held["params"] == total
    cfg = config_lib.load_config("tiny", overrides=MICRO)
    assert planned_bytes_per_device(cfg, fsdp) == held  # the no-device estimate


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
