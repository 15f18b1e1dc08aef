"""Test setup: 8 simulated CPU devices (before jax is imported), micro configs and corpora."""

import hashlib
import os
import pathlib
import tempfile

# Compile time dominates the suite: LLVM's cheapest optimisation level, and a
# persistent compilation cache shared by the tests and the CLI subprocesses they run.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "chatgot-jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

from chatgot_jax import cpu_tuning  # noqa: E402

cpu_tuning.set_xla_flags()  # as the command-line entry points do (and their subprocesses inherit)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from chatgot_jax import config as config_lib  # noqa: E402
from chatgot_jax.config import ModelConfig  # noqa: E402

# The micro model of every test: a ModelConfig's fields, and the same as overrides.
# Dropout on (the default recipe has none) so that the tests exercise it. float32
# products: the parity tests' tolerances are float32's on every CPU (auto would pick
# bfloat16 products on one with AMX; test_precision.py tests those).
MICRO = dict(vocab_size=40, d_model=32, n_layers=2, n_head=4, d_hid=64, max_seq_length=32,
             dropout=0.1, matmul_dtype="float32")
MICRO_OVERRIDES = [f"model.{k}={v}" for k, v in MICRO.items() if k != "vocab_size"]


def micro_config(*extra: str) -> config_lib.Config:
    """The tiny variant with the micro model shape, then `extra` overrides."""
    return config_lib.load_config("tiny", overrides=MICRO_OVERRIDES + list(extra))


def write_script_corpus(path, seed: int = 0, names=("JON SNOW", "ARYA", "TYRION"),
                        lines: int = 300):
    """A small corpus in the scripts' `SPEAKER: line` format."""
    rng = np.random.default_rng(seed)
    words = "winter is coming the north remembers a lannister always pays his debts".split()
    text = [f"{names[i % len(names)]}: {' '.join(rng.choice(words, 8))}." for i in range(lines)]
    path.write_text("\n\n".join(text), encoding="utf-8")
    return path


@pytest.fixture
def micro_cfg():
    return ModelConfig(**MICRO)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A script corpus file (300 lines, three speakers)."""
    return write_script_corpus(tmp_path_factory.mktemp("corpus") / "scripts.txt")


@pytest.fixture
def open_managers(monkeypatch):
    """{id: manager} of the Orbax checkpoint managers made and not yet closed during the
    test: a command or library call must leave it as it found it."""
    import orbax.checkpoint as ocp

    opened = {}
    real_init, real_close = ocp.CheckpointManager.__init__, ocp.CheckpointManager.close

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened[id(self)] = self

    def close(self):
        opened.pop(id(self), None)
        real_close(self)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", init)
    monkeypatch.setattr(ocp.CheckpointManager, "close", close)
    return opened


def tree_digest(path: pathlib.Path) -> str:
    """A hash of every file's relative path and bytes under path: equal = unchanged."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# CI sets CHATGOT_JAX_NO_SKIPS=1 (.ci/run): there every test must run, so a skip (torch
# missing for the parity tests, a tool that is not installed) fails the session instead
# of passing unnoticed. Module-level skips (importorskip) arrive as collection reports;
# expected failures (xfail) are not skips.
NO_SKIPS = "CHATGOT_JAX_NO_SKIPS"
_skipped: dict[str, None] = {}  # node ids in the order they were skipped, once each


# A test that cannot run for lack of an OS privilege (mounting a tmpfs) says so with
# ENVIRONMENT at the start of its skip reason; CI tolerates only those.
ENVIRONMENT = "environment: "


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        if not reason.removeprefix("Skipped: ").startswith(ENVIRONMENT):
            _skipped[report.nodeid] = None


def pytest_collectreport(report):
    _note_skip(report)


def pytest_runtest_logreport(report):
    _note_skip(report)


def _skips_refused() -> bool:
    return os.environ.get(NO_SKIPS) == "1" and bool(_skipped)


def pytest_sessionfinish(session, exitstatus):
    if _skips_refused() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # pytest exits with this status


def pytest_terminal_summary(terminalreporter):
    if _skips_refused():
        terminalreporter.write_line(f"error: {NO_SKIPS}=1 and {len(_skipped)} test(s) "
                                    f"skipped: {', '.join(_skipped)}", red=True, bold=True)
