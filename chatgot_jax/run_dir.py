"""A run directory: what it holds before training starts, who may write it, and what a run writes.

    RUN_DIR/config.json           the config in force (the latest start's)
    RUN_DIR/config-history.jsonl  one line per config: the step it took effect at, and the
                                  fields that changed from the one before
    RUN_DIR/provenance.jsonl      one line per start or resume: command, versions, devices, data
    RUN_DIR/tokenizer.json        the vocabulary
    RUN_DIR/prompt.txt            the prompt of its evaluation samples (sample.py's default)
    RUN_DIR/metrics.jsonl         and TensorBoard events (chatgot_jax.metrics.Logger)
    RUN_DIR/checkpoints/          Orbax checkpoints (chatgot_jax.checkpoint)

A run directory's config always describes how its checkpoints were trained: a
start with another training config is refused (ConfigDrift) unless the caller
resumes deliberately, and then the change is recorded in config-history.jsonl.
One process writes a run directory at a time (RunLock).
"""

import dataclasses
import datetime
import fcntl
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import socket
import subprocess
import sys

from chatgot_jax import __version__
from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, UserError

PROMPT_FILE = "prompt.txt"  # the run's evaluation prompt, exactly (no newline added)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class ConfigDrift(UserError):
    """A run directory holds a run trained with other settings (changes: 'field old -> new')."""

    def __init__(self, run_dir, changes: list[str]):
        self.run_dir, self.changes = run_dir, changes
        super().__init__(f"{run_dir} holds a run trained with other settings: "
                         f"{'; '.join(changes)}")


class RunDirInUse(UserError):
    """Another process holds the run directory's lock."""


@dataclasses.dataclass(frozen=True)
class Existing:
    """What a run directory already holds: its checkpoint steps, and the newest readable
    checkpoint's step, tokenizer, config and data identity (all None for a new run)."""

    steps: tuple[int, ...] = ()
    step: int | None = None
    tokenizer: CharTokenizer | None = None
    config: config_lib.Config | None = None
    data: dict | None = None  # {"source", "sha256"}; None in checkpoints that predate it


def inspect(run_dir: pathlib.Path, cfg: config_lib.Config, resume: bool) -> Existing:
    """Reads what run_dir holds without writing anything.

    A path that cannot hold a run, resume=True without a checkpoint, and a run
    of another model shape are refused with a UserError.
    """
    check_path(run_dir)
    steps = tuple(ckpt.existing_steps(run_dir))
    if not steps:
        if resume:
            raise InvalidArgument("resume", f"needs a checkpoint, but {run_dir} holds no "
                                            f"checkpoint to resume from")
        return Existing()
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:  # unreadable checkpoints are warned about and set aside when the state is restored
        step, meta = ckpt.newest_readable(manager, lambda s: ckpt.read_meta(manager, s))
    finally:
        manager.close()
    if meta is None:
        raise UserError(f"no checkpoint in {run_dir} is readable: move it away to start over")
    saved = config_lib.from_dict(meta["config"], source=f"checkpoint in {run_dir}")
    check_same_shape(run_dir, saved, cfg)
    tokenizer = CharTokenizer.from_json(json.dumps(meta["tokenizer"]))
    return Existing(steps, step, tokenizer, saved, meta.get("data"))


