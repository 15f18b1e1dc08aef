"""A run directory: what it holds before training starts, and the files a run writes there.

    RUN_DIR/config.json      the full config
    RUN_DIR/tokenizer.json   the vocabulary
    RUN_DIR/metrics.jsonl    and TensorBoard events (trainer.Logger)
    RUN_DIR/checkpoints/     Orbax checkpoints (chatgot_jax.checkpoint)
"""

import dataclasses
import json
import os
import pathlib

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, UserError


@dataclasses.dataclass(frozen=True)
class Existing:
    """What a run directory already holds: its checkpoint steps, and the tokenizer and
    config of the newest checkpoint whose metadata reads (None for a new run)."""

    steps: tuple[int, ...] = ()
    tokenizer: CharTokenizer | None = None
    config: config_lib.Config | None = None


def inspect(run_dir: pathlib.Path, cfg: config_lib.Config, resume: bool) -> Existing:
    """Checks run_dir without writing anything.

    A path that cannot hold a run, resume=True without a checkpoint, and a run
    of another model shape are refused with a UserError.
    """
    check_writable(run_dir)
    steps = tuple(ckpt.existing_steps(run_dir))
    if not steps:
        if resume:
            raise InvalidArgument("resume", f"needs a checkpoint, but {run_dir} holds no "
                                            f"checkpoint to resume from")
        return Existing()
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:  # unreadable checkpoints are warned about and set aside when the state is restored
        _, meta = ckpt.newest_readable(manager, lambda step: ckpt.read_meta(manager, step))
    finally:
        manager.close()
    if meta is None:
        raise UserError(f"no checkpoint in {run_dir} is readable: move it away to start over")
    saved = config_lib.from_dict(meta["config"], source=f"checkpoint in {run_dir}")
    check_same_shape(run_dir, saved, cfg)
    tokenizer = CharTokenizer.from_json(json.dumps(meta["tokenizer"]))
    return Existing(steps, tokenizer, saved)


def check_writable(run_dir: pathlib.Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory")
    existing = next(p for p in (run_dir, *run_dir.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create run directory {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run directory {run_dir} is not writable ({existing} is read-only): "
                        f"choose another directory")


def check_same_shape(run_dir, saved: config_lib.Config, cfg: config_lib.Config) -> None:
    """A run resumes only with the model shape it was trained with (the vocabulary
    comes from the saved tokenizer)."""
    diff = [f"{k} {getattr(saved.model, k)} (asked {getattr(cfg.model, k)})"
            for k in config_lib.SHAPE_FIELDS
            if k != "vocab_size" and getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise UserError(f"{run_dir} holds a run of another model shape ({', '.join(diff)}): "
                        f"use another run directory, or the same model settings to resume")


def write_files(run_dir: pathlib.Path, cfg: config_lib.Config, tokenizer: CharTokenizer) -> None:
    """config.json and tokenizer.json (the checkpoints carry both as well)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
    tokenizer.save(run_dir / "tokenizer.json")
