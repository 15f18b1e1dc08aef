"""The training loop's named pieces, driven directly: MetricsBuffer, StopOnSigint, step_between_updates."""

import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatgot_jax import train_lib, trainer
from chatgot_jax.errors import Diverged
from chatgot_jax.metrics import MetricsBuffer
from conftest import micro_config


def metrics(loss, grad_norm=1.0, lr=1e-3, opt_step=1):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm),
            "lr": jnp.float32(lr), "opt_step": jnp.int32(opt_step)}


def test_metrics_buffer_averages_and_times_all_but_the_first_step():
    buffer = MetricsBuffer(tokens_per_micro=100)
    assert buffer.flush() == []  # nothing queued
    first = buffer.add(metrics(4.0, grad_norm=2.0))
    assert first is not None and first >= 0  # the run's first step waits and is timed alone
    assert buffer.add(metrics(2.0, grad_norm=4.0, lr=5e-4)) is None
    [record] = buffer.flush()
    assert record["loss"] == 3.0 and record["grad_norm"] == 3.0
    assert math.isclose(record["lr"], 5e-4, rel_tol=1e-6)  # the last step's lr
    assert record["tokens_per_s"] > 0  # one timed step of 100 tokens
    assert buffer.flush() == []
    buffer.add(metrics(1.0))
    buffer.drop()
    assert buffer.flush() == []


def test_lagged_flush_fetches_all_but_the_newest_interval():
    buffer = MetricsBuffer(tokens_per_micro=10)
    buffer.add(metrics(4.0, opt_step=1))  # the run's first step, timed alone
    buffer.add(metrics(2.0, opt_step=2))
    assert buffer.flush(lagged=True) == []  # the only closed interval is the newest
    buffer.add(metrics(6.0, opt_step=3))
    [record] = buffer.flush(lagged=True)  # closes step 3's interval, fetches steps 1-2
    assert record["step"] == 2 and record["loss"] == 3.0
    assert record["tokens_per_s"] > 0  # step 2, over the host time of its interval
    buffer.add(metrics(8.0, opt_step=4))
    buffer.add(metrics(10.0, opt_step=5))
    # A full flush fetches the rest, one record per interval: step 3, then steps 4-5.
    assert [(r["step"], r["loss"]) for r in buffer.flush()] == [(3, 6.0), (5, 9.0)]
    assert buffer.flush() == [] and buffer.flush(lagged=True) == []


def test_a_non_finite_step_in_the_newest_interval_waits_for_the_full_flush():
    buffer = MetricsBuffer(tokens_per_micro=1)
    buffer.add(metrics(2.0, opt_step=1))
    buffer.add(metrics(float("nan"), opt_step=2))
    assert buffer.flush(lagged=True) == []  # not fetched yet, so not judged yet
    buffer.add(metrics(1.0, opt_step=3))
    with pytest.raises(Diverged, match="the loss became nan at step 2"):
        buffer.flush(lagged=True)  # one interval later
    buffer.drop()
    buffer.add(metrics(float("nan"), opt_step=4))
    with pytest.raises(Diverged, match="at step 4"):
        buffer.flush()  # what the loop calls before it evaluates or saves


@pytest.mark.parametrize("loss, grad_norm, what", [
    (float("nan"), 1.0, "the loss became nan at step 7"),
    (1.0, float("inf"), "the gradient norm became inf at step 7"),
])
def test_metrics_buffer_stops_on_a_non_finite_step(loss, grad_norm, what):
    buffer = MetricsBuffer(tokens_per_micro=1)
    buffer.add(metrics(2.0, opt_step=6))
    buffer.add(metrics(loss, grad_norm=grad_norm, opt_step=7))
    with pytest.raises(Diverged, match=what):
        buffer.flush()


def test_stop_on_sigint_asks_once_then_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with trainer.StopOnSigint() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the first Ctrl-C only asks the loop to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second one stops at once
    assert signal.getsignal(signal.SIGINT) is before


