"""The training loop: setup, then batch -> step -> log -> maybe evaluate -> maybe save.

    train_and_evaluate(cfg, data_path, run_dir) -> summary dict

"Step" means the optimizer step everywhere a user sees it (logs, checkpoints,
max_steps); one step is grad_accum micro-batches. Micro-batch m is
get_batch(train, seed, m) and its dropout key fold_in(rng, m), so resuming from
a checkpoint replays the same steps as an uninterrupted run, bit for bit on CPU.
The batches are cut on the device (train_lib.ResidentBatches): the training
tokens and the validation windows are uploaded once, not per step.

The loop's named pieces (each tested on its own): run_dir.inspect (what the run
directory holds), metrics.MetricsBuffer (device metrics -> one host sync per
log interval, and the finiteness check), metrics.Logger (metrics.jsonl and
TensorBoard), StopOnSigint (Ctrl-C stops between optimizer steps).
"""

import dataclasses
import math
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import data as data_lib
from chatgot_jax import run_dir as run_dir_lib
from chatgot_jax import train_lib
from chatgot_jax.errors import Diverged, RunError, UserError
from chatgot_jax.metrics import Logger, MetricsBuffer


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


def initial_state(cfg, mesh, manager, resuming: bool):
    """(state, shardings): restored straight into the shardings, or freshly initialised."""
    if not resuming:
        return train_lib.create_sharded_state(cfg, mesh)
    abstract = train_lib.abstract_state(cfg)
    shardings = train_lib.state_shardings(mesh, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    return ckpt.restore_newest(manager, abstract), shardings


def validation_batches(data: RunData, batch_size: int, mesh) -> list:
    """The fixed validation windows as device batches, uploaded once per run."""
    rows = train_lib.process_rows(batch_size)
    batches = []
    for i in range(0, len(data.val_x), batch_size):
        bx, by = data.val_x[i:i + batch_size], data.val_y[i:i + batch_size]
        batches.append(train_lib.put_batch(mesh, bx[rows.start:rows.stop],
                                           by[rows.start:rows.stop]))
    return batches


def evaluate(eval_step, params, batches: list) -> float:
    """Mean loss over the validation batches, in nats per character."""
    return float(np.mean(jax.device_get([eval_step(params, x, y) for x, y in batches])))


def sample_text(params, cfg, data: RunData, n_tokens: int | None = None) -> str:
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


@dataclasses.dataclass
class Run:
    """Everything the loop works with, made by setup()."""

    cfg: config_lib.Config
    run_dir: pathlib.Path
    data: RunData
    mesh: jax.sharding.Mesh
    manager: object  # the checkpoint manager
    state: dict
    hyper: dict  # the train step's hyper-parameters (optim.hyperparams)
    train_step: object  # train_lib.make_resident_train_step: it cuts its own batch
    batches: train_lib.ResidentBatches
    eval_step: object
    val_batches: list  # validation_batches, on the device
    log: Logger
    step: int  # optimizer steps done
    t_start: float
    best_val: float = math.inf
    last_val: float | None = None  # validation loss at `step`, if evaluated there
    interrupted: bool = False


def train_and_evaluate(cfg: config_lib.Config, data_path: str | None, run_dir: str,
                       resume: bool = False, command: list[str] | None = None) -> dict:
    """Trains (or resumes) the run in run_dir up to train.max_steps -> summary dict.

    A run directory holding a run of other training settings is refused
    (run_dir.ConfigDrift) unless resume=True; a finished run is left as it is.
    `command` (default sys.argv) goes into the run's provenance.
    """
    run_dir = pathlib.Path(run_dir)
    lock = run_dir_lib.RunLock(run_dir)
    try:
        if jax.process_index() == 0 and run_dir.is_dir():
            lock.acquire()  # a second writer stops here, before anything is read
        cfg, existing, data = prepare(cfg, data_path, run_dir, resume)
        if existing.step is not None and existing.step >= cfg.train.max_steps:
            return nothing_to_do(run_dir, existing.step, cfg)
        run = setup(cfg, existing, data, run_dir, lock, command)
        try:
            train(run)
            summary = finish(run)
        except BaseException:
            ckpt.close(run.manager, quiet=True)  # the run's own error is the one to report
            raise
        ckpt.close(run.manager)
        return summary
    finally:
        lock.release()


def prepare(cfg, data_path, run_dir: pathlib.Path, resume: bool):
    """-> (cfg, run_dir.Existing, RunData), writing nothing; refuses config drift."""
    existing = run_dir_lib.inspect(run_dir, cfg, resume)
    cfg, data = prepare_data(cfg, data_path, existing.tokenizer)
    if existing.config is not None:
        changes = run_dir_lib.training_changes(existing, cfg, data.identity)
        if changes and not resume:
            raise run_dir_lib.ConfigDrift(run_dir, changes)
    return cfg, existing, data


def nothing_to_do(run_dir: pathlib.Path, step: int, cfg) -> dict:
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:
        best = ckpt.best_checkpoint(manager)
    finally:
        manager.close()
    if jax.process_index() == 0:
        print(f"nothing to do: {run_dir} is already at step {step} (train.max_steps "
              f"{cfg.train.max_steps}); raise --max-steps to train further")
    return summary_of(run_dir, step, cfg, best[0] if best else None, wall_time_s=0.0)


def setup(cfg, existing: run_dir_lib.Existing, data: RunData, run_dir: pathlib.Path,
          lock: run_dir_lib.RunLock, command: list[str] | None = None) -> Run:
    """Mesh, run directory files, train state and compiled steps: everything the loop needs."""
    t_start = time.time()
    mesh = train_lib.make_mesh(cfg.mesh)
    train_lib.check_batch(cfg, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir_lib.create(run_dir, lock)
        run_dir_lib.write_start(run_dir, cfg, data.tokenizer, existing,
                                run_dir_lib.provenance(data.identity, list(mesh.devices.flat),
                                                       command))
    manager = ckpt.make_manager(run_dir, keep=cfg.train.keep, async_saves=True)
    state, shardings = initial_state(cfg, mesh, manager, resuming=bool(existing.steps))
    step = train_lib.optimizer_step(state)
    batches = train_lib.ResidentBatches(cfg, mesh, data.train_tokens,
                                        config_lib.seed_of(cfg.train, "data"))
    run = Run(cfg, run_dir, data, mesh, manager, state, train_lib.train_hyperparams(cfg, mesh),
              train_lib.make_resident_train_step(cfg, mesh, shardings), batches,
              train_lib.make_eval_step(cfg, mesh, shardings),
              validation_batches(data, cfg.train.batch_size, mesh),
              Logger(run_dir, is_main, start_step=step, hparams=run_dir_lib.flat(cfg)),
              step, t_start)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    t = cfg.train
    run.log.print(f"model: {n_params:,} parameters | vocab {data.tokenizer.vocab_size} | "
                  f"{len(data.train_tokens):,} train / {data.val_chars:,} val chars | "
                  f"{mesh.devices.size} device(s) {jax.devices()[0].platform} | batch "
                  f"{t.batch_size} x {t.grad_accum} accum x {cfg.model.max_seq_length} | "
                  f"run dir {run_dir}"
                  + (f" | resuming at step {step}" if existing.steps else ""))
    changes = existing.config and run_dir_lib.config_changes(existing.config, cfg)
    if changes:
        listed = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        run.log.print(f"settings changed from step {step} on: {listed}")
    return run


def train(run: Run) -> None:
    """The loop: batches -> train step -> log -> maybe evaluate and sample -> maybe save."""
    tcfg = run.cfg.train
    metrics = MetricsBuffer(tcfg.batch_size * run.cfg.model.max_seq_length)
    bar = tqdm(total=tcfg.max_steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not run.log.enabled)
    try:
        with StopOnSigint() as stop:
            while run.step < tcfg.max_steps and not stop.requested:
                for micro in range(run.step * tcfg.grad_accum, (run.step + 1) * tcfg.grad_accum):
                    run.state, m = run.train_step(run.state, run.hyper,
                                                  *run.batches.for_micro_step(micro))
                    if (first_s := metrics.add(m)) is not None:
                        run.log.write({"step": run.step, "first_step_s": first_s})
                run.step, run.last_val = run.step + 1, None
                bar.update(1)
                end_of_run = run.step == tcfg.max_steps
                evaluate_now = run.step % tcfg.eval_every == 0 or end_of_run
                save_now = run.step % tcfg.save_every == 0 or end_of_run
                if evaluate_now or save_now:
                    log_metrics(run, metrics, bar)  # never evaluate or save a NaN state
                elif run.step % tcfg.log_every == 0:
                    log_metrics(run, metrics, bar, lagged=True)  # no wait on the device
                if evaluate_now:
                    evaluate_and_sample(run)
                if save_now:
                    save(run)
                if evaluate_now or save_now:
                    metrics.restart_clock()
            if stop.requested:
                stop_and_save(run, metrics, bar, whole=True)
    except KeyboardInterrupt:  # a second Ctrl-C, maybe in the middle of a step
        stop_and_save(run, metrics, bar, whole=False)
    except Diverged as e:
        try:
            ckpt.finish_save(run.manager)  # a checkpoint from before the divergence
        except RunError:  # its write failed; the newest complete one is named below
            pass
        kept = run.manager.latest_step()
        raise Diverged(f"{e}; nothing was saved after it, the last good checkpoint is "
                       f"{'step ' + str(kept) if kept is not None else 'none'} in "
                       f"{run.run_dir}: lower the learning rate (train.lr) and resume") from None
    finally:
        bar.close()
        run.log.close()


def log_metrics(run: Run, metrics: MetricsBuffer, bar, lagged: bool = False) -> None:
    """Logs what metrics.flush(lagged) fetches; on Diverged, the steps before it first."""
    try:
        records = metrics.flush(lagged)
    except Diverged as e:
        for record in e.records:
            log_record(run, record, bar)
        raise
    for record in records:
        log_record(run, record, bar)


def log_record(run: Run, record: dict, bar) -> None:
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                    lr=f"{record['lr']:.2e}")
    run.log.write({**record, "tokens": train_lib.tokens_trained(run.cfg, record["step"]),
                   "time": time.time() - run.t_start})


def evaluate_and_sample(run: Run) -> None:
    run.last_val = evaluate(run.eval_step, run.state["params"], run.val_batches)
    run.best_val = min(run.best_val, run.last_val)
    bpc = run.last_val / math.log(2)
    run.log.write({"step": run.step, "val_loss": run.last_val, "val_bpc": bpc,
                   "time": time.time() - run.t_start})
    run.log.print(f"step {run.step}: val loss {run.last_val:.4f} nats/char, "
                  f"{bpc:.4f} bits/char")
    sample = sample_text(run.state["params"], run.cfg, run.data)
    if sample:
        run.log.print(f"--- sample ---\n{sample}\n--------------")
        run.log.text("sample", sample, run.step)


def save(run: Run, wait: bool = False) -> None:
    """Writes checkpoint run.step in the background (training goes on) once the previous
    one is complete, or at once with wait=True; a failed write stops the run (RunError)."""
    ckpt.save(run.manager, run.state, run.cfg, run.data.tokenizer, run.step, run.last_val,
              data=run.data.identity, wait=wait)


def stop_and_save(run: Run, metrics: MetricsBuffer, bar, whole: bool) -> None:
    """After Ctrl-C: log and save the state if it is whole (between optimizer steps,
    not donated to an interrupted step), then say where the run can resume."""
    run.interrupted = True
    if not whole:
        step = step_between_updates(run.state)
        whole = step is not None
        run.step = step if whole else run.step
    if not whole:
        metrics.drop()
    log_metrics(run, metrics, bar)  # raises Diverged rather than save a NaN state
    ckpt.finish_save(run.manager)  # a step in flight is not listed until complete
    if whole and run.step not in run.manager.all_steps():
        save(run, wait=True)
    saved = run.manager.latest_step()
    if saved == run.step:
        run.log.print(f"interrupted at step {run.step}: checkpoint saved in {run.run_dir}; "
                      f"run the same command to resume")
    else:
        since = f"step {saved}" if saved is not None else "the start"
        run.log.print(f"interrupted at step {run.step}: nothing saved since {since}; "
                      f"run the same command to resume from there")


def step_between_updates(state) -> int | None:
    """The optimizer step of a state that sits between two optimizer steps; None for
    a state donated to an unfinished step or in the middle of gradient accumulation."""
    if any(x.is_deleted() for x in jax.tree.leaves(state)):
        return None
    opt_state = state["opt_state"]
    return None if int(opt_state.mini_step) else int(opt_state.gradient_step)


FINAL_SAMPLE_TOKENS = 300


def final_sample(run: Run, best: tuple[float, int] | None) -> None:
    """At the end of a run, a longer sample from its best checkpoint."""
    if not run.cfg.train.sample_tokens or best is None or run.interrupted:
        return
    val, step = best
    params = run.state["params"]
    if step != run.step:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), run.state)
        params = ckpt.restore_state(run.manager, step, abstract)["params"]
    text = sample_text(params, run.cfg, run.data, FINAL_SAMPLE_TOKENS)
    run.log.print(f"--- the best checkpoint's sample (step {step}, val {val:.4f} nats/char, "
                  f"{val / math.log(2):.4f} bits/char) ---\n{text}\n--------------")


