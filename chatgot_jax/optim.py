"""The optimizer: clip_by_global_norm -> AdamW (warmup + cosine), wrapped in optax.MultiSteps.

Weight decay applies to matrices only (dense kernels and the token and position
embeddings); biases and LayerNorm scales/offsets are not decayed.
The schedule counts optimizer steps: MultiSteps calls the inner chain once per
`grad_accum` micro-batches, so the lr advances once per optimizer step.
"""

import jax
import optax

from chatgot_jax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.max_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True for leaves that get weight decay: every parameter with ndim >= 2 per layer.

    Scanned block params carry a leading layer axis, so a kernel there is 3-d and a
    bias 2-d; the rule is on the name instead of the rank to stay exact.
    """
    def decayed(path, _):
        name = path[-1].key
        return name in ("kernel", "embedding", "pos_emb")
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: TrainConfig) -> optax.MultiSteps:
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return optax.MultiSteps(inner, every_k_schedule=cfg.grad_accum)
