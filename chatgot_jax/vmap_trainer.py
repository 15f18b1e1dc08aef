"""A sweep's group of runs trained as one program: train states stacked on a run axis,
one jitted train step vmapped over it.

Shapes: R runs, B batch, T sequence. Each run keeps its own hyper-parameters
(h, each leaf (R,)), batches (drawn from its data seed), dropout keys (from its
rng) and run directory, so run k computes what train.py computes for its config
(up to the float order of batched matmuls). The run axis is not sharded: every
device holds every run's state, and each run's batch is split over the mesh as
in train.py. A run whose loss or gradient becomes non-finite stops logging and
saving; the others go on.
"""

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import run_dir as run_dir_lib
from chatgot_jax import train_lib, trainer
from chatgot_jax.errors import UserError
from chatgot_jax.metrics import Logger, MetricsBuffer
from chatgot_jax.optim import hyperparams


@dataclasses.dataclass
class Member:
    """One run of the group and its run directory."""

    name: str
    cfg: config_lib.Config
    run_dir: pathlib.Path
    lock: run_dir_lib.RunLock
    existing: run_dir_lib.Existing
    data: trainer.RunData
    manager: object = None
    log: Logger | None = None
    diverged: bool = False
    last_val: float | None = None  # validation loss at the current step, if evaluated
    t_start: float = 0.0  # when this start of the group began


def open_members(points, data_path, out: pathlib.Path, command) -> list[Member]:
    """Checks, locks and prepares each run directory (train.py's checks, one by one)."""
    members, locks = [], []
    try:
        for p in points:
            run_dir = out / p.name
            locks.append(run_dir_lib.RunLock(run_dir))
            if run_dir.is_dir():
                locks[-1].acquire()
            cfg, existing, data = trainer.prepare(p.cfg, data_path, run_dir, resume=False)
            members.append(Member(p.name, cfg, run_dir, locks[-1], existing, data))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return members


def start_step(members: list[Member]) -> int:
    """The newest step every run has a checkpoint of (0 if there is none)."""
    common = set.intersection(*(set(m.existing.steps) for m in members))
    return max(common) if common else 0


def stacked(mesh, abstract_state):
    """Shardings of a state with a leading run axis: the run axis replicated."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, P(None, *train_lib.leaf_spec(x.shape,
                                                                                     fsdp))),
                        abstract_state)


def group_state(members: list[Member], mesh, step: int):
    """(stacked state, its shardings): each run restored at `step`, or initialised."""
    states = []
    for m in members:
        if step:
            abstract = train_lib.abstract_state(m.cfg)
            shardings = train_lib.state_shardings(mesh, abstract)
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=s),
                                    abstract, shardings)
            states.append(ckpt.restore_state(m.manager, step, abstract))
        else:
            states.append(train_lib.create_sharded_state(m.cfg, mesh)[0])
    shardings = stacked(mesh, train_lib.abstract_state(members[0].cfg))
    stack = jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                    out_shardings=shardings)
    return stack(*states), shardings


def group_hyperparams(members: list[Member], mesh) -> dict:
    """Each run's optim.hyperparams stacked to (R,), plus "dropout" when the rates differ."""
    per_run = [hyperparams(m.cfg.train) for m in members]
    h = {k: jnp.stack([p[k] for p in per_run]) for k in per_run[0]}
    rates = [m.cfg.model.dropout for m in members]
    if len(set(rates)) > 1:
        h["dropout"] = jnp.asarray(rates, jnp.float32)
    return jax.device_put(h, NamedSharding(mesh, P()))


