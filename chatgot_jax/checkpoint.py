"""Orbax checkpoints of a run: RUN_DIR/checkpoints/<optimizer step>/{params,opt_state,train,meta}.

Each checkpoint holds params, optimizer state (whose gradient_step is the
step), the dropout RNG ("train"), and a JSON "meta" item with the config, the
tokenizer and the validation loss, so one checkpoint is enough to resume or to
sample. Orbax writes each step to a temporary directory and renames it when
complete, so a killed save never leaves a checkpoint that looks finished. The
manager keeps the last `keep` checkpoints plus the best one by validation loss.
"""

import contextlib
import json
import os
import pathlib
import re
import sys
import time
import weakref

import jax
import orbax.checkpoint as ocp

from chatgot_jax import config as config_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, RunError, UserError
from chatgot_jax.model import param_shapes

CKPT_SUBDIR = "checkpoints"


def make_manager(run_dir, keep: int = 3, read_only: bool = False,
                 async_saves: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoint manager. With async_saves, save(..., wait=False) returns once
    the arrays are off the device and Orbax writes them in a background thread."""
    policies = ocp.checkpoint_managers
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    # The preservation policy decides what is kept. best_fn is there because Orbax writes
    # a checkpoint's metrics to disk only when it is set: without them, a manager made
    # later (a resumed run) sees no val_loss on the earlier checkpoints, and BestN lets
    # the best of them be deleted at the next save.
    # read_only: a manager that creates, cleans up and saves nothing. (Orbax's own
    # read_only option logs warnings each time a manager is made with it.)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, best_fn=lambda m: m["val_loss"], best_mode="min",
        create=not read_only, enable_async_checkpointing=async_saves,
        cleanup_tmp_directories=not read_only)
    directory = pathlib.Path(run_dir).resolve() / CKPT_SUBDIR
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state, cfg: config_lib.Config,
         tokenizer: CharTokenizer, opt_step: int, val_loss: float | None = None,
         data: dict | None = None, wait: bool = True) -> None:
    """Saves the full train state under the optimizer step number; `data` identifies
    the corpus it was trained on (data.corpus_identity). A checkpoint already at that
    step (one a resumed group trains again) is replaced.

    wait=False (a manager made with async_saves) returns while the files are
    written: finish_save(manager) waits for them and reports a failed write. A
    write still in flight is finished first. Either way the step appears only when
    complete (Orbax renames it). A failed write raises RunError.
    """
    finish_save(manager)  # a failure of the previous write is reported as its own step
    meta = {"config": config_lib.to_dict(cfg), "tokenizer": json.loads(tokenizer.to_json()),
            "opt_step": opt_step, "val_loss": val_loss, "data": data}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"rng": state["rng"]}),
        meta=ocp.args.JsonSave(meta))
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    with _as_run_error(manager, opt_step):
        if opt_step in manager.all_steps():
            manager.delete(opt_step)
        if not wait:
            _writing[manager] = opt_step
        manager.save(opt_step, args=args, metrics=metrics, force=True)
        if wait:
            manager.wait_until_finished()


# The step each manager is writing in the background (save(..., wait=False)).
_writing: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def finish_save(manager: ocp.CheckpointManager) -> None:
    """Waits for the manager's background write (save(..., wait=False)), if one is in
    flight; a failed write raises RunError, as for a synchronous save."""
    opt_step = _writing.pop(manager, None)
    if opt_step is not None:
        with _as_run_error(manager, opt_step):
            manager.wait_until_finished()


def close(manager: ocp.CheckpointManager, quiet: bool = False) -> None:
    """Waits for a write in flight and closes the manager. quiet=True, for a run that
    is already ending with an error: a failed write is not raised over it."""
    failed = None
    try:
        finish_save(manager)
    except RunError as e:
        failed = e
    try:
        manager.close()
    except Exception:  # noqa: BLE001 (Orbax raises the failed write once more)
        if failed is None and not quiet:
            raise
    if failed is not None and not quiet:
        raise failed


@contextlib.contextmanager
def _as_run_error(manager: ocp.CheckpointManager, opt_step: int):
    """An I/O failure of the write of opt_step becomes one RunError (the step stays a
    temporary directory, which Orbax ignores and cleans up); other errors pass."""
    try:
        yield
    except (OSError, ValueError) as e:  # disk full, I/O error
        reason = io_failure(e)
        if reason is None:
            raise
        raise RunError(f"could not write checkpoint step {opt_step} in {manager.directory}: "
                       f"{reason}; earlier checkpoints are intact") from e


def io_failure(error: Exception) -> str | None:
    """The OS's reason for a failed write, or None if `error` is not one.

    TensorStore, which writes the arrays, reports a failed write as a ValueError
    whose text ends in "[os_error_code=28]" (it has no typed error or errno
    attribute; tests/test_checkpoint.py checks the text on a real failed write);
    plain Python writes raise OSError.
    """
    os_error = re.search(r"\[os_error_code='?(\d+)'?\]", str(error))
    if os_error:
        return os.strerror(int(os_error[1]))
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return None


def existing_steps(run_dir) -> list[int]:
    """Steps of the complete checkpoints in run_dir, without creating anything."""
    directory = pathlib.Path(run_dir) / CKPT_SUBDIR
    if not directory.is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores params, optimizer state and RNG into abstract_state's shardings."""
    abstract_train = {"rng": abstract_state["rng"]}
    saved_train = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / "train")
    if "step" in saved_train.tree:  # older checkpoints also hold the micro-step, now derived
        abstract_train["step"] = jax.ShapeDtypeStruct((), "int32",
                                                      sharding=abstract_state["rng"].sharding)
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
        train=ocp.args.StandardRestore(abstract_train))
    restored = manager.restore(step, args=args)
    return {"params": restored["params"], "opt_state": restored["opt_state"],
            "rng": restored["train"]["rng"]}


