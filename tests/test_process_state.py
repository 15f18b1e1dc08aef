"""The library changes no process-wide state, even when a checkpoint write really fails;
the command line holds third-party noise for the life of a command and then restores it."""

import ast
import contextlib
import logging
import pathlib
import re
import resource
import signal
import sys
import threading
import warnings

import pytest

from chatgot_jax import config as config_lib
from chatgot_jax import train_cli, trainer
from chatgot_jax.errors import RunError
from conftest import MICRO_OVERRIDES

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "chatgot_jax"
ARGS = MICRO_OVERRIDES + ["train.batch_size=8", "mesh.data=1", "train.eval_windows=8",
                          "train.sample_tokens=0", "train.log_every=1", "train.warmup_steps=2",
                          "train.max_steps=4", "train.save_every=2"]
LIMIT = 32 * 1024  # bytes: a micro model's arrays do not fit, its logs and configs do


def process_state() -> dict:
    """What a library call must leave as it found it."""
    loggers = {name: logging.getLogger(name) for name in ("", "absl", "asyncio")}
    return {
        "stderr": sys.stderr, "stdout": sys.stdout, "unraisablehook": sys.unraisablehook,
        "threading.excepthook": threading.excepthook, "sys.excepthook": sys.excepthook,
        "warnings": list(warnings.filters),
        **{f"logger {name or 'root'}": (lg.level, lg.propagate, list(lg.filters),
                                        list(lg.handlers))
           for name, lg in loggers.items()},
    }


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Writing a file past n_bytes fails with EFBIG (as a full disk fails with ENOSPC),
    through the OS: TensorStore's real write path fails, not a mock."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(scope="module")
def compiled(corpus, tmp_path_factory):
    """The micro run once without a limit, so that the limited runs below find their
    programs in the persistent compilation cache (whose files the limit would refuse)."""
    cfg = config_lib.load_config("tiny", overrides=ARGS)
    trainer.train_and_evaluate(cfg, str(corpus), str(tmp_path_factory.mktemp("warm") / "run"))
    trainer.train_runs([(f"lr={lr}", config_lib.load_config("tiny", overrides=[
        *ARGS, f"train.lr={lr}"]), tmp_path_factory.mktemp("warm") / f"lr={lr}")
        for lr in (1e-3, 2e-3)], str(corpus))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("runs", [1, 2], ids=["one-run", "group"])
def test_a_failed_write_in_the_library_leaves_the_process_as_it_was(compiled, corpus, tmp_path,
                                                                    runs):
    """trainer.train_and_evaluate (one run) and trainer.train_runs (a vmapped group) with
    a checkpoint write that really fails: a RunError with the OS's reason, and every hook,
    stream, logger and warnings filter exactly as before."""
    before = process_state()
    with file_size_limit(LIMIT), pytest.raises(RunError) as exc:
        if runs == 1:
            cfg = config_lib.load_config("tiny", overrides=ARGS)
            trainer.train_and_evaluate(cfg, str(corpus), str(tmp_path / "run"))
        else:
            trainer.train_runs([(f"lr={lr}", config_lib.load_config("tiny", overrides=[
                *ARGS, f"train.lr={lr}"]), tmp_path / f"lr={lr}") for lr in (1e-3, 2e-3)],
                str(corpus))
    assert "could not write checkpoint step 2 in " in str(exc.value)
    assert str(exc.value).endswith("File too large; earlier checkpoints are intact")
    assert process_state() == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_command_line_says_one_line_and_then_restores_the_process(compiled, corpus,
                                                                      tmp_path, capsys):
    """train_cli.main in this process (not its __main__, which holds until the process exits):
    one line on stderr, exit status 1, and the process as it was."""
    before = process_state()
    with file_size_limit(LIMIT), pytest.raises(SystemExit) as exc:
        train_cli.main(["--data", str(corpus), "--out", str(tmp_path / "run"), *ARGS])
    assert exc.value.code == 1
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err)
           if line.strip() and not re.search(r"\d+/4 \[", line)]  # all but the progress bar
    assert err == [f"error: could not write checkpoint step 2 in "
                   f"{(tmp_path / 'run').resolve() / 'checkpoints'}: File too large; "
                   f"earlier checkpoints are intact"], err
    assert process_state() == before


REWIRING_ATTRIBUTES = {("sys", "stderr"), ("sys", "stdout"), ("sys", "unraisablehook"),
                       ("sys", "excepthook"), ("threading", "excepthook")}
REWIRING_CALLS = {"redirect_stderr", "redirect_stdout", "set_verbosity", "setLevel",
                  "addFilter", "filterwarnings", "simplefilter", "basicConfig"}


def rewiring(path: pathlib.Path) -> list[str]:
    """Where a module assigns a process-wide hook or stream, or reconfigures logging or
    warnings."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for t in targets:
            for leaf in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if (isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name)
                        and (leaf.value.id, leaf.attr) in REWIRING_ATTRIBUTES):
                    found.append(f"{path.name}:{node.lineno} assigns {leaf.value.id}.{leaf.attr}")
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in REWIRING_CALLS:
                found.append(f"{path.name}:{node.lineno} calls {name}")
    return found


def test_only_the_command_line_layer_rewires_the_process():
    """No module but chatgot_jax/cli.py assigns sys.stderr, the hooks, or reconfigures
    logging and warnings; cli.py is where it happens (so the check can see it)."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    offenders = [f for p in modules if p.name != "cli.py" for f in rewiring(p)]
    assert offenders == []
    assert len(rewiring(PACKAGE / "cli.py")) >= 4  # the checker finds what cli.py does