def compiled_steps(cfg, mesh, shardings):
    """(vmapped train step, vmapped eval step) for the group's shared config."""
    runs_starts = NamedSharding(mesh, P(None, None, train_lib.BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    # Each run cuts its batch from the shared device-resident tokens at its own starts.
    step = jax.jit(jax.vmap(train_lib.resident_step_fn(cfg, mesh), in_axes=(0, 0, None, 0, None)),
                   in_shardings=(shardings, replicated, replicated, runs_starts, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    batch = train_lib.batch_sharding(mesh)
    evaluate = jax.jit(jax.vmap(lambda p, x, y: train_lib.loss_fn(p, cfg, x, y),
                                in_axes=(0, None, None)),
                       in_shardings=(shardings["params"], batch, batch), out_shardings=replicated)
    return step, evaluate


def train_group(points, data_path, out: pathlib.Path, bar, command) -> bool:
    """Trains (or resumes) the runs of one group to their max_steps; False if Ctrl-C
    stopped it (each run saved at the step it reached)."""
    if jax.process_count() > 1:
        raise UserError("a sweep runs in one process: start it without --coordinator")
    members = open_members(points, data_path, out, command)
    try:
        cfg = members[0].cfg
        step = start_step(members)
        bar.update(step * len(members))
        if step >= cfg.train.max_steps:
            return True
        mesh = train_lib.make_mesh(cfg.mesh)
        train_lib.check_batch(cfg, mesh)
        for m in members:
            run_dir_lib.create(m.run_dir, m.lock)
            run_dir_lib.write_start(m.run_dir, m.cfg, m.data.tokenizer, m.existing,
                                    run_dir_lib.provenance(m.data.identity,
                                                           list(mesh.devices.flat), command))
            m.manager = ckpt.make_manager(m.run_dir, keep=m.cfg.train.keep, async_saves=True)
            m.t_start = time.time()
            m.log = Logger(m.run_dir, True, start_step=step, hparams=run_dir_lib.flat(m.cfg))
        state, shardings = group_state(members, mesh, step)
        return loop(members, state, shardings, mesh, step, bar)
    finally:
        close(members)


def loop(members: list[Member], state, shardings, mesh, step: int, bar) -> bool:
    """The group's loop: batches -> vmapped step -> log -> maybe evaluate -> maybe save.
    Returns False when Ctrl-C stopped it (after saving every run at its step)."""
    cfg = members[0].cfg
    t = cfg.train
    h = group_hyperparams(members, mesh)
    train_step, eval_step = compiled_steps(cfg, mesh, shardings)
    metrics = MetricsBuffer(t.batch_size * cfg.model.max_seq_length, stop_on_divergence=False)
    # The group shares its corpus (and validation windows); each run draws its own batches.
    batches = train_lib.ResidentBatches(
        cfg, mesh, members[0].data.train_tokens,
        [config_lib.seed_of(m.cfg.train, "data") for m in members])
    val_batches = trainer.validation_batches(members[0].data, t.batch_size, mesh)  # uploaded once
    with trainer.StopOnSigint() as stop:
        while step < t.max_steps and not stop.requested:
            for micro in range(step * t.grad_accum, (step + 1) * t.grad_accum):
                state, m = train_step(state, h, *batches.for_micro_step(micro))
                if (first_s := metrics.add(m)) is not None:
                    for member in members:
                        member.log.write({"step": step, "first_step_s": first_s})
            step += 1
            bar.update(len(members))
            for member in members:
                member.last_val = None
            end = step == t.max_steps
            evaluate_now, save_now = step % t.eval_every == 0 or end, step % t.save_every == 0 or end
            if evaluate_now or save_now:
                log_records(members, metrics.flush())  # no non-finite run is evaluated or saved
            elif step % t.log_every == 0:
                log_records(members, metrics.flush(lagged=True))  # no wait on the device
            if evaluate_now:
                evaluate(members, eval_step, state["params"], val_batches, step, bar)
            if save_now:
                save(members, state, step)
            if evaluate_now or save_now:
                metrics.restart_clock()
        if stop.requested:
            log_records(members, metrics.flush())
            save(members, state, step)
    for m in members:
        ckpt.finish_save(m.manager)  # a failed write stops the sweep (RunError)
    return not stop.requested


def log_records(members: list[Member], records: list[dict]) -> None:
    for record in records:
        log_record(members, record)


def log_record(members: list[Member], record: dict) -> None:
    step = record["step"]
    for k, m in enumerate(members):
        if m.diverged:
            continue
        if not record["finite"][k]:
            m.diverged = True
            m.log.print(f"{m.name}: the loss or gradient became non-finite by step {step}; "
                        f"it is no longer logged or saved")
            continue
        m.log.write({"step": step, "loss": float(record["loss"][k]),
                     "lr": float(record["lr"][k]), "tokens_per_s": record["tokens_per_s"],
                     "grad_norm": float(record["grad_norm"][k]),
                     "tokens": train_lib.tokens_trained(m.cfg, step),
                     "time": time.time() - m.t_start})


def evaluate(members: list[Member], eval_step, params, val_batches: list, step: int,
             bar) -> None:
    """Every run's validation loss on the shared windows (trainer.validation_batches, on
    the device), in one vmapped pass per batch."""
    val = np.mean(jax.device_get([eval_step(params, x, y) for x, y in val_batches]),
                  axis=0)  # (R,)
    latest = {}
    for k, m in enumerate(members):
        if m.diverged:
            continue
        m.last_val = latest[m.name] = float(val[k])
        m.log.write({"step": step, "val_loss": m.last_val, "val_bpc": m.last_val / math.log(2),
                     "time": time.time() - m.t_start})
        if m.cfg.train.sample_tokens:
            sample = trainer.sample_text(jax.tree.map(lambda a: a[k], params), m.cfg, m.data)
            m.log.print(f"--- {m.name} at step {step} ---\n{sample}\n--------------")
            m.log.text("sample", sample, step)
    bar.set_postfix(step=step, best=best_label(latest))


def save(members: list[Member], state, step: int) -> None:
    """Each finite run's slice of the state, into its own run directory, written in the
    background once the run's previous checkpoint is complete."""
    for k, m in enumerate(members):
        ckpt.finish_save(m.manager)  # a step in flight is not listed until complete
        if m.diverged or step in m.manager.all_steps():
            continue
        run_state = jax.tree.map(lambda a: a[k], state)  # new arrays: the step donates none
        ckpt.save(m.manager, run_state, m.cfg, m.data.tokenizer, step, m.last_val,
                  data=m.data.identity, wait=False)


def close(members: list[Member]) -> None:
    for m in members:
        if m.manager is not None:  # nothing in flight unless the group ends with an error
            ckpt.close(m.manager, quiet=True)
        if m.log is not None:
            m.log.close()
        m.lock.release()


def best_label(latest: dict) -> str:
    """The run with the lowest latest validation loss, for the progress bar."""
    finite = {k: v for k, v in latest.items() if math.isfinite(v)}
    if not finite:
        return "-"
    name = min(finite, key=finite.get)
    return f"{name} {finite[name]:.3f}"
