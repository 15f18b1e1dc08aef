"""The training loop's named pieces, driven directly: MetricsBuffer, Logger, StopOnSigint,
step_between_updates, sample_prompt."""

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatgot_jax import runs, train_lib, trainer
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
    assert record["loss"].tolist() == [3.0] and record["grad_norm"].tolist() == [3.0]
    assert math.isclose(record["lr"][0], 5e-4, rel_tol=1e-6)  # the last step's lr
    assert record["finite"].tolist() == [True] and record["problems"] == {}
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
    assert record["step"] == 2 and record["loss"].tolist() == [3.0]
    assert record["tokens_per_s"] > 0  # step 2, over the host time of its interval
    buffer.add(metrics(8.0, opt_step=4))
    buffer.add(metrics(10.0, opt_step=5))
    # A full flush fetches the rest, one record per interval: step 3, then steps 4-5.
    assert [(r["step"], *r["loss"]) for r in buffer.flush()] == [(3, 6.0), (5, 9.0)]
    assert buffer.flush() == [] and buffer.flush(lagged=True) == []


def test_tokens_per_s_counts_the_devices_time_not_the_dispatch():
    """Steps are dispatched faster than the device runs them: an interval's time runs
    until its last step is done, so tokens/s is never above what the device can do.
    (Timed by the host between closes, 9 queued steps took ~0 s: a rate many times
    too high.)"""
    @jax.jit
    def step(x):  # -> (the next state, this step's metrics), as the train step gives
        for _ in range(4):
            x = jnp.tanh(x @ x)
        return x, {"loss": x[0, 0], "grad_norm": x[0, 1], "lr": x[0, 2],
                   "opt_step": jnp.int32(1)}

    x, m = step(jnp.full((512, 512), 1.0 / 512, jnp.float32))
    times = []
    for _ in range(3):  # what the device needs for 9 steps, at its least disturbed
        t = time.perf_counter()
        for _ in range(9):
            x, m = step(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t)
    nine_steps_s = min(times)
    buffer = MetricsBuffer(tokens_per_micro=1000)
    buffer.add(m)  # the run's first step, timed alone
    for _ in range(9):
        x, m = step(x)
        buffer.add(m)
    [record] = buffer.flush()
    assert record["tokens_per_s"] <= 9 * 1000 / (0.5 * nine_steps_s)


def test_a_non_finite_step_in_the_newest_interval_waits_for_the_full_flush():
    buffer = MetricsBuffer(tokens_per_micro=1)
    buffer.add(metrics(2.0, opt_step=1))
    buffer.add(metrics(float("nan"), opt_step=2))
    assert buffer.flush(lagged=True) == []  # not fetched yet, so not judged yet
    buffer.add(metrics(1.0, opt_step=3))
    [record] = buffer.flush(lagged=True)  # one interval later
    assert record["finite"].tolist() == [False]
    assert record["problems"] == {0: "the loss became nan at step 2"}
    buffer.drop()
    buffer.add(metrics(float("nan"), opt_step=4))
    [record] = buffer.flush()  # what the loop calls before it evaluates or saves
    assert record["problems"] == {0: "the loss became nan at step 4"}


@pytest.mark.parametrize("loss, grad_norm, what", [
    (float("nan"), 1.0, "the loss became nan at step 7"),
    (1.0, float("inf"), "the gradient norm became inf at step 7"),
])
def test_metrics_buffer_names_the_first_non_finite_step(loss, grad_norm, what):
    buffer = MetricsBuffer(tokens_per_micro=1)
    buffer.add(metrics(2.0, opt_step=6))
    buffer.add(metrics(loss, grad_norm=grad_norm, opt_step=7))
    buffer.add(metrics(float("nan"), opt_step=8))
    [record] = buffer.flush()
    assert record["problems"] == {0: what} and record["finite"].tolist() == [False]


def test_metrics_buffer_judges_each_run_of_a_group():
    """A group's metrics carry a run axis: each run is averaged and judged on its own."""
    def group(loss, grad_norm, step):
        return {"loss": jnp.array(loss, jnp.float32), "grad_norm": jnp.array(grad_norm,
                                                                              jnp.float32),
                "lr": jnp.array([1e-3, 2e-3, 3e-3], jnp.float32),
                "opt_step": jnp.full(3, step, jnp.int32)}

    buffer = MetricsBuffer(tokens_per_micro=1)
    buffer.add(group([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 1))
    buffer.add(group([3.0, float("inf"), 5.0], [1.0, 1.0, float("nan")], 2))
    [record] = buffer.flush()
    assert record["loss"][0] == 2.0 and record["loss"][2] == 4.0
    assert record["finite"].tolist() == [True, False, False]
    assert record["problems"] == {1: "the loss became inf at step 2",
                                  2: "the gradient norm became nan at step 2"}
    np.testing.assert_allclose(record["lr"], [1e-3, 2e-3, 3e-3])


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
    assert runs.sample_prompt("x\nsome prose\nHAMLET: To be\n") == "HAMLET: "
    assert runs.sample_prompt("no speakers here\nat all\n") == "no speakers here"


def test_logger_reports_a_dead_events_writer_in_one_line(tmp_path, monkeypatch):
    """TensorBoard's events are written by tensorboardX's own thread: when a write there
    fails (here the file's write raises ENOSPC), the next log line raises one RunError,
    and neither another thread's failure nor the logger touches threading.excepthook."""
    import errno
    import threading

    import tensorboardX.event_file_writer as efw

    from chatgot_jax.errors import RunError
    from chatgot_jax.metrics import Logger

    hook = threading.excepthook
    log = Logger(tmp_path, enabled=True)
    try:
        log.write({"step": 1, "loss": 2.0})
        other = threading.Thread(target=os.open, args=(tmp_path / "no" / "such", 0))  # OSError
        monkeypatch.setattr(threading, "excepthook", lambda args: None)
        other.start()
        other.join()
        monkeypatch.undo()
        log.write({"step": 2, "loss": 1.5})  # not the events writer: nothing to report

        def full_disk(self, event):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(efw.EventsWriter, "write_event", full_disk)
        monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its traceback
        log.write({"step": 3, "loss": 1.0})  # queued; the writer thread dies of it
        log.tb.file_writer.event_writer._worker.join(30)
        with pytest.raises(RunError, match="cannot write the TensorBoard events in "):
            log.write({"step": 4, "loss": 0.5})
    finally:
        log.close(quiet=True)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.undo()
    assert threading.excepthook is hook


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