def check_path(run_dir: pathlib.Path) -> None:
    """Refuses a path that is a file or lies under one (whether it can be written is
    found by trying, in create())."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory")
    existing = next(p for p in (run_dir, *run_dir.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create run directory {run_dir}: {existing} is a file")


def check_same_shape(run_dir, saved: config_lib.Config, cfg: config_lib.Config) -> None:
    """A run resumes only with the model shape it was trained with (the vocabulary
    comes from the saved tokenizer)."""
    diff = [f"{k} {getattr(saved.model, k)} (asked {getattr(cfg.model, k)})"
            for k in config_lib.SHAPE_FIELDS
            if k != "vocab_size" and getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise UserError(f"{run_dir} holds a run of another model shape ({', '.join(diff)}): "
                        f"use another run directory, or the same model settings to resume")


def flat(cfg: config_lib.Config) -> dict:
    """{"section.field": value} of every config field."""
    return {f"{section}.{name}": value
            for section, fields in config_lib.to_dict(cfg).items()
            for name, value in fields.items()}


def config_changes(old: config_lib.Config, new: config_lib.Config) -> dict:
    """{"section.field": [old, new]} of the fields that differ (vocab_size comes from
    the saved tokenizer and is not compared)."""
    a, b = flat(old), flat(new)
    return {k: [a[k], b[k]] for k in a if a[k] != b[k] and k != "model.vocab_size"}


def training_changes(existing: Existing, cfg: config_lib.Config, data: dict) -> list[str]:
    """'field old -> new' for each difference that changes the training: a config field
    outside config.BOOKKEEPING, or the corpus content."""
    changes = [f"{k} {old} -> {new}" for k, (old, new) in config_changes(existing.config,
                                                                          cfg).items()
               if k not in config_lib.BOOKKEEPING]
    if existing.data is not None and existing.data["sha256"] != data["sha256"]:
        changes.append(f"data {existing.data['source']} (sha256 {existing.data['sha256'][:12]}) "
                       f"-> {data['source']} (sha256 {data['sha256'][:12]})")
    return changes


class RunLock:
    """An advisory lock (flock) on the run directory, held while a process writes it.

    The kernel drops it when the process ends, however it ends, so kill -9 leaves
    no stale lock. Readers (sample.py, plot) take no lock.
    """

    def __init__(self, run_dir: pathlib.Path):
        self.run_dir = run_dir
        self.fd = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise UserError(f"cannot open run directory {self.run_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(f"{self.run_dir} is in use by {holder(self.run_dir)}: wait for "
                              f"it to finish or stop it, or use another run directory") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def holder(run_dir: pathlib.Path) -> str:
    """Who holds the lock, from the last provenance record: 'process PID on HOST (command)'."""
    try:
        last = (run_dir / "provenance.jsonl").read_text(encoding="utf-8").splitlines()[-1]
        record = json.loads(last)
        return f"process {record['pid']} on {record['host']} ({record['command']})"
    except (OSError, IndexError, ValueError, KeyError):
        return "another process"


def create(run_dir: pathlib.Path, lock: RunLock) -> None:
    """Creates run_dir if needed and takes its lock if not held yet: a UserError
    (nothing written) if it cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock.fd is None:
            lock.acquire()
    except OSError as e:
        raise UserError(f"cannot create run directory {run_dir}: {e.strerror}") from None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_start(run_dir: pathlib.Path, cfg: config_lib.Config, tokenizer: CharTokenizer,
                existing: Existing, step: int, provenance: dict,
                prompt: str | None = None) -> None:
    """What every start writes: config.json, tokenizer.json, a config-history line for a
    new run or a changed config, and a provenance line, both at `step`, the step
    training starts from; and prompt.txt, the prompt its evaluation samples start
    from (sample.py's default prompt), if given. OSError -> UserError."""
    changes = {} if existing.config is None else config_changes(existing.config, cfg)
    try:
        if prompt is not None:
            (run_dir / PROMPT_FILE).write_text(prompt, encoding="utf-8")
        if existing.config is None or changes:
            append_line(run_dir / "config-history.jsonl",
                        {"step": step, "time": now(), "changes": changes,
                         "config": config_lib.to_dict(cfg)})
        (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        tokenizer.save(run_dir / "tokenizer.json")
        append_line(run_dir / "provenance.jsonl", {**provenance, "start_step": step})
    except OSError as e:
        raise UserError(f"cannot write in run directory {run_dir}: {e.strerror}") from None


def append_line(path: pathlib.Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def provenance(data: dict, devices: list, command: list[str] | None = None) -> dict:
    """Where and how a run started: command (default sys.argv), versions, devices, data, time."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"time": now(), "command": shlex.join(command or [sys.executable, *sys.argv]),
            "cwd": os.getcwd(), "pid": os.getpid(), "host": socket.gethostname(),
            "chatgot_jax": __version__, "git": git_commit(), "python": platform.python_version(),
            "packages": versions, "device_kind": devices[0].device_kind,
            "platform": devices[0].platform, "device_count": len(devices), "data": data}


def git_commit() -> dict | None:
    """{"commit", "dirty"} of the checkout the package runs from, or None."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None
