"""The training loop, for one run or a group of runs that share shapes.

    train_and_evaluate(cfg, data_path, run_dir) -> summary dict        (train.py: one run)
    train_runs([(name, cfg, run_dir), ...], data_path) -> [summary]    (a sweep's group)

Setup, then: batch -> step -> log -> maybe evaluate -> maybe save. A group of R
runs is one program: their states stacked on a run axis and one train step
vmapped over it (train_lib.Program); one run's state and step are not vmapped.
Every run keeps its own config values that do not change shapes (lr and
schedule, betas, decay, clipping, dropout rate, seeds), batches, dropout keys
and run directory, so run k computes what it computes when trained alone (up
to the float order of batched matmuls).

"Step" means the optimizer step everywhere a user sees it (logs, checkpoints,
max_steps); one step is grad_accum micro-batches. Micro-batch m is
get_batch(train, seed, m) and its dropout key fold_in(rng, m), so resuming from
a checkpoint replays the same steps as an uninterrupted run, bit for bit on CPU.
The batches are cut on the device (train_lib.ResidentBatches).

A run whose loss or gradient becomes non-finite is dropped (never evaluated or
saved again) and the others go on; for one run that ends the training, and
train_and_evaluate raises Diverged naming the last good checkpoint. Ctrl-C
stops between optimizer steps and saves every run (StopOnSigint).
"""

import dataclasses
import math
import shlex
import signal
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import run_dir as run_dir_lib
from chatgot_jax import runs as runs_lib
from chatgot_jax import train_lib
from chatgot_jax.errors import Diverged, RunError, UserError
from chatgot_jax.metrics import MetricsBuffer
from chatgot_jax.model import matmul_dtype
from chatgot_jax.runs import Member


class StopOnSigint:
    """Ctrl-C requests a stop that the loop honours between optimizer steps.

    A KeyboardInterrupt raised inside the train step would lose its output after
    its input state was donated. A second Ctrl-C raises KeyboardInterrupt at once.
    Only the main thread can install a handler; elsewhere this does nothing.
    """

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


@dataclasses.dataclass
class Group:
    """Everything the loop works with, made by setup()."""

    members: list[Member]
    cfg: config_lib.Config  # what the runs share (members[0].cfg)
    mesh: jax.sharding.Mesh
    program: train_lib.Program
    state: dict  # one run's train state, or the runs' states stacked
    batches: train_lib.ResidentBatches
    val_batches: list  # validation_batches, on the device
    step: int  # optimizer steps done
    t_start: float
    interrupted: bool = False
    start_step: int = 0  # the step this start resumed from

    def active(self) -> list[tuple[int, Member]]:
        return [(k, m) for k, m in enumerate(self.members) if m.problem is None]


def train_and_evaluate(cfg: config_lib.Config, data_path: str | None, run_dir: str,
                       resume: bool = False, command: list[str] | None = None) -> dict:
    """Trains (or resumes) the run in run_dir up to train.max_steps -> summary dict.

    A run directory holding a run of other training settings is refused
    (run_dir.ConfigDrift) unless resume=True; a finished run is left as it is.
    `command` (default sys.argv) goes into the run's provenance. A run whose loss
    became non-finite raises Diverged.
    """
    [summary] = train_runs([(str(run_dir), cfg, run_dir)], data_path, resume, command)
    if summary["diverged"]:
        raise Diverged(f"{summary['diverged']}: lower the learning rate (train.lr) and resume")
    return summary


def train_runs(runs, data_path: str | None, resume: bool = False,
               command: list[str] | None = None) -> list[dict]:
    """Trains (or resumes) [(name, cfg, run_dir)], runs whose configs share shapes, as one
    program up to train.max_steps -> a summary dict per run ("diverged" says why a run
    stopped early). The group starts from the newest step all of its runs have."""
    members = runs_lib.open_members(runs, data_path, resume)
    failed = True
    try:
        if all(m.existing.step is not None and m.existing.step >= m.cfg.train.max_steps
               for m in members):
            summaries = [nothing_to_do(m) for m in members]
        else:
            group = setup(members, command)
            train(group)
            summaries = finish(group)
        failed = False
        return summaries
    finally:
        runs_lib.close_members(members, quiet=failed)  # a failure's own error is reported


def nothing_to_do(m: Member) -> dict:
    with ckpt.make_manager(m.run_dir, read_only=True) as manager:
        best = ckpt.best_checkpoint(manager)
    if jax.process_index() == 0:
        print(f"nothing to do: {m.run_dir} is already at step {m.existing.step} "
              f"(train.max_steps {m.cfg.train.max_steps}); raise --max-steps to train further")
    return summary_of(m, m.existing.step, best[0] if best else None, wall_time_s=0.0)


