"""The training loop: data -> sharded state -> steps -> eval -> checkpoints, resumable exactly.

    train_and_evaluate(cfg, data_path, run_dir) -> summary dict

Every micro-batch is get_batch(train, seed, step) and every dropout key is
fold_in(rng, step), so resuming from a checkpoint replays the same steps as an
uninterrupted run, bit for bit on CPU.
"""

import dataclasses
import json
import math
import os
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
from chatgot_jax import train_lib
from chatgot_jax.errors import RunError, UserError


class Diverged(RunError):
    """The loss became NaN or infinite: training stops before saving that state."""


class Logger:
    """metrics.jsonl and TensorBoard event files in the run dir, on process 0.

    Prints go through tqdm so the bar stays intact. TensorBoard gets the fields
    named in TAGS as scalars at the record's step (train/loss, val/bpc, ...) and
    the samples as text; on resume, events after the resumed step are purged so
    the curves do not double back.
    """

    TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
            "grad_norm": "train/grad_norm", "val_loss": "val/loss", "val_bpc": "val/bpc"}

    def __init__(self, run_dir: pathlib.Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (import cost)
            self.tb = SummaryWriter(str(run_dir), purge_step=start_step or None, flush_secs=10)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for name, tag in self.TAGS.items():
            if name in record and math.isfinite(record[name]):
                self.tb.add_scalar(tag, record[name], record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def inspect_run_dir(run_dir: pathlib.Path, cfg: config_lib.Config, resume: bool):
    """Checks --out without writing; -> (saved tokenizer or None, checkpoint steps, newest first).

    The saved config and tokenizer come from the newest checkpoint whose metadata
    reads; a run of another model shape is refused before anything is written.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    existing = next(p for p in (run_dir, *run_dir.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create --out {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {run_dir} is not writable ({existing} is read-only): "
                        f"choose another directory")
    steps = sorted(ckpt.existing_steps(run_dir), reverse=True)
    if not steps:
        if resume:
            raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from")
        return None, []
    manager = ckpt.make_manager(run_dir, read_only=True)
    meta = None
    for step in steps:
        try:
            meta = ckpt.read_meta(manager, step)
            break
        except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try an older one)
            ckpt.warn_unreadable(run_dir, step, e)
    manager.close()
    if meta is None:
        raise UserError(f"no checkpoint in {run_dir} is readable: move it away to start over")
    saved = config_lib.from_dict(meta["config"], source=f"checkpoint in {run_dir}")
    diff = [f"{k} {getattr(saved.model, k)} (asked {getattr(cfg.model, k)})"
            for k in config_lib.SHAPE_FIELDS
            if k != "vocab_size" and getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise UserError(f"{run_dir} holds a run of another model shape ({', '.join(diff)}): "
                        f"use another --out, or the same model settings to resume")
    tokenizer = data_lib.CharTokenizer.from_json(json.dumps(meta["tokenizer"]))
    return tokenizer, steps


def sample_prompt(val_text: str) -> str:
    """A speaker prompt like 'HAMLET: ' from the validation text, else its first line."""
    for line in val_text.splitlines()[1:200]:
        head, sep, _ = line.partition(": ")
        if sep and 0 < len(head) <= 30 and head.upper() == head:
            return head + sep
    return val_text[:16]


def evaluate(eval_step, params, val_x, val_y, batch_size: int, mesh) -> float:
    rows = train_lib.process_rows(batch_size)
    losses = []
    for i in range(0, len(val_x), batch_size):
        bx, by = val_x[i:i + batch_size], val_y[i:i + batch_size]
        x, y = train_lib.put_batch(mesh, bx[rows.start:rows.stop], by[rows.start:rows.stop])
        losses.append(eval_step(params, x, y))
    return float(np.mean(jax.device_get(losses)))


def train_and_evaluate(cfg: config_lib.Config, data_path: str | None, run_dir: str,
                       resume: bool = False) -> dict:
    t_start = time.time()
    run_dir = pathlib.Path(run_dir)
    is_main = jax.process_index() == 0
    saved_tokenizer, steps = inspect_run_dir(run_dir, cfg, resume)

    text = data_lib.load_corpus(data_path)
    tokenizer = saved_tokenizer or data_lib.CharTokenizer.from_text(text)
    if saved_tokenizer is not None and (unknown := tokenizer.unknown_chars(text)):
        tqdm.write(f"warning: {len(unknown)} corpus characters are not in the saved "
                   f"vocabulary and train as the unknown id: {unknown[:20]!r}")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    tcfg, seq_len = cfg.train, cfg.model.max_seq_length
    tokens = tokenizer.encode(text)
    train_tokens, val_tokens = data_lib.split_tokens(tokens, tcfg.val_fraction, min_len=seq_len + 1)
    n_eval = math.ceil(tcfg.eval_windows / tcfg.batch_size) * tcfg.batch_size
    val_x, val_y = data_lib.eval_windows(val_tokens, n=n_eval, seq_len=seq_len)
    prompt = sample_prompt(text[len(train_tokens):])

    mesh = train_lib.make_mesh(cfg.mesh)
    train_lib.check_batch(cfg, mesh)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        tokenizer.save(run_dir / "tokenizer.json")

    manager = ckpt.make_manager(run_dir, keep=tcfg.keep)
    if steps:  # restore straight into the shardings: no throw-away initialisation
        abstract = train_lib.abstract_state(cfg)
        shardings = train_lib.state_shardings(mesh, abstract)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, shardings)
        state = ckpt.restore_newest_readable(manager, steps, abstract)
    else:
        state, shardings = train_lib.create_sharded_state(cfg, mesh)
    train_step = train_lib.make_train_step(cfg, mesh, shardings)
    eval_step = train_lib.make_eval_step(cfg, mesh, shardings)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    micro = int(jax.device_get(state["step"]))
    opt_step = micro // tcfg.grad_accum
    log = Logger(run_dir, is_main, start_step=opt_step)
    tokens_per_micro = tcfg.batch_size * seq_len
    log.print(f"model: {n_params:,} parameters | vocab {tokenizer.vocab_size} | "
              f"{len(train_tokens):,} train / {len(val_tokens):,} val chars | "
              f"{mesh.devices.size} device(s) {jax.devices()[0].platform} | batch "
              f"{tcfg.batch_size} x {tcfg.grad_accum} accum x {seq_len} | run dir {run_dir}"
              + (f" | resuming at step {opt_step}" if steps else ""))

    rows = train_lib.process_rows(tcfg.batch_size)

    def batch(step):
        x, y = data_lib.get_batch(train_tokens, seed=tcfg.seed, step=step,
                                  batch_size=tcfg.batch_size, seq_len=seq_len, rows=rows)
        return train_lib.put_batch(mesh, x, y)

    best_val, last_val = math.inf, None
    pending, t_log, interrupted = [], time.time(), False
    compile_s, untimed = None, 0  # wall time of the first (compiling) step

    def flush():
        """Syncs the pending metrics to the host, logs them, and stops on a non-finite loss."""
        nonlocal pending, t_log, untimed
        if not pending:
            return
        fetched = jax.device_get(pending)
        losses = [float(m["loss"]) for m in fetched]
        for m, loss in zip(fetched, losses):
            # The loss of step N is computed before update N: a non-finite gradient
            # with a finite loss has already made the state non-finite.
            grad_norm = float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = (f"the loss became {loss}" if not math.isfinite(loss)
                        else f"the gradient norm became {grad_norm}")
                raise Diverged(f"{what} at step {int(m['opt_step'])}")
        now = time.time()
        timed = len(fetched) - untimed  # the compiling step is not timed
        tok_s = timed * tokens_per_micro / (now - t_log) if timed else float("nan")
        untimed = 0
        loss, lr = float(np.mean(losses)), float(fetched[-1]["lr"])
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
        log.write({"step": opt_step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                   "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                   "tokens": opt_step * tcfg.grad_accum * tokens_per_micro,
                   "time": now - t_start})
        pending, t_log = [], time.time()

    # Ctrl-C stops the loop between optimizer steps: a KeyboardInterrupt raised inside
    # the train step would lose its output after its input state was donated.
    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        stop_requested.append(signum)

    previous_sigint = None
    if threading.current_thread() is threading.main_thread():
        previous_sigint = signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(total=tcfg.max_steps, initial=opt_step, unit="step", disable=not is_main,
               dynamic_ncols=True)
    try:
        while opt_step < tcfg.max_steps:
            if stop_requested and micro % tcfg.grad_accum == 0:
                raise KeyboardInterrupt
            state, metrics = train_step(state, *batch(micro))
            micro += 1
            pending.append(metrics)
            if compile_s is None and len(pending) == 1:
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_log
                log.write({"step": opt_step, "first_step_s": compile_s})
                t_log, untimed = time.time(), 1
            if micro % tcfg.grad_accum:
                continue
            opt_step += 1
            bar.update(1)
            last_val = None
            final = opt_step == tcfg.max_steps
            evaluate_now = opt_step % tcfg.eval_every == 0 or final
            save_now = opt_step % tcfg.save_every == 0 or final
            if opt_step % tcfg.log_every == 0 or evaluate_now or save_now:
                flush()  # never evaluate or save a state whose loss was not finite
            if evaluate_now:
                last_val = evaluate(eval_step, state["params"], val_x, val_y,
                                    tcfg.batch_size, mesh)
                best_val = min(best_val, last_val)
                bpc = last_val / math.log(2)
                log.write({"step": opt_step, "val_loss": last_val, "val_bpc": bpc,
                           "time": time.time() - t_start})
                log.print(f"step {opt_step}: val loss {last_val:.4f} nats/char, "
                          f"{bpc:.4f} bits/char")
                sample = _sample_text(state["params"], cfg, tokenizer, prompt, tcfg)
                if sample:
                    log.print(f"--- sample ---\n{sample}\n--------------")
                    log.text("sample", sample, opt_step)
            if save_now:
                ckpt.save(manager, state, cfg, tokenizer, opt_step, last_val)
            if evaluate_now or save_now:
                t_log = time.time()
    except KeyboardInterrupt:
        interrupted = True
        whole = (micro % tcfg.grad_accum == 0
                 and not any(x.is_deleted() for x in jax.tree.leaves(state)))
        pending = pending if whole else []
        flush()  # raises Diverged rather than save a non-finite state
        if whole and opt_step not in manager.all_steps():
            ckpt.save(manager, state, cfg, tokenizer, opt_step, last_val)
        saved = manager.latest_step()
        if saved == opt_step:
            log.print(f"interrupted at step {opt_step}: checkpoint saved in {run_dir}; "
                      f"run the same command to resume")
        else:
            log.print(f"interrupted at step {opt_step}: nothing saved since "
                      f"{'step ' + str(saved) if saved is not None else 'the start'}; "
                      f"run the same command to resume from there")
    except Diverged as e:
        kept = manager.latest_step()
        raise Diverged(f"{e}; nothing was saved after it, the last good checkpoint is "
                       f"{'step ' + str(kept) if kept is not None else 'none'} in {run_dir}: "
                       f"lower the learning rate (train.lr) and resume") from None
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
        bar.close()
        manager.close()
        log.close()

    summary = {
        "steps": opt_step, "tokens": opt_step * tcfg.grad_accum * tokens_per_micro,
        "wall_time_s": time.time() - t_start,
        "best_val_bpc": best_val / math.log(2) if math.isfinite(best_val) else None,
        "checkpoint": str(run_dir / ckpt.CKPT_SUBDIR), "interrupted": interrupted,
    }
    if is_main:
        bpc = f"{summary['best_val_bpc']:.4f}" if summary["best_val_bpc"] else "n/a"
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"{summary['wall_time_s']:.0f} s, best val {bpc} bits/char\n"
              f"checkpoints: {summary['checkpoint']}\n"
              f"next: python sample.py --checkpoint {run_dir} --prompt \"{prompt}\"")
    return summary


def _sample_text(params, cfg, tokenizer, prompt, tcfg) -> str:
    """A short sample (prompt included) for the log, or ""; with several processes, process 0 samples alone."""
    if tcfg.sample_tokens == 0:
        return ""
    from chatgot_jax import sampling  # noqa: PLC0415 (keeps the sampler's compile lazy)
    if jax.process_count() > 1:  # every process takes part in the gather
        from jax.experimental import multihost_utils  # noqa: PLC0415
        params = jax.device_put(multihost_utils.process_allgather(params, tiled=True),
                                jax.local_devices()[0])
        if jax.process_index() != 0:
            return ""
    text = sampling.generate(params, cfg.model, tokenizer, prompt,
                             max_new_tokens=tcfg.sample_tokens, temperature=0.8,
                             seed=tcfg.seed)[0]
    return prompt + text