def finish(run: Run) -> dict:
    """The end-of-run summary; its best validation loss is over the run's checkpoints."""
    ckpt.finish_save(run.manager)
    best = ckpt.best_checkpoint(run.manager)
    final_sample(run, best)
    best_val = min(run.best_val, best[0] if best else math.inf)
    return summary_of(run.run_dir, run.step, run.cfg,
                      best_val if math.isfinite(best_val) else None,
                      wall_time_s=time.time() - run.t_start, interrupted=run.interrupted,
                      prompt=run.data.prompt)


def summary_of(run_dir, step: int, cfg, best_val: float | None, wall_time_s: float,
               interrupted: bool = False, prompt: str | None = None) -> dict:
    """The summary dict; with a prompt (a run that trained), process 0 prints it."""
    summary = {
        "steps": step, "tokens": train_lib.tokens_trained(cfg, step), "wall_time_s": wall_time_s,
        "best_val_loss": best_val,
        "best_val_bpc": None if best_val is None else best_val / math.log(2),
        "checkpoint": str(run_dir / ckpt.CKPT_SUBDIR), "interrupted": interrupted,
    }
    if prompt is not None and jax.process_index() == 0:
        bpc = "n/a" if best_val is None else f"{summary['best_val_bpc']:.4f}"
        print(f"done: {step} steps, {summary['tokens']:,} tokens, {wall_time_s:.0f} s, "
              f"best val {bpc} bits/char\n"
              f"checkpoints: {summary['checkpoint']}\n"
              f"next: python sample.py --checkpoint {run_dir} --prompt \"{prompt}\"")
    return summary