def setup(members: list[Member], command) -> Group:
    """Mesh, run directories, train states and compiled steps: everything the loop needs."""
    t_start, cfg = time.time(), members[0].cfg
    if len(members) > 1 and jax.process_count() > 1:
        raise UserError("a group of runs trains in one process: start it without --coordinator")
    mesh = train_lib.make_mesh(cfg.mesh)
    train_lib.check_batch(cfg, mesh)
    runs_lib.open_outputs(members)
    step, states = runs_lib.restore(members, mesh)
    runs_lib.start_outputs(members, step, mesh, command)
    program = train_lib.Program([m.cfg for m in members], mesh)
    seeds = [config_lib.seed_of(m.cfg.train, "data") for m in members]
    data = members[0].data  # the group shares its corpus and validation windows
    group = Group(members, cfg, mesh, program, program.stack(states),
                  train_lib.ResidentBatches(cfg, mesh, data.train_tokens,
                                            seeds[0] if len(seeds) == 1 else seeds),
                  validation_batches(data, cfg.train.batch_size, mesh), step, t_start,
                  start_step=step)
    for m in members:
        m.saved_step = step if step else None
    print_header(group)
    return group


def print_header(group: Group) -> None:
    cfg, data, t = group.cfg, group.members[0].data, group.cfg.train
    n_params = sum(x.size for x in jax.tree.leaves(train_lib.abstract_state(cfg)["params"]))
    where = (f"run dir {group.members[0].run_dir}" if len(group.members) == 1
             else f"{len(group.members)} runs")
    if jax.process_index() == 0:
        tqdm.write(f"model: {n_params:,} parameters | vocab {data.tokenizer.vocab_size} | "
                   f"{len(data.train_tokens):,} train / {data.val_chars:,} val chars | "
                   f"{group.mesh.devices.size} device(s) {jax.devices()[0].platform}, "
                   f"{matmul_dtype(cfg.model)} products | batch "
                   f"{t.batch_size} x {t.grad_accum} accum x {cfg.model.max_seq_length} | "
                   f"{where}" + (f" | resuming at step {group.step}" if group.step else ""))
    for m in group.members:
        changes = m.existing.config and run_dir_lib.config_changes(m.existing.config, m.cfg)
        if changes:
            listed = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
            m.log.print(f"settings changed from step {group.step} on: {listed}")


def validation_batches(data: runs_lib.RunData, batch_size: int, mesh) -> list:
    """The fixed validation windows as device batches, uploaded once per run."""
    rows = train_lib.process_rows(batch_size)
    batches = []
    for i in range(0, len(data.val_x), batch_size):
        bx, by = data.val_x[i:i + batch_size], data.val_y[i:i + batch_size]
        batches.append(train_lib.put_batch(mesh, bx[rows.start:rows.stop],
                                           by[rows.start:rows.stop]))
    return batches