def newest_readable(manager: ocp.CheckpointManager, read, on_unreadable=None):
    """(step, read(step)) for the newest checkpoint where read succeeds, else (None, None).

    Each checkpoint where read raises is passed to on_unreadable(step, error)
    before the next older one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, read(step)
        except Exception as e:  # noqa: BLE001 (truncated or corrupted files, missing items)
            if on_unreadable is not None:
                on_unreadable(step, e)
    return None, None


def set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Warns about an unreadable checkpoint and moves it (not deletes it) to
    RUN_DIR/corrupt-checkpoints/, so that training can save that step again."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    print(f"warning: checkpoint step {step} in {manager.directory} is unreadable "
          f"({type(error).__name__}: {first}); falling back to an older one", file=sys.stderr)
    aside = pathlib.Path(manager.directory).parent / "corrupt-checkpoints"
    aside.mkdir(exist_ok=True)
    (pathlib.Path(manager.directory) / str(step)).rename(aside / f"{step}-{int(time.time())}")
    manager.reload()


def restore_common(managers: list[ocp.CheckpointManager], abstract_state):
    """(step, [state per manager]) at the newest step where every manager has a readable
    checkpoint (meta and state), restored into abstract_state's shardings; (None, None)
    if there is no such step. An unreadable checkpoint met on the way is set aside, and
    the next older common step is tried."""
    while True:
        common = set.intersection(*(set(m.all_steps()) for m in managers))
        if not common:
            return None, None
        step, states = max(common), []
        for manager in managers:
            try:
                read_meta(manager, step)  # without it, sample.py cannot use the checkpoint
                states.append(restore_state(manager, step, abstract_state))
            except Exception as e:  # noqa: BLE001 (truncated or corrupted files, missing items)
                set_aside(manager, step, e)
                break
        else:
            return step, states


def best_checkpoint(manager: ocp.CheckpointManager) -> tuple[float, int] | None:
    """(validation loss, step) of the kept checkpoint with the lowest validation loss,
    or None if none was evaluated. Unreadable checkpoints are skipped."""
    scored = []
    for step in manager.all_steps():
        try:
            val_loss = read_meta(manager, step)["val_loss"]
        except Exception:  # noqa: BLE001 (an unreadable checkpoint has no say)
            continue
        if val_loss is not None:
            scored.append((val_loss, step))
    return min(scored) if scored else None


def resolve(path: str) -> tuple[pathlib.Path, int | None]:
    """A run dir, its checkpoints dir, or one step's dir -> (run dir, step or None)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    if (p / CKPT_SUBDIR).is_dir():
        return p, None
    if p.name == CKPT_SUBDIR:
        return p.parent, None
    if p.name.isdigit() and p.parent.name == CKPT_SUBDIR:
        return p.parent.parent, int(p.name)
    raise UserError(f"{path} holds no checkpoint: give a run directory made by train.py "
                    f"(with a {CKPT_SUBDIR}/ folder) or one of its step folders")


def run_dir_of(path: str) -> pathlib.Path:
    """The run directory of a run directory, its checkpoints directory or one step's."""
    return resolve(path)[0]


def load_for_inference(path: str, step: int | None = None, best: bool = False):
    """-> (params, Config, CharTokenizer, step) from a run dir or one step's dir."""
    run_dir, path_step = resolve(path)
    with make_manager(run_dir, read_only=True) as manager:  # closed however this ends
        return _load(manager, run_dir, path, path_step, step, best)


def _load(manager, run_dir, path: str, path_step: int | None, step: int | None, best: bool):
    step = choose_step(manager, path, step if step is not None else path_step, best)
    meta = read_meta(manager, step)
    cfg = config_lib.from_dict(meta["config"], source=f"checkpoint {run_dir} step {step}")
    tokenizer = CharTokenizer.from_json(json.dumps(meta["tokenizer"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            param_shapes(cfg.model))
    params = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    return params, cfg, tokenizer, step


def choose_step(manager: ocp.CheckpointManager, path: str, step: int | None,
                best: bool) -> int:
    """The step to load: `step`, the best checkpoint's, or the newest; UserError if there
    is no such complete checkpoint."""
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{path} holds no complete checkpoint")
    if best:
        found = best_checkpoint(manager)
        if found is None:
            raise InvalidArgument("best", f"needs a checkpoint with a validation loss, and "
                                          f"{path} has none: load the latest instead")
        step = found[1]
    if step is None:
        step = manager.latest_step()
    if step not in steps:
        raise UserError(f"{path} has no checkpoint at step {step}: "
                        f"available steps are {', '.join(map(str, sorted(steps)))}")
    return step
