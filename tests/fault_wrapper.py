"""Runs train.py with one fault injected (used by test_faults.py as a subprocess).

    python tests/fault_wrapper.py TRAIN_ARGS...   (chatgot_jax installed, e.g. editable)

FAULT_MODE=die-in-save FAULT_ARG=N: SIGKILL in the middle of writing checkpoint N
  (when Orbax's writer, in the background, starts writing the "meta" item's file into
  N.orbax-checkpoint-tmp);
FAULT_MODE=park FAULT_ARG=N: before micro-batch N is handed to the step, touch FAULT_MARKER and
  wait until FAULT_RELEASE exists (a safe point for a Ctrl-C to land);
FAULT_MODE=fsize FAULT_ARG=N: writing a file past N bytes fails with EFBIG (as
  writing to a full disk fails with ENOSPC), through the real write path.
"""

import os
import pathlib
import resource
import signal
import sys
import time

import orbax.checkpoint as ocp

from chatgot_jax import train_cli, train_lib


def die_while_saving(step: int) -> None:
    real_save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory, *args, **kwargs):
        if f"/{step}.orbax-checkpoint-tmp" in str(directory):
            os.kill(os.getpid(), signal.SIGKILL)
        return await real_save_fn(self, x, directory, *args, **kwargs)

    ocp.handlers.JsonCheckpointHandler._save_fn = save_fn


def park_before(micro_step: int) -> None:
    real_for_micro_step = train_lib.ResidentBatches.for_micro_step

    def for_micro_step(self, micro):
        if micro == micro_step:
            pathlib.Path(os.environ["FAULT_MARKER"]).touch()
            release = pathlib.Path(os.environ["FAULT_RELEASE"])
            deadline = time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return real_for_micro_step(self, micro)

    train_lib.ResidentBatches.for_micro_step = for_micro_step


def limit_file_size(n_bytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


FAULTS = {"die-in-save": die_while_saving, "park": park_before, "fsize": limit_file_size}

if __name__ == "__main__":
    FAULTS[os.environ["FAULT_MODE"]](int(os.environ["FAULT_ARG"]))
    train_cli.main(sys.argv[1:], until_exit=True)  # as train.py's __main__ does
