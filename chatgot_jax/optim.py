"""The optimizer: clip_by_global_norm -> AdamW (warmup + cosine), wrapped in optax.MultiSteps.

The hyper-parameters are float32 arrays (hyperparams(cfg)) handed to the train
step as an input, not constants compiled into it: a sweep vmaps one step over
runs with their own lr, schedule, weight decay, betas and clipping.
Weight decay applies to matrices only (dense kernels and the token and position
embeddings; biases and LayerNorm scales/offsets are not decayed), or with
train.decay=all to every parameter, as the original's PyTorch AdamW did.
The schedule counts optimizer steps: MultiSteps calls the inner chain once per
`grad_accum` micro-batches, so the lr advances once per optimizer step.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from chatgot_jax.config import TrainConfig

# TrainConfig fields that the optimizer reads at run time.
HYPERPARAMS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "beta1",
               "beta2", "grad_clip")


def hyperparams(cfg: TrainConfig) -> dict:
    """{name: float32 scalar} of HYPERPARAMS."""
    return {name: jnp.float32(getattr(cfg, name)) for name in HYPERPARAMS}


def lr_at(count, h: dict):
    """Linear warmup from 0 to h["lr"], then a cosine down to lr * min_lr_ratio at max_steps.

    count is the optimizer step; h holds (possibly traced) hyperparams.
    """
    # The same float operations, in the same order, as optax.warmup_cosine_decay_schedule.
    count = jnp.asarray(count, jnp.float32)
    lr, floor = h["lr"], h["min_lr_ratio"]
    warmup = jnp.minimum(h["warmup_steps"], h["max_steps"])
    decay = jnp.maximum(h["max_steps"] - warmup, 1.0)
    rising = -lr * (1.0 - jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)) + lr
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(count - warmup, 0.0, decay) / decay))
    return jnp.where(count < warmup, rising, lr * ((1.0 - floor) * cosine + floor))


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr_at with cfg's values: optimizer step -> learning rate."""
    h = hyperparams(cfg)
    return lambda count: lr_at(count, h)


def decay_mask(params, rule: str = "matrices"):
    """True for leaves that get weight decay. matrices: every parameter with ndim >= 2 per
    layer (scanned block params carry a leading layer axis, so a kernel there is 3-d and
    a bias 2-d: the rule is on the name instead of the rank to stay exact); all: every
    parameter."""
    def decayed(path, _):
        return rule == "all" or path[-1].key in ("kernel", "embedding", "pos_emb")
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: TrainConfig, h: dict | None = None) -> optax.MultiSteps:
    """The optimizer with hyperparams h (default hyperparams(cfg)); grad_accum comes from cfg."""
    h = hyperparams(cfg) if h is None else h
    inner = optax.chain(
        optax.clip_by_global_norm(h["grad_clip"]),
        optax.adamw(lambda count: lr_at(count, h), b1=h["beta1"], b2=h["beta2"], eps=1e-8,
                    weight_decay=h["weight_decay"],
                    mask=functools.partial(decay_mask, rule=cfg.decay)),
    )
    return optax.MultiSteps(inner, every_k_schedule=cfg.grad_accum)
