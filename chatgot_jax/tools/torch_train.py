"""The original ChatGoT trained in PyTorch, side by side with this project's JAX trainer.

    python -m chatgot_jax.tools.torch_train [train.py's flags and section.field=value ...]
        --out RUN_DIR [--init-from JAX_RUN_DIR]

Trains the original's main-line model (torch_model.Original: the `craft` layout
of torch_weights.py) with the config fields train.py takes; the model fields
the layout fixes (memory of zero length, scaled embeddings, no head bias) are
set for it, and the JAX side of a comparison gives the same ones (ORIGINAL).
What is the same as train.py, so that the two sides differ only in arithmetic
order and optimizer code:
  - the batches: micro-step m is data.get_batch(train tokens, data seed, m), the
    windows train.py cuts on the device for the same seed and step;
  - the initial weights, with --init-from: the JAX run's step-0 params (its
    checkpoint at step 0 if it has one, else train_lib.init_state of its config,
    which is what its training started from), through torch_weights;
  - the optimizer: torch.optim.AdamW (eps 1e-8) with the JAX run's lr schedule
    (optim.lr_at), betas, weight decay on train.decay's parameters, gradients
    averaged over train.grad_accum micro-batches and clipped to train.grad_clip
    (clip_grad_norm_), the validation windows and their mean.
What differs: dropout masks come from torch's generator (torch.manual_seed of
the dropout seed), so only runs without dropout can agree step by step.

It writes a normal run directory (config.json, tokenizer.json, prompt.txt,
provenance, metrics.jsonl, TensorBoard events) with a checkpoint every
train.save_every steps holding the PyTorch weights as this project's params
(sample.py, evaluate and compare read it) and a fresh optimizer state at that
step: train.py could continue it, with AdamW's moments restarted.
RUN_DIR/torch.json says which side trained it.
"""

import json
import math
import pathlib
import time

import numpy as np

from chatgot_jax import cli
from chatgot_jax import config as config_lib
from chatgot_jax.errors import UserError

# The model fields of the original's main line (torch_weights.LAYOUT_MODEL["craft"]).
ORIGINAL = ("model.memory=true", "model.memory_length=0", "model.head_bias=false",
            "model.position=learned", "model.scale_embeddings=true")


def original_config(cfg: config_lib.Config) -> config_lib.Config:
    """cfg with the original main line's model fields."""
    import dataclasses  # noqa: PLC0415

    from chatgot_jax.torch_weights import LAYOUT_MODEL  # noqa: PLC0415

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              **LAYOUT_MODEL["craft"]))


def initial_params(run_dir) -> dict:
    """The params a JAX run started from: its step-0 checkpoint, else its config's init."""
    from chatgot_jax import checkpoint as ckpt  # noqa: PLC0415
    from chatgot_jax import train_lib  # noqa: PLC0415

    run_dir = pathlib.Path(run_dir)
    if 0 in ckpt.existing_steps(run_dir):
        return ckpt.load_for_inference(str(run_dir), step=0)[0]
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"--init-from {run_dir}: no step-0 checkpoint and no readable "
                        f"config.json: give a run directory made by train.py") from None
    cfg = config_lib.from_dict(saved, source=str(path))
    return train_lib.init_state(cfg)["params"]


class TorchRun:
    """The model, optimizer and batches of one PyTorch run; step() trains one optimizer
    step and returns (loss, grad_norm, lr)."""

    def __init__(self, cfg: config_lib.Config, train_tokens, init_params=None):
        import torch  # noqa: PLC0415

        from chatgot_jax import torch_weights as tw  # noqa: PLC0415
        from chatgot_jax.tools.bench_torch import make_optimizer  # noqa: PLC0415
        from chatgot_jax.tools.torch_model import Original  # noqa: PLC0415

        self.torch, self.cfg, self.tokens = torch, cfg, np.asarray(train_tokens)
        torch.manual_seed(config_lib.seed_of(cfg.train, "init"))
        self.model = Original(cfg.model)
        if init_params is not None:
            state = tw.params_to_torch(init_params, cfg.model, "craft")
            self.model.load_state_dict(state)
        torch.manual_seed(config_lib.seed_of(cfg.train, "dropout"))
        self.model.train()
        self.opt = make_optimizer(self.model, cfg)
        self.step_done = 0

    def batch(self, micro: int):
        """Micro-step micro's (x, y), int64 tensors: train.py's windows for it."""
        from chatgot_jax.data import get_batch  # noqa: PLC0415

        t = self.cfg.train
        x, y = get_batch(self.tokens, seed=config_lib.seed_of(t, "data"), step=micro,
                         batch_size=t.batch_size, seq_len=self.cfg.model.max_seq_length)
        return self.torch.from_numpy(x.astype(np.int64)), self.torch.from_numpy(
            y.astype(np.int64))

    def loss_of(self, x, y):
        logits = self.model(x)
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      y.reshape(-1))

    def step(self) -> tuple[float, float, float]:
        from chatgot_jax.optim import hyperparams, lr_at  # noqa: PLC0415

        t, torch = self.cfg.train, self.torch
        lr = float(lr_at(self.step_done, hyperparams(t)))  # this update's lr, as optax's
        losses = []
        for micro in range(self.step_done * t.grad_accum, (self.step_done + 1) * t.grad_accum):
            loss = self.loss_of(*self.batch(micro))
            (loss / t.grad_accum).backward()
            losses.append(float(loss.detach()))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_done += 1
        return float(np.mean(losses)), grad_norm, lr

    def evaluate(self, val_x, val_y) -> float:
        """Mean over the validation batches of each batch's mean loss, as train.py."""
        b, torch = self.cfg.train.batch_size, self.torch
        self.model.eval()
        with torch.no_grad():
            losses = [float(self.loss_of(torch.from_numpy(val_x[i:i + b].astype(np.int64)),
                                         torch.from_numpy(val_y[i:i + b].astype(np.int64))))
                      for i in range(0, len(val_x), b)]
        self.model.train()
        return float(np.mean(np.asarray(losses, np.float32)))

    def params(self) -> dict:
        from chatgot_jax import torch_weights as tw  # noqa: PLC0415

        return tw.torch_to_params(self.model.state_dict(), self.cfg.model, "craft")


