"""Training: MultiSteps accumulation, learning, exact resume, device-count invariance, the CLI."""

import json
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import train_lib, trainer
from chatgot_jax.optim import decay_mask, lr_schedule
from conftest import MICRO_OVERRIDES, micro_config

RUN_OVERRIDES = MICRO_OVERRIDES + [
    "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=2", "train.eval_every=3",
    "train.save_every=3", "train.log_every=1", "train.eval_windows=8", "train.sample_tokens=8",
    "train.lr=1e-2", "mesh.data=1"]


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def read_events(run_dir) -> list[list[Event]]:
    """Every TensorBoard event file in run_dir (oldest first), parsed from its TFRecord framing."""
    files = []
    for path in sorted(pathlib.Path(run_dir).glob("events.out.tfevents.*")):
        data, events, pos = path.read_bytes(), [], 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4  # length, its crc, the record, its crc
        files.append(events)
    return files


def scalars(events, tag) -> dict[int, float]:
    return {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == tag}


# Dropout off and fp32, so that a big batch and its micro-batches compute the same sums.
EXACT = ["model.dropout=0.0", "mesh.data=1"]


def micro_steps(cfg, tokens_Bx, chunks):
    """Feeds tokens_Bx (rows of T + 1 tokens) to a fresh state's train step as `chunks`
    equal micro-batches -> (initial params, state, [metrics of each micro-step])."""
    mesh = train_lib.make_mesh(cfg.mesh)
    state, shardings = train_lib.create_sharded_state(cfg, mesh)
    step = train_lib.make_train_step(cfg, mesh, shardings)
    hyper = train_lib.train_hyperparams(cfg, mesh)
    init = jax.device_get(state["params"])  # the state is donated to the step
    logged = []
    for part in np.split(tokens_Bx, chunks):
        state, metrics = step(state, hyper, *train_lib.put_batch(mesh, part[:, :-1], part[:, 1:]))
        logged.append(jax.device_get(metrics))
    return init, state, logged


def test_accumulated_gradient_is_the_big_batch_gradient():
    """3 of grad_accum 4 micro-batches: MultiSteps holds the mean of their gradients, which
    is jax.grad of the mean loss over the 24 rows at once (the loss is a mean over tokens,
    so equal-sized chunks average to the big batch's mean), and the params have not moved."""
    cfg = micro_config("train.batch_size=8", "train.grad_accum=4", "train.warmup_steps=0",
                       *EXACT)
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (24, 33), np.int32)
    init, state, _ = micro_steps(cfg, tokens, 3)
    opt_state = jax.device_get(state["opt_state"])
    assert (int(opt_state.mini_step), int(opt_state.gradient_step)) == (3, 0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), init)
    grad_fn = jax.jit(jax.grad(train_lib.loss_fn), static_argnums=1)
    expected = jax.device_get(grad_fn(init, cfg, tokens[:, :-1], tokens[:, 1:]))
    # Only float32 rounding differs (another summation order). Measured: max |difference|
    # 6e-8, and 2.2e-8 beyond rtol 1e-5, for gradients up to 0.06 (median 6e-4); atol 2e-7
    # is 9x that and 3e-4 of the median entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-7),
                 opt_state.acc_grads, expected)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(expected)) > 1e-2