def test_step_between_updates():
    cfg = micro_config("train.grad_accum=2", "mesh.data=1", "train.warmup_steps=0")
    mesh = train_lib.make_mesh(cfg.mesh)
    state, shardings = train_lib.create_sharded_state(cfg, mesh)
    make_step = train_lib.make_train_step(cfg, mesh, shardings)
    hyper = train_lib.train_hyperparams(cfg, mesh)

    def step(state, x, y):
        return make_step(state, hyper, x, y)

    tokens = np.random.default_rng(0).integers(0, 40, (8, 33)).astype(np.int32)
    batch = train_lib.put_batch(mesh, tokens[:, :-1], tokens[:, 1:])
    assert trainer.step_between_updates(state) == 0
    state, _ = step(state, *batch)
    assert trainer.step_between_updates(state) is None  # half-way through accumulation
    assert int(train_lib.micro_step(state["opt_state"], 2)) == 1
    donated = state
    state, _ = step(state, *batch)
    assert trainer.step_between_updates(donated) is None  # donated to the step
    assert trainer.step_between_updates(state) == 1 == train_lib.optimizer_step(state)
    assert int(train_lib.micro_step(state["opt_state"], 2)) == 2


def test_sample_prompt_finds_a_speaker():
    assert trainer.sample_prompt("x\nsome prose\nHAMLET: To be\n") == "HAMLET: "
    assert trainer.sample_prompt("no speakers here\nat all\n") == "no speakers here"


def test_logger_reports_a_dead_writer_thread_in_one_line(tmp_path):
    """TensorBoard writes events from its own thread: an I/O error there ends the run
    at the next log line with one RunError, not a thread's traceback."""
    import threading

    from chatgot_jax.errors import RunError
    from chatgot_jax.metrics import Logger

    log = Logger(tmp_path, enabled=True)
    try:
        log.write({"step": 1, "loss": 2.0})

        def fail():
            raise OSError(28, "No space left on device")

        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
        with pytest.raises(RunError, match="TensorBoard events in .*: No space left on device"):
            log.write({"step": 2, "loss": 1.0})
    finally:
        log.close()
    assert threading.excepthook is not log._thread_failed


def test_logger_without_tensorboardx_still_writes_metrics(tmp_path, monkeypatch, capsys):
    """A machine without tensorboardX (the GPU image this project is measured on) trains
    on: metrics.jsonl is written, TensorBoard events are not."""
    import builtins
    import json

    from chatgot_jax.metrics import Logger

    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    log = Logger(tmp_path, enabled=True, hparams={"model.d_model": 32})
    try:
        log.write({"step": 1, "loss": 2.0})
        log.text("sample", "text", 1)
    finally:
        log.close()
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [2.0]
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert "tensorboardX is not installed" in capsys.readouterr().out


def test_loop_cost_runs_train_py_loop_with_a_step_that_does_no_work(tmp_path, corpus):
    """tools/loop_cost: the real loop (accumulation, logging, evaluation, saves) around an
    idle step: optimizer steps are counted as train.py counts them, the params never move."""
    import json

    from chatgot_jax import checkpoint as ckpt
    from chatgot_jax.tools import loop_cost
    from conftest import MICRO_OVERRIDES

    run_dir = tmp_path / "idle"
    summary = loop_cost.main(["--data", str(corpus), "--out", str(run_dir), "--max-steps", "30",
                              "--eval-every", "30", "--save-every", "30", *MICRO_OVERRIDES,
                              "train.batch_size=8", "train.grad_accum=2", "mesh.data=1",
                              "train.sample_tokens=0", "train.eval_windows=8"])
    assert summary["steps"] == 30
    assert train_lib.make_resident_train_step.__name__ == "make_resident_train_step"  # restored
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logged if "loss" in r] == [(10, 1.0), (20, 1.0),
                                                                       (30, 1.0)]
    assert ckpt.existing_steps(run_dir) == [30]
    params, cfg, _, step = ckpt.load_for_inference(str(run_dir))
    assert step == 30
    init = train_lib.init_state(cfg)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, init)