def save(manager, run: TorchRun, cfg, data, step: int, val_loss) -> None:
    """The PyTorch weights as this project's params, with a fresh optimizer state at step."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from chatgot_jax import checkpoint as ckpt  # noqa: PLC0415
    from chatgot_jax import train_lib  # noqa: PLC0415

    state = train_lib.init_state(cfg)
    state["params"] = jax.tree.map(jnp.asarray, run.params())
    state["opt_state"] = state["opt_state"]._replace(gradient_step=jnp.int32(step))
    ckpt.save(manager, state, cfg, data.tokenizer, step, val_loss, data=data.identity)


def train(cfg: config_lib.Config, data_path, out, init_from=None, command=None) -> dict:
    """Trains the PyTorch side into a new run directory -> summary (steps, best_val_loss)."""
    from chatgot_jax import checkpoint as ckpt  # noqa: PLC0415
    from chatgot_jax import run_dir as run_dir_lib  # noqa: PLC0415
    from chatgot_jax.metrics import Logger  # noqa: PLC0415
    from chatgot_jax.runs import prepare_data  # noqa: PLC0415

    out = pathlib.Path(out)
    run_dir_lib.check_path(out)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: the PyTorch trainer starts new run directories "
                        f"only; use another --out")
    cfg, data = prepare_data(original_config(cfg), data_path)
    init = initial_params(init_from) if init_from else None
    lock = run_dir_lib.RunLock(out)
    run_dir_lib.create(out, lock)
    t0, t = time.time(), cfg.train
    try:
        import jax  # noqa: PLC0415
        import torch  # noqa: PLC0415

        run_dir_lib.write_start(out, cfg, data.tokenizer, run_dir_lib.Existing(), 0,
                                run_dir_lib.provenance(data.identity, jax.devices()[:1],
                                                       command), prompt=data.prompt)
        (out / "torch.json").write_text(json.dumps(
            {"side": "pytorch", "torch": torch.__version__, "model": "Original (craft layout)",
             "init_from": str(init_from) if init_from else None}, indent=1) + "\n")
        run = TorchRun(cfg, data.train_tokens, init)
        log = Logger(out, True, hparams=run_dir_lib.flat(cfg))
        best, pending = math.inf, []
        with ckpt.make_manager(out, keep=t.keep) as manager:
            log.write({"step": 0, "first_step_s": 0.0})
            t_log = time.time()
            for step in range(1, t.max_steps + 1):
                pending.append(run.step())
                end = step == t.max_steps
                if step % t.log_every == 0 or end:
                    losses, norms, lrs = zip(*pending)
                    log.write({"step": step, "loss": float(np.mean(losses)), "lr": lrs[-1],
                               "grad_norm": float(np.mean(norms)),
                               "tokens_per_s": len(pending) * t.grad_accum * t.batch_size
                               * cfg.model.max_seq_length / (time.time() - t_log),
                               "tokens": step * t.grad_accum * t.batch_size
                               * cfg.model.max_seq_length, "time": time.time() - t0})
                    pending, t_log = [], time.time()
                val = None
                if step % t.eval_every == 0 or end:
                    val = run.evaluate(data.val_x, data.val_y)
                    best = min(best, val)
                    log.write({"step": step, "val_loss": val, "val_bpc": val / math.log(2),
                               "time": time.time() - t0})
                    log.print(f"step {step}: val loss {val:.4f} nats/char")
                if step % t.save_every == 0 or end:
                    save(manager, run, cfg, data, step, val)
        log.close()
    finally:
        lock.release()
    print(f"done: {t.max_steps} steps in PyTorch, {time.time() - t0:.0f} s, best val "
          f"{best:.4f} nats/char; run directory {out}")
    return {"steps": t.max_steps, "best_val_loss": best, "wall_time_s": time.time() - t0}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_arguments(p)
    p.add_argument("--out", required=True, help="a new run directory")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from the initial weights of this JAX run")
    return p


def run(args) -> dict:
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("PyTorch is not installed: pip install 'chatgot-jax[torch]' (or "
                        "-r requirements-torch.txt)") from None
    cfg = config_lib.load_config(args.variant, args.config, cli.overrides_of(args))
    return train(cfg, args.data, args.out, args.init_from, args.command)


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # python -m

if __name__ == "__main__":
    command()
