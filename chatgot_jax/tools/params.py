"""Parameter accounting from the real (abstract) params: python -m chatgot_jax.tools.params --variant small

Prints the design doc's table, computed with jax.eval_shape (nothing allocated),
and with --fsdp the bytes of params and optimizer state per device. The last
line is `total: N`.
"""

import math

import jax

from chatgot_jax import cli
from chatgot_jax import config as config_lib
from chatgot_jax import train_lib
from chatgot_jax.model import param_shapes

GROUPS = ("token embeddings", "position embeddings", "attention", "feed-forward",
          "layer norms", "output projection", "memory")


def group_of(path: tuple[str, ...]) -> str:
    """Which row of the table a parameter belongs to, from its pytree path."""
    if path[0] == "tok_emb":
        return "token embeddings"
    if path[0] == "pos_emb":
        return "position embeddings"
    if path[0] == "head":
        return "output projection"
    if path[0] == "ln_f" or (path[0] == "blocks" and path[1] in ("ln1", "ln2")):
        return "layer norms"
    if path[0] == "blocks" and path[1] == "memory":
        return "memory"
    if path[0] == "blocks" and path[1] in ("qkv", "attn_out"):
        return "attention"
    if path[0] == "blocks" and path[1] in ("fc", "proj"):
        return "feed-forward"
    raise ValueError(f"unaccounted parameter {'/'.join(path)}")


def count_params(model_cfg: config_lib.ModelConfig) -> dict[str, int]:
    """Parameter count per group (GROUPS) of the initialised model."""
    counts = dict.fromkeys(GROUPS, 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(model_cfg))[0]:
        names = tuple(k.key for k in path)
        counts[group_of(names)] += math.prod(leaf.shape)
    return counts


def table(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    lines = [f"{'component':<22}{'parameters':>14}{'%':>8}"]
    for name in GROUPS:
        lines.append(f"{name:<22}{counts[name]:>14,}{100 * counts[name] / total:>7.1f}%")
    lines.append(f"total: {total}")
    return "\n".join(lines)


def planned_bytes_per_device(cfg: config_lib.Config, fsdp: int) -> dict:
    """Bytes of params and optimizer state per device under fsdp-way sharding (no devices needed)."""
    abstract = train_lib.abstract_state(cfg)
    out = {}
    for part in ("params", "opt_state"):
        total = 0
        for leaf in jax.tree.leaves(abstract[part]):
            spec = train_lib.leaf_spec(leaf.shape, fsdp)
            shard = [n // fsdp if axis == "fsdp" else n
                     for n, axis in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim)]
            total += math.prod(shard) * leaf.dtype.itemsize
        out[part] = total
    return out


def state_bytes_per_device(state) -> dict:
    """Bytes of params and optimizer state held by each device (from the shardings)."""
    out = {}
    for part in ("params", "opt_state"):
        total = 0
        for leaf in jax.tree.leaves(state[part]):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shard) * leaf.dtype.itemsize
        out[part] = total
    return out


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny", help="configs/VARIANT.yaml (default tiny)")
    p.add_argument("--memory", action="store_true",
                   help="count the original's zero-memory cross-attention sublayers")
    p.add_argument("--vocab-size", type=int, default=96, help="default 96 (the GoT corpus)")
    p.add_argument("--fsdp", type=int, nargs="*", metavar="N",
                   help="also print params + AdamW state bytes per device with N-way FSDP")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.n_layers=6")
    return p


def run(args) -> None:
    overrides = [f"model.vocab_size={args.vocab_size}", *args.overrides]
    if args.memory:
        overrides.append("model.memory=true")
    cfg = config_lib.load_config(args.variant, overrides=overrides)
    m = cfg.model
    print(f"{args.variant}: d_model {m.d_model}, {m.n_layers} layers, {m.n_head} heads, "
          f"d_hid {m.d_hid}, context {m.max_seq_length}, vocab {m.vocab_size}, "
          f"memory {'on' if m.memory else 'off'}")
    for n in args.fsdp or ():
        b = planned_bytes_per_device(cfg, n)
        print(f"fsdp {n}: params {b['params'] / 2**20:,.1f} MiB + optimizer state "
              f"{b['opt_state'] / 2**20:,.1f} MiB per device")
    print(table(count_params(m)))


main = cli.entry_point(build_parser, run)
command = cli.command(main, tune_cpu=False)  # the chatgot-params console script and python -m

if __name__ == "__main__":
    command()
