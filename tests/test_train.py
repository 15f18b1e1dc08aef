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


def test_multisteps_equals_one_big_batch():
    """4 micro-batches of 8 with grad_accum 4 == one batch of 32 (dropout off, fp32)."""
    common = ["model.dropout=0.0", "train.warmup_steps=0", "mesh.data=1"]
    big = micro_config("train.batch_size=32", *common)
    accum = micro_config("train.batch_size=8", "train.grad_accum=4", *common)
    tokens = np.random.default_rng(0).integers(0, 96, (32, 33)).astype(np.int32)
    params = {}
    for cfg, chunks in ((big, 1), (accum, 4)):
        mesh = train_lib.make_mesh(cfg.mesh)
        state, shardings = train_lib.create_sharded_state(cfg, mesh)
        step = train_lib.make_train_step(cfg, mesh, shardings)
        hyper = train_lib.train_hyperparams(cfg, mesh)
        init = jax.device_get(state["params"])
        for part in np.split(tokens, chunks):
            state, metrics = step(state, hyper,
                                  *train_lib.put_batch(mesh, part[:, :-1], part[:, 1:]))
        assert int(state["opt_state"].gradient_step) == 1
        params[chunks] = state["params"]
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params[1], init)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the optimizer step really happened
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params[1], params[4])


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


def test_resume_is_exact(baseline_run, corpus, tmp_path, monkeypatch):
    """Interrupt after step 3's checkpoint, resume: steps 4..6 equal the uninterrupted run's."""
    run_dir = tmp_path / "interrupted"
    cfg = config_lib.load_config("tiny", overrides=RUN_OVERRIDES)
    real_save = ckpt.save

    def save_then_interrupt(manager, state, cfg, tokenizer, opt_step, val_loss=None, **kw):
        real_save(manager, state, cfg, tokenizer, opt_step, val_loss, **kw)
        if opt_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save", save_then_interrupt)
    first = trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    assert first["interrupted"] and first["steps"] == 3
    monkeypatch.setattr(ckpt, "save", real_save)
    trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    resumed, expected = train_losses(run_dir), train_losses(baseline_run[0])
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    first_run, second_run = read_events(run_dir)  # the resumed run purges TensorBoard after step 3
    assert any(e.step == 3 and e.session_log.status == SessionLog.START for e in second_run)
    assert sorted(scalars(second_run, "train/loss")) == [4, 5, 6]


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
    assert "sample.py --checkpoint" in proc.stdout
    params, cfg, tokenizer, step = ckpt.load_for_inference(str(out))
    assert step == 2 and cfg.model.d_model == 32
    assert tokenizer.vocab_size == cfg.model.vocab_size > 60  # Shakespeare's characters + 1
    assert params["blocks"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert np.isfinite(optax.tree.norm(params))