def train(group: Group) -> None:
    """The loop: batches -> train step -> log -> maybe evaluate and sample -> maybe save."""
    tcfg = group.cfg.train
    metrics = MetricsBuffer(tcfg.batch_size * group.cfg.model.max_seq_length)
    bar = tqdm(total=tcfg.max_steps, initial=group.step, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        with StopOnSigint() as stop:
            while group.step < tcfg.max_steps and group.active() and not stop.requested:
                for micro in range(group.step * tcfg.grad_accum,
                                   (group.step + 1) * tcfg.grad_accum):
                    group.state, m = group.program.train_step(
                        group.state, group.program.hyper, *group.batches.for_micro_step(micro))
                    if (first_s := metrics.add(m)) is not None:
                        for member in group.members:
                            member.log.write({"step": group.step, "first_step_s": first_s})
                group.step += 1
                bar.update(1)
                for member in group.members:
                    member.last_val = None
                end_of_run = group.step == tcfg.max_steps
                evaluate_now = group.step % tcfg.eval_every == 0 or end_of_run
                save_now = group.step % tcfg.save_every == 0 or end_of_run
                if evaluate_now or save_now:
                    log(group, metrics.flush(), bar)  # never evaluate or save a NaN state
                elif group.step % tcfg.log_every == 0:
                    log(group, metrics.flush(lagged=True), bar)  # no wait on the device
                if evaluate_now:
                    evaluate_and_sample(group)
                if save_now:
                    save(group)
                if evaluate_now or save_now:
                    metrics.restart_clock()
            if stop.requested:
                stop_and_save(group, metrics, bar, whole=True)
    except KeyboardInterrupt:  # a second Ctrl-C, maybe in the middle of a step
        stop_and_save(group, metrics, bar, whole=False)
    finally:
        bar.close()


def log(group: Group, records: list[dict], bar) -> None:
    """Writes each run's part of the records; a run that became non-finite is dropped."""
    for record in records:
        for k, m in group.active():
            if not record["finite"][k]:
                drop(group, m, record["problems"][k])
                continue
            m.log.write({"step": record["step"], "loss": float(record["loss"][k]),
                         "lr": float(record["lr"][k]), "tokens_per_s": record["tokens_per_s"],
                         "grad_norm": float(record["grad_norm"][k]),
                         "tokens": train_lib.tokens_trained(m.cfg, record["step"]),
                         "time": time.time() - group.t_start})
        if group.active():
            k, m = min(group.active(), key=lambda km: record["loss"][km[0]])
            bar.set_postfix(loss=f"{record['loss'][k]:.3f}",
                            tok_s=f"{record['tokens_per_s']:,.0f}", lr=f"{record['lr'][k]:.2e}",
                            **({"best": m.name} if len(group.members) > 1 else {}))


def drop(group: Group, m: Member, problem: str) -> None:
    """Stops training run m: nothing of it is evaluated or saved after `problem`."""
    try:
        ckpt.finish_save(m.manager)  # a checkpoint from before the divergence
    except RunError:  # its write failed; the newest complete one is named below
        pass
    kept = m.manager.latest_step()
    m.problem = (f"{problem}; nothing was saved after it, the last good checkpoint is "
                 f"{'step ' + str(kept) if kept is not None else 'none'} in {m.run_dir}")
    if len(group.members) > 1:
        m.log.print(f"stopped: {m.problem}")


def evaluate_and_sample(group: Group) -> None:
    """Every run's mean loss over the validation batches, in nats per character (and a
    sample, if train.sample_tokens)."""
    losses = jax.device_get([group.program.eval_step(group.state["params"], x, y)
                             for x, y in group.val_batches])
    per_run = np.reshape(np.stack(losses), (len(losses), -1))  # (batches, runs)
    for k, m in group.active():
        m.last_val = float(np.mean(np.ascontiguousarray(per_run[:, k])))
        m.best_val = min(m.best_val, m.last_val)
        bpc = m.last_val / math.log(2)
        m.log.write({"step": group.step, "val_loss": m.last_val, "val_bpc": bpc,
                     "time": time.time() - group.t_start})
        m.log.print(f"step {group.step}: val loss {m.last_val:.4f} nats/char, "
                    f"{bpc:.4f} bits/char")
        if m.cfg.train.sample_tokens and (sample := sample_text(
                group.program.of_run(group.state, k)["params"], m.cfg, m.data)):
            m.log.print(f"--- sample ---\n{sample}\n--------------")
            m.log.text("sample", sample, group.step)


def sample_text(params, cfg, data: runs_lib.RunData, n_tokens: int | None = None) -> str:
    """A sample of n_tokens (default train.sample_tokens; prompt included) for the log,
    or ""; with several processes, process 0 samples alone."""
    n_tokens = cfg.train.sample_tokens if n_tokens is None else n_tokens
    if n_tokens == 0:
        return ""
    from chatgot_jax import sampling  # noqa: PLC0415 (keeps the sampler's compile lazy)
    if jax.process_count() > 1:  # every process takes part in the gather
        from jax.experimental import multihost_utils  # noqa: PLC0415
        params = jax.device_put(multihost_utils.process_allgather(params, tiled=True),
                                jax.local_devices()[0])
        if jax.process_index() != 0:
            return ""
    text = sampling.generate(params, cfg.model, data.tokenizer, data.prompt,
                             max_new_tokens=n_tokens, temperature=0.8, seed=cfg.train.seed)[0]
    return data.prompt + text


def save(group: Group) -> None:
    """Each run's state at group.step, written in the background (training goes on) once
    its previous checkpoint is complete; a failed write stops the training (RunError)."""
    for k, m in group.active():
        if m.saved_step != group.step:
            m.saved_step = group.step  # first: a Ctrl-C inside save() must not save it again
            ckpt.save(m.manager, group.program.of_run(group.state, k), m.cfg, m.data.tokenizer,
                      group.step, m.last_val, data=m.data.identity, wait=False)


def stop_and_save(group: Group, metrics: MetricsBuffer, bar, whole: bool) -> None:
    """After Ctrl-C: log and save the state if it is whole (between optimizer steps,
    not donated to an interrupted step), then say where each run can resume."""
    group.interrupted = True
    if not whole:
        step = step_between_updates(group.state)
        whole = step is not None
        group.step = step if whole else group.step
    if not whole:
        metrics.drop()
    log(group, metrics.flush(), bar)  # drops a non-finite run rather than save it
    if whole:
        save(group)
    for _, m in group.active():
        ckpt.finish_save(m.manager)  # a step in flight is not listed until complete
        saved = m.manager.latest_step()
        if saved == group.step:
            m.log.print(f"interrupted at step {group.step}: checkpoint saved in {m.run_dir}; "
                        f"run the same command to resume")
        else:
            since = f"step {saved}" if saved is not None else "the start"
            m.log.print(f"interrupted at step {group.step}: nothing saved since {since}; "
                        f"run the same command to resume from there")


def step_between_updates(state) -> int | None:
    """The optimizer step of a state that sits between two optimizer steps; None for
    a state donated to an unfinished step or in the middle of gradient accumulation.
    A group's runs share their step."""
    if any(x.is_deleted() for x in jax.tree.leaves(state)):
        return None
    opt_state = state["opt_state"]
    mini, step = jax.device_get((opt_state.mini_step, opt_state.gradient_step))
    return None if np.any(mini) else int(np.max(step))


FINAL_SAMPLE_TOKENS = 300


def final_sample(group: Group, k: int, m: Member, best: tuple[float, int] | None) -> None:
    """At the end of a run, a longer sample from its best checkpoint."""
    if not m.cfg.train.sample_tokens or best is None or group.interrupted:
        return
    val, step = best
    params = group.program.of_run(group.state, k)["params"]
    if step != group.step:
        abstract = train_lib.sharded_abstract_state(m.cfg, group.mesh)
        params = ckpt.restore_state(m.manager, step, abstract)["params"]
    text = sample_text(params, m.cfg, m.data, FINAL_SAMPLE_TOKENS)
    m.log.print(f"--- the best checkpoint's sample (step {step}, val {val:.4f} nats/char, "
                f"{val / math.log(2):.4f} bits/char) ---\n{text}\n--------------")


def finish(group: Group) -> list[dict]:
    """Each run's summary; its best validation loss is over the run's checkpoints. One
    run that trained prints it, with the command that samples from it."""
    for m in group.members:
        ckpt.finish_save(m.manager)
    summaries = []
    for k, m in enumerate(group.members):
        best = ckpt.best_checkpoint(m.manager)
        if m.problem is None:
            final_sample(group, k, m, best)
        best_val = min(m.best_val, best[0] if best else math.inf)
        wall = time.time() - group.t_start
        summaries.append(summary_of(m, group.step, best_val if math.isfinite(best_val) else None,
                                    wall_time_s=wall, interrupted=group.interrupted))
        trained = (train_lib.tokens_trained(m.cfg, group.step)
                   - train_lib.tokens_trained(m.cfg, group.start_step))
        summaries[-1]["tokens_per_s"] = trained / wall  # compilation, evaluation included
    m, s = group.members[0], summaries[0]
    if len(group.members) == 1 and m.problem is None and jax.process_index() == 0:
        bpc = "n/a" if s["best_val_bpc"] is None else f"{s['best_val_bpc']:.4f}"
        print(f"done: {s['steps']} steps, {s['tokens']:,} tokens, {s['wall_time_s']:.0f} s "
              f"({s['tokens_per_s']:,.0f} tokens/s this start, compilation and evaluation "
              f"included), best val {bpc} bits/char\n"
              f"checkpoints: {s['checkpoint']}\n"  # the prompt is the run's own (prompt.txt):
              f"next: chatgot-sample --checkpoint {shlex.quote(str(m.run_dir))}")  # one line
    return summaries


def summary_of(m: Member, step: int, best_val: float | None, wall_time_s: float,
               interrupted: bool = False) -> dict:
    return {
        "steps": step, "tokens": train_lib.tokens_trained(m.cfg, step),
        "wall_time_s": wall_time_s, "best_val_loss": best_val,
        "best_val_bpc": None if best_val is None else best_val / math.log(2),
        "checkpoint": str(m.run_dir / ckpt.CKPT_SUBDIR), "interrupted": interrupted,
        "diverged": m.problem, "tokens_per_s": None,
    }
