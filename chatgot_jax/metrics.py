"""What a run logs: the train step's metrics buffered on device, and the run's log files.

    MetricsBuffer  device metrics -> one host sync per log interval; which runs diverged
    Logger         RUN_DIR/metrics.jsonl and TensorBoard event files (process 0)
"""

import json
import math
import pathlib
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from chatgot_jax.errors import RunError


class Logger:
    """metrics.jsonl and TensorBoard event files in the run dir, on process 0.

    Prints go through tqdm so the bar stays intact. TensorBoard gets the fields
    named in TAGS as scalars at the record's step (train/loss, val/bpc, ...) and
    the samples as text; on resume, events after the resumed step are purged so
    the curves do not double back. TensorBoard's events are written by a thread
    of tensorboardX's; when it has died (an I/O error), the next write() or
    close() raises one RunError.
    """

    TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
            "grad_norm": "train/grad_norm", "val_loss": "val/loss", "val_bpc": "val/bpc"}

    def __init__(self, run_dir: pathlib.Path, enabled: bool, start_step: int = 0,
                 hparams: dict | None = None, prefix: str = ""):
        self.enabled = enabled
        self.prefix = prefix  # printed before each line, e.g. a sweep run's name
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
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

    def _check_events_writer(self) -> None:
        """RunError once tensorboardX's writer thread has died: adding events then would
        fill its queue and block."""
        if self.tb is not None and not tensorboard_writer_alive(self.tb):
            self.tb = None  # nothing more goes to it, closing it included
            raise RunError(f"cannot write the TensorBoard events in {self.path.parent}: "
                           f"their writer thread stopped (an I/O error); the last checkpoint "
                           f"is intact")

    def write(self, record: dict) -> None:
        self._check_events_writer()
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
            tqdm.write(self.prefix + text)

    def close(self, quiet: bool = False) -> None:
        """Flushes and closes the events; quiet=True (a run already ending with an error)
        drops a failure of their writer instead of raising it."""
        try:
            self._check_events_writer()
            if self.tb is not None:
                try:
                    self.tb.close()
                except OSError as e:
                    raise RunError(f"cannot write the TensorBoard events in "
                                   f"{self.path.parent}: {e.strerror}") from None
        except RunError:
            if not quiet:
                raise
        finally:
            self.tb = None


def tensorboard_writer_alive(writer) -> bool:
    """Whether tensorboardX's event writer thread still runs. The thread is an attribute
    of tensorboardX 2.6's EventFileWriter; where that layout differs, it is assumed alive."""
    file_writer = getattr(writer, "file_writer", None)
    worker = getattr(getattr(file_writer, "event_writer", None), "_worker", None)
    return worker is None or worker.is_alive()


class MetricsBuffer:
    """The train step's device metrics, fetched one log interval at a time.

    add() queues a micro-step's metrics without waiting, except for the first of
    the run, whose wall time (compilation included) it returns. flush() closes the
    current interval and fetches every queued one; flush(lagged=True) fetches all
    but the interval it just closed, so the host never waits for the device's
    newest steps (the loop uses it at plain log intervals and a full flush before
    it evaluates or saves, so no non-finite state is ever evaluated or saved).

    Either returns one record per fetched interval, oldest first, for R runs (the
    step's metrics are scalars for one run, (R,) arrays for a group): per run the
    mean loss and gradient norm and the last lr ((R,) arrays), the step of the
    interval's last update ("step"), tokens/s of one run over the interval's time
    (from the previous interval's last step seen done to its own; the run's first
    step and restart_clock() pauses left out), "finite" ((R,) bools: no non-finite
    loss or gradient norm in the interval) and "problems" ({run index: "the loss
    became nan at step N"} for the others).
    """

    def __init__(self, tokens_per_micro: int):
        self.tokens_per_micro = tokens_per_micro
        self.pending = []  # the open interval's metrics
        self.closed = []  # closed intervals, not fetched yet: (metrics, timed steps)
        # When the device was last known to have finished everything queued (or the clock
        # was restarted): an interval's time runs from there to when its last step is
        # seen done. Host time between closes would count the dispatch of steps that
        # the device has not run yet, which early in a run is far too short.
        self.t_done = time.time()
        self.untimed = 0
        self.first_step_s = None

    def add(self, metrics) -> float | None:
        self.pending.append(metrics)
        if self.first_step_s is not None:
            return None
        jax.block_until_ready(metrics)
        self.first_step_s = time.time() - self.t_done
        self.t_done, self.untimed = time.time(), 1
        return self.first_step_s

    def restart_clock(self) -> None:
        """Evaluation and saving are not training time (the loop calls this after a full
        flush, with nothing queued)."""
        self.t_done = time.time()

    def drop(self) -> None:
        self.pending, self.closed = [], []

    def _close(self) -> None:
        if self.pending:
            self.closed.append((self.pending, len(self.pending) - self.untimed))
            self.pending, self.untimed = [], 0

    def flush(self, lagged: bool = False) -> list[dict]:
        """Closes the open interval -> one record per fetched interval, oldest first."""
        self._close()
        take = self.closed[:-1] if lagged else self.closed
        self.closed = self.closed[len(take):]
        seconds = []
        for metrics, _ in take:  # each step waits for the one before it
            jax.block_until_ready(metrics[-1])
            now = time.time()
            seconds.append(now - self.t_done)
            self.t_done = now
        fetched = jax.device_get([metrics for metrics, _ in take])
        return [self._record(metrics, timed, s)
                for metrics, (_, timed), s in zip(fetched, take, seconds)]

    def _record(self, fetched: list, timed: int, seconds: float) -> dict:
        def per_run(name):  # (micro-steps, runs)
            return np.stack([np.reshape(m[name], -1) for m in fetched])

        loss, grad_norm, opt_step = per_run("loss"), per_run("grad_norm"), per_run("opt_step")
        finite = np.isfinite(loss) & np.isfinite(grad_norm)
        problems = {}
        for k in np.flatnonzero(~finite.all(0)):
            # The loss of step N is computed before update N: a non-finite gradient
            # with a finite loss has already made the state non-finite.
            i = int(np.argmin(finite[:, k]))
            what = (f"the loss became {loss[i, k]}" if not np.isfinite(loss[i, k])
                    else f"the gradient norm became {grad_norm[i, k]}")
            problems[int(k)] = f"{what} at step {int(opt_step[i, k])}"
        tok_s = timed * self.tokens_per_micro / seconds if timed else float("nan")
        return {"step": int(opt_step[-1].max()), "loss": column_means(loss),
                "lr": per_run("lr")[-1], "grad_norm": column_means(grad_norm),
                "tokens_per_s": tok_s, "finite": finite.all(0), "problems": problems}


def column_means(x_NxR: np.ndarray) -> np.ndarray:
    """(R,) means of the columns, each summed as a contiguous 1-D array (the float order
    of a single run's own mean)."""
    return np.array([np.ascontiguousarray(x_NxR[:, k]).mean() for k in range(x_NxR.shape[1])])
