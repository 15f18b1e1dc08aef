"""The GPU path's checks, run first by scripts/bench_gpu.sh:

    python -m chatgot_jax.tools.check_gpu [--allow-cpu]

1. JAX really runs on a GPU (without a working CUDA plugin JAX falls back to the
   CPU with only a warning): one line and exit 2 unless --allow-cpu.
2. The attention model.attention=auto picks (cuDNN flash attention on a GPU in
   bfloat16) agrees with the einsum path: the small variant's logits on random
   tokens, bfloat16, max |difference| within 5% of the logits' standard deviation
   (bfloat16 keeps 8 significant bits; 12 layers of rounding).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from chatgot_jax import cli
from chatgot_jax import config as config_lib
from chatgot_jax.errors import RunError, UserError
from chatgot_jax.model import Decoder, attention_impl, init_params

TOLERANCE = 0.05  # of the logits' standard deviation


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description="Checks of the GPU path (backend, cuDNN attention).")
    p.add_argument("--allow-cpu", action="store_true", help="run the checks on a CPU too")
    p.add_argument("--batch", type=int, default=2)
    return p


def run(args) -> dict:
    backend = jax.default_backend()
    print(f"backend {backend}: {jax.devices()}")
    if backend != "gpu" and not args.allow_cpu:
        raise UserError(f"JAX runs on {backend}, not a GPU: install a CUDA jaxlib "
                        "(pip install -r requirements-cuda.txt) or pass --allow-cpu")
    cfg = config_lib.load_config("small", overrides=["model.compute_dtype=bfloat16",
                                                     "model.dropout=0"]).model
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, cfg.max_seq_length)), jnp.int32)
    chosen = attention_impl(cfg, cached=False)
    chosen_logits, einsum_logits = (
        np.asarray(jax.jit(Decoder(dataclasses.replace(cfg, attention=impl)).apply)(
            {"params": params}, tokens)) for impl in (chosen, "einsum"))
    diff = float(np.max(np.abs(chosen_logits - einsum_logits)))
    scale = float(np.std(einsum_logits))
    print(f"attention auto -> {chosen}: max |logit difference| vs einsum {diff:.3g} "
          f"(logits' std {scale:.3g}, tolerance {TOLERANCE * scale:.3g})")
    if not diff <= TOLERANCE * scale:
        raise RunError(f"attention {chosen} disagrees with einsum by {diff:.3g}")
    return {"backend": backend, "attention": chosen, "max_diff": diff, "logits_std": scale}


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # python -m

if __name__ == "__main__":
    command()
