"""The runs a training loop trains: each one's corpus, run directory, checkpoints and log.

    RunData        the corpus as one run uses it (training tokens, validation windows, prompt)
    Member         one run: config, run directory and its lock, what the directory already
                   holds, and while it trains its checkpoint manager and log
    open_members   locks and reads each run directory, refusing drift; writes nothing
    open_outputs   creates the run directories and their checkpoint managers
    restore        the start step every run shares, each run's state restored there
    start_outputs  what every start writes: config, tokenizer, provenance, log
    close_members  managers, logs and locks, however the training ended

The trainer (chatgot_jax.trainer) trains a list of members that share shapes:
one for train.py, a sweep's group for the sweep.
"""

import dataclasses
import math
import pathlib

import jax
import numpy as np
from tqdm.auto import tqdm

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import data as data_lib
from chatgot_jax import run_dir as run_dir_lib
from chatgot_jax import train_lib
from chatgot_jax.errors import UserError
from chatgot_jax.metrics import Logger


@dataclasses.dataclass(frozen=True)
class RunData:
    """The corpus as one run uses it."""

    tokenizer: data_lib.CharTokenizer
    train_tokens: np.ndarray
    val_x: np.ndarray  # fixed validation windows, a multiple of the batch size
    val_y: np.ndarray
    val_chars: int  # the validation split's length
    prompt: str  # the evaluation samples' prompt
    identity: dict  # data.corpus_identity: source and content hash


def prepare_data(cfg: config_lib.Config, data_path, saved_tokenizer=None):
    """-> (cfg with the tokenizer's vocab_size, RunData). A resumed run keeps its tokenizer."""
    text = data_lib.load_corpus(data_path)
    tokenizer = saved_tokenizer or data_lib.CharTokenizer.from_text(text)
    unknown = saved_tokenizer.unknown_chars(text) if saved_tokenizer is not None else ""
    if unknown and not tokenizer.unk:
        raise UserError(f"the corpus has {len(unknown)} characters outside the run's vocabulary, "
                        f"which has no unknown id: {', '.join(map(repr, unknown[:20]))}; "
                        "train on text within it")
    if unknown:
        tqdm.write(f"warning: {len(unknown)} corpus characters are not in the saved "
                   f"vocabulary and train as the unknown id: {unknown[:20]!r}")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    tcfg, seq_len = cfg.train, cfg.model.max_seq_length
    train_tokens, val_tokens = data_lib.split_tokens(tokenizer.encode(text), tcfg.val_fraction,
                                                     min_len=seq_len + 1)
    n_eval = math.ceil(tcfg.eval_windows / tcfg.batch_size) * tcfg.batch_size
    val_x, val_y = data_lib.eval_windows(val_tokens, n=n_eval, seq_len=seq_len)
    prompt = sample_prompt(text[len(train_tokens):])
    identity = data_lib.corpus_identity(data_path, text)
    return cfg, RunData(tokenizer, train_tokens, val_x, val_y, len(val_tokens), prompt,
                        identity)


def sample_prompt(val_text: str) -> str:
    """A speaker prompt like 'HAMLET: ' from the validation text, else its first line."""
    for line in val_text.splitlines()[1:200]:
        head, sep, _ = line.partition(": ")
        if sep and 0 < len(head) <= 30 and head.upper() == head:
            return head + sep
    return val_text[:16]


@dataclasses.dataclass
class Member:
    """One run of a group: what it is, and its state while the group trains."""

    name: str  # printed before its lines when the group has several runs
    cfg: config_lib.Config
    run_dir: pathlib.Path
    lock: run_dir_lib.RunLock
    existing: run_dir_lib.Existing
    data: RunData
    manager: object = None  # its checkpoint manager, once open_outputs made it
    log: Logger | None = None
    last_val: float | None = None  # validation loss at the group's step, if evaluated there
    best_val: float = math.inf
    saved_step: int | None = None  # the step of the checkpoint this start wrote (or began) last
    problem: str | None = None  # why it stopped training (a divergence), if it did


def open_members(runs, data_path, resume: bool = False) -> list[Member]:
    """[(name, cfg, run_dir)] -> a Member each: its directory locked (process 0), read, and
    refused if it holds another training (run_dir.ConfigDrift, unless resume); nothing
    written. On an error every lock taken is released."""
    members, locks = [], []
    try:
        for name, cfg, run_dir in runs:
            run_dir = pathlib.Path(run_dir)
            locks.append(run_dir_lib.RunLock(run_dir))
            if jax.process_index() == 0 and run_dir.is_dir():
                locks[-1].acquire()  # a second writer stops here, before anything is read
            existing = run_dir_lib.inspect(run_dir, cfg, resume)
            cfg, data = prepare_data(cfg, data_path, existing.tokenizer)
            if existing.config is not None:
                changes = run_dir_lib.training_changes(existing, cfg, data.identity)
                if changes and not resume:
                    raise run_dir_lib.ConfigDrift(run_dir, changes)
            members.append(Member(name, cfg, run_dir, locks[-1], existing, data))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return members


def open_outputs(members: list[Member]) -> None:
    """Creates each run directory (process 0) and opens its checkpoint manager."""
    for m in members:
        if jax.process_index() == 0:
            run_dir_lib.create(m.run_dir, m.lock)
        m.manager = ckpt.make_manager(m.run_dir, keep=m.cfg.train.keep, async_saves=True)


def restore(members: list[Member], mesh) -> tuple[int, list]:
    """(start step, a state per run): every run restored at the newest step where all of
    them have a readable checkpoint (unreadable ones are set aside on the way), or
    initialised at step 0 if they share none. A run whose every checkpoint is unreadable
    is refused, as a lone run's is."""
    cfg = members[0].cfg
    step, states = None, None
    if any(m.existing.steps for m in members):
        step, states = ckpt.restore_common([m.manager for m in members],
                                           train_lib.sharded_abstract_state(cfg, mesh))
        for m in members:
            if m.existing.steps and not m.manager.all_steps():
                raise UserError(f"no checkpoint in {m.manager.directory} is readable: move "
                                f"the directory away to start over")
    if step is None:
        return 0, [train_lib.create_sharded_state(m.cfg, mesh)[0] for m in members]
    return step, states


def start_outputs(members: list[Member], step: int, mesh, command) -> None:
    """What every start writes (process 0): config.json, tokenizer.json, config history
    and provenance (both at the step training starts from), and the run's log."""
    is_main = jax.process_index() == 0
    for m in members:
        if is_main:
            run_dir_lib.write_start(m.run_dir, m.cfg, m.data.tokenizer, m.existing, step,
                                    run_dir_lib.provenance(m.data.identity,
                                                           list(mesh.devices.flat), command),
                                    prompt=m.data.prompt)
        m.log = Logger(m.run_dir, is_main, start_step=step, hparams=run_dir_lib.flat(m.cfg),
                       prefix=f"{m.name}: " if len(members) > 1 else "")


def close_members(members: list[Member], quiet: bool) -> None:
    """Closes every manager (waiting for writes in flight) and log and releases every lock.
    quiet=True for a training that is already ending with an error: a failed write or
    events file is not raised over it. Otherwise the first such failure is raised once
    everything is closed."""
    failures = []
    for m in members:
        try:
            if m.manager is not None:
                ckpt.close(m.manager, quiet)
        except Exception as e:  # noqa: BLE001 (raised below, once everything is closed)
            failures.append(e)
        try:
            if m.log is not None:
                m.log.close(quiet)
        except Exception as e:  # noqa: BLE001
            failures.append(e)
        m.lock.release()
    if failures:
        raise failures[0]
