"""What a run logs: the train step's metrics buffered on device, and the run's log files.

    MetricsBuffer  device metrics -> one host sync per log interval; stops a diverged run
    Logger         RUN_DIR/metrics.jsonl and TensorBoard event files (process 0)
"""

import json
import math
import pathlib
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from chatgot_jax.errors import Diverged, RunError


class Logger:
    """metrics.jsonl and TensorBoard event files in the run dir, on process 0.

    Prints go through tqdm so the bar stays intact. TensorBoard gets the fields
    named in TAGS as scalars at the record's step (train/loss, val/bpc, ...) and
    the samples as text; on resume, events after the resumed step are purged so
    the curves do not double back.
    """

    TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
            "grad_norm": "train/grad_norm", "val_loss": "val/loss", "val_bpc": "val/bpc"}

    def __init__(self, run_dir: pathlib.Path, enabled: bool, start_step: int = 0,
                 hparams: dict | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.thread_error = None  # an OSError that killed a writer thread (TensorBoard's)
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 (import cost)
            except ImportError:  # e.g. a GPU image without it: metrics.jsonl still has it all
                tqdm.write("note: tensorboardX is not installed: no TensorBoard events "
                           "(metrics.jsonl has every figure)")
                return
            self.tb = SummaryWriter(str(run_dir), purge_step=start_step or None, flush_secs=10)
            if hparams:
                self.hparams(hparams)

    def hparams(self, values: dict) -> None:
        """The config as TensorBoard hparams of this run (not of a sub-run, as
        SummaryWriter.add_hparams would write), linked to its validation curves."""
        from tensorboardX.summary import hparams  # noqa: PLC0415

        for summary in hparams(values, {"val/loss": 0.0, "val/bpc": 0.0}):
            self.tb.file_writer.add_summary(summary)

    def _thread_failed(self, args) -> None:
        """A writer thread that dies of an I/O error is reported by the next write(), in
        one line; anything else goes to the usual hook."""
        if isinstance(args.exc_value, OSError) and self.thread_error is None:
            self.thread_error = args.exc_value
        elif not isinstance(args.exc_value, OSError):
            self._previous_hook(args)

    def write(self, record: dict) -> None:
        if self.thread_error is not None:
            reason = self.thread_error.strerror or self.thread_error
            raise RunError(f"cannot write the TensorBoard events in {self.path.parent}: "
                           f"{reason}; the last checkpoint is intact")
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunError(f"cannot write {self.path}: {e.strerror}; the last checkpoint "
                           f"is intact") from None
        if self.tb is None:
            return
        for name, tag in self.TAGS.items():
            if name in record and math.isfinite(record[name]):
                self.tb.add_scalar(tag, record[name], record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        threading.excepthook = self._previous_hook
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:  # already reported, or the run ends with its own error
                pass


class MetricsBuffer:
    """The train step's device metrics, fetched one log interval at a time.

    add() queues a micro-step's metrics without waiting, except for the first of
    the run, whose wall time (compilation included) it returns. flush() closes the
    current interval and fetches every queued one; flush(lagged=True) fetches all
    but the interval it just closed, so the host never waits for the device's
    newest steps (the loop uses it at plain log intervals and a full flush before
    it evaluates or saves, so no non-finite state is ever evaluated or saved).
    Either returns one record per fetched interval: mean loss and gradient norm,
    the last lr, the step of its last update ("step"), and tokens/s over the
    interval's host time (the run's first step and restart_clock() pauses left
    out). A non-finite loss or gradient norm raises Diverged; with
    stop_on_divergence=False (a sweep's group, whose metrics carry a run axis)
    the record's values are per-run arrays and "finite" says which runs stayed
    finite.
    """

    def __init__(self, tokens_per_micro: int, stop_on_divergence: bool = True):
        self.tokens_per_micro = tokens_per_micro
        self.stop_on_divergence = stop_on_divergence
        self.pending = []  # the open interval's metrics
        self.closed = []  # closed intervals, not fetched yet: (metrics, timed, seconds)
        self.t_last = time.time()
        self.untimed = 0
        self.first_step_s = None

    def add(self, metrics) -> float | None:
        self.pending.append(metrics)
        if self.first_step_s is not None:
            return None
        jax.block_until_ready(metrics)
        self.first_step_s = time.time() - self.t_last
        self.t_last, self.untimed = time.time(), 1
        return self.first_step_s

    def restart_clock(self) -> None:
        """Evaluation and saving are not training time."""
        self.t_last = time.time()

    def drop(self) -> None:
        self.pending, self.closed = [], []

    def _close(self) -> None:
        if self.pending:
            now = time.time()
            self.closed.append((self.pending, len(self.pending) - self.untimed,
                                now - self.t_last))
            self.pending, self.t_last, self.untimed = [], now, 0

    def flush(self, lagged: bool = False) -> list[dict]:
        """Closes the open interval -> one record per fetched interval, oldest first.
        Diverged carries the records of the intervals before the bad one (.records)."""
        self._close()
        take = self.closed[:-1] if lagged else self.closed
        self.closed = self.closed[len(take):]
        if not take:
            return []
        fetched = jax.device_get([metrics for metrics, _, _ in take])
        records = []
        for metrics, (_, timed, seconds) in zip(fetched, take):
            try:
                records.append(self._record(metrics, timed, seconds))
            except Diverged as e:
                e.records = records  # the intervals before it, still worth logging
                raise
        return records

    def _record(self, fetched: list, timed: int, seconds: float) -> dict:
        loss = np.stack([m["loss"] for m in fetched])  # (steps,) or (steps, runs)
        grad_norm = np.stack([m["grad_norm"] for m in fetched])
        finite = np.isfinite(loss) & np.isfinite(grad_norm)
        if self.stop_on_divergence and not finite.all():
            # The loss of step N is computed before update N: a non-finite gradient
            # with a finite loss has already made the state non-finite.
            i = int(np.argmin(finite))
            what = (f"the loss became {loss[i]}" if not np.isfinite(loss[i])
                    else f"the gradient norm became {grad_norm[i]}")
            raise Diverged(f"{what} at step {int(fetched[i]['opt_step'])}")
        tok_s = timed * self.tokens_per_micro / seconds if timed else float("nan")
        record = {"loss": loss.mean(0), "lr": np.asarray(fetched[-1]["lr"]),
                  "tokens_per_s": tok_s, "grad_norm": grad_norm.mean(0)}
        step = int(np.max(fetched[-1]["opt_step"]))
        if loss.ndim == 1:
            return {"step": step, **{k: float(v) for k, v in record.items()}}
        return {"step": step, **record, "finite": finite.all(0)}