def test_multisteps_equals_one_big_batch():
    """3 optimizer steps with warmup 2: grad_accum 4 x batch 8 == batch 32. The schedule
    counts optimizer steps, so both runs log the same lr for each optimizer step
    (0, lr / 2, lr), which the accumulating run logs at each of its 4 micro-steps."""
    common = ["train.warmup_steps=2", "train.max_steps=3", "train.lr=1e-2", *EXACT]
    big = micro_config("train.batch_size=32", *common)
    accum = micro_config("train.batch_size=8", "train.grad_accum=4", *common)
    tokens = np.random.default_rng(0).integers(0, big.model.vocab_size, (96, 33), np.int32)
    init, big_state, big_logs = micro_steps(big, tokens, 3)
    _, accum_state, accum_logs = micro_steps(accum, tokens, 12)
    assert int(big_state["opt_state"].gradient_step) == 3
    assert int(accum_state["opt_state"].gradient_step) == 3
    big_lr = [float(m["lr"]) for m in big_logs]
    np.testing.assert_allclose(big_lr, [0.0, 5e-3, 1e-2], rtol=1e-6)
    assert [float(m["lr"]) for m in accum_logs] == list(np.repeat(big_lr, 4))
    assert [int(m["opt_step"]) for m in accum_logs] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    params = jax.device_get((big_state["params"], accum_state["params"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params[0], init)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the two updates with lr > 0 happened
    # Measured: max |difference| 1.2e-6 (params up to 1.0; the updates moved them by up to
    # 1.5e-2): Adam divides by sqrt(v), which magnifies the rounding of small gradients.
    # atol 1e-5 is 8x that and 1e-3 of one update at lr 1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *params)


@pytest.mark.parametrize("warmup, max_steps", [(50, 500), (0, 100), (10, 7), (3, 3)])
def test_schedule_is_optax_warmup_cosine_bit_for_bit(warmup, max_steps):
    """lr_at takes its hyper-parameters as (traceable) arrays, and gives optax's values."""
    cfg = micro_config(f"train.warmup_steps={warmup}", f"train.max_steps={max_steps}").train
    w = min(warmup, max_steps)
    ref = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, w, max(max_steps, w + 1),
                                             cfg.lr * cfg.min_lr_ratio)
    steps = np.arange(max_steps + 5)
    np.testing.assert_array_equal(jax.vmap(lr_schedule(cfg))(steps), jax.vmap(ref)(steps))


def test_schedule_and_decay_mask():
    cfg = micro_config("train.warmup_steps=10", "train.max_steps=100", "train.lr=1e-3")
    sched = lr_schedule(cfg.train)
    assert float(sched(0)) == 0.0 and np.isclose(float(sched(10)), 1e-3)
    assert np.isclose(float(sched(100)), 1e-4)  # min_lr_ratio 0.1
    mask = decay_mask(train_lib.init_state(cfg)["params"])
    assert mask["blocks"]["qkv"]["kernel"] and not mask["blocks"]["qkv"]["bias"]
    assert not mask["blocks"]["ln1"]["scale"] and mask["tok_emb"]["embedding"]


@pytest.fixture(scope="module")
def baseline_run(corpus, tmp_path_factory):
    """An uninterrupted 6-step run on one device."""
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    cfg = config_lib.load_config("tiny", overrides=RUN_OVERRIDES)
    summary = trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    return run_dir, summary


def test_training_reduces_loss(baseline_run):
    run_dir, summary = baseline_run
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    assert losses[6] < losses[1] - 0.2
    vals = [json.loads(line)["val_bpc"] for line in open(run_dir / "metrics.jsonl")
            if "val_bpc" in line]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert ckpt.existing_steps(run_dir) == [3, 6]
    (events,) = read_events(run_dir)  # TensorBoard sees what metrics.jsonl says
    np.testing.assert_allclose(list(scalars(events, "train/loss").values()),
                               [losses[s] for s in range(1, 7)], rtol=1e-6)
    np.testing.assert_allclose(list(scalars(events, "val/bpc").values()), vals, rtol=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert scalars(events, tag), tag
    samples = [e.step for e in events for v in e.summary.value if v.tag.startswith("sample")]
    assert samples == [3, 6]


def interrupted_then_resumed(cfg, corpus, run_dir, monkeypatch):
    """Trains run_dir with a Ctrl-C (KeyboardInterrupt) right after step 3's checkpoint is
    written, then runs the same config again, which resumes from step 3."""
    real_save = ckpt.save

    def save_then_interrupt(manager, state, cfg, tokenizer, opt_step, val_loss=None, **kw):
        real_save(manager, state, cfg, tokenizer, opt_step, val_loss, **kw)
        if opt_step == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", save_then_interrupt)
        first = trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    assert first["interrupted"] and first["steps"] == 3
    assert ckpt.existing_steps(run_dir) == [3]
    second = trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    assert second["steps"] == 6 and not second["interrupted"]


def test_resume_is_exact(baseline_run, corpus, tmp_path, monkeypatch):
    """Interrupt after step 3's checkpoint, resume: steps 4..6 equal the uninterrupted run's."""
    run_dir = tmp_path / "interrupted"
    cfg = config_lib.load_config("tiny", overrides=RUN_OVERRIDES)
    interrupted_then_resumed(cfg, corpus, run_dir, monkeypatch)
    resumed, expected = train_losses(run_dir), train_losses(baseline_run[0])
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    first_run, second_run = read_events(run_dir)  # the resumed run purges TensorBoard after step 3
    assert any(e.step == 3 and e.session_log.status == SessionLog.START for e in second_run)
    assert sorted(scalars(second_run, "train/loss")) == [4, 5, 6]


def final_state(run_dir):
    """(step, the whole train state) of run_dir's newest checkpoint, on the host."""
    _, cfg, _, step = ckpt.load_for_inference(str(run_dir))  # the config the run saved
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:
        return step, jax.device_get(ckpt.restore_state(manager, step,
                                                       train_lib.abstract_state(cfg)))
    finally:
        manager.close()


# Resume off the default path: the micro-step inside an optimizer step (accumulation),
# a batch split over 8 devices, and params and optimizer state sharded over 4 of them.
RESUME_CASES = {"grad_accum2": ["train.grad_accum=2"], "data8": ["mesh.data=8"],
                "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4"]}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_exact_off_the_default_path(case, corpus, tmp_path, monkeypatch):
    """Interrupted after step 3's checkpoint and resumed == uninterrupted, bit for bit:
    the losses of steps 4..6 and the final params, optimizer state and dropout rng."""
    cfg = config_lib.load_config("tiny", overrides=RUN_OVERRIDES + [
        "train.sample_tokens=0", *RESUME_CASES[case]])  # no sampler to compile
    trainer.train_and_evaluate(cfg, str(corpus), str(tmp_path / "whole"))
    interrupted_then_resumed(cfg, corpus, tmp_path / "resumed", monkeypatch)
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == whole  # steps 1..3 before the interrupt, 4..6 after the resume
    step, expected = final_state(tmp_path / "whole")
    got_step, got = final_state(tmp_path / "resumed")
    assert step == got_step == 6
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    if cfg.train.grad_accum > 1:  # the lr logged at step s is the schedule's at optimizer
        lr = [json.loads(line)["lr"] for line in open(tmp_path / "resumed" / "metrics.jsonl")
              if '"lr"' in line]  # step s - 1 (the update of step s), not at a micro-step
        np.testing.assert_allclose(lr, [lr_schedule(cfg.train)(s) for s in range(6)],
                                   rtol=1e-6)


def test_four_devices_match_one(baseline_run, corpus, tmp_path):
    cfg = config_lib.load_config("tiny", overrides=RUN_OVERRIDES + ["mesh.data=4"])
    trainer.train_and_evaluate(cfg, str(corpus), str(tmp_path / "four"))
    four, one = train_losses(tmp_path / "four"), train_losses(baseline_run[0])
    np.testing.assert_allclose([four[s] for s in one], list(one.values()), rtol=2e-5)


def test_cli_default_corpus_two_steps_restores(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "train.py", "--variant", "tiny", "--max-steps", "2", "--out", str(out),
           *MICRO_OVERRIDES, "train.batch_size=8", "train.eval_windows=8",
           "train.sample_tokens=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "next: chatgot-sample --checkpoint " in proc.stdout
    params, cfg, tokenizer, step = ckpt.load_for_inference(str(out))
    assert step == 2 and cfg.model.d_model == 32
    assert tokenizer.vocab_size == cfg.model.vocab_size > 60  # Shakespeare's characters + 1
    assert params["blocks"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert np.isfinite(optax.tree.norm(params))
