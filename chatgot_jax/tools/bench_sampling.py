"""Cached sampling vs full recompute: python -m chatgot_jax.tools.bench_sampling [tiny1 tiny8 small1 small8]

Random weights, float32, remat none, no dropout. Cached: per-token decode time
= (t(1 + n) - t(1)) / n, where t(k) is a warm generate_ids call producing k
tokens (1 = prefill only); a cached step costs the same at any position
(attention reads the whole fixed-size cache, masked). Recompute: a jitted full
forward on a context of L = S - 100 tokens (the middle of the last 200
positions of a full context), argmax fetched to the host each step;
tokens/s = batch / step time. The two are measured in alternating rounds
(cached, recompute, cached, ...) so that machine noise hits both alike, and
each figure is the median over rounds. Prints a markdown table.
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from chatgot_jax import cli, sampling
from chatgot_jax.config import load_config
from chatgot_jax.cpu_tuning import sampling_compiler_options
from chatgot_jax.errors import UserError
from chatgot_jax.model import Decoder, init_params


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(variant, batch, n_dec, n_rec, rounds=5):
    m = load_config(variant).model
    m = dataclasses.replace(m, compute_dtype="float32", remat="none", dropout=0.0)
    params = init_params(m, jax.random.key(0))
    S = m.max_seq_length
    P = S - 1 - 200  # a 200-token run ending at a full context (no sliding)
    prompt = np.random.default_rng(1).integers(1, m.vocab_size, P)
    run = lambda k: sampling.generate_ids(params, m, prompt, max_new_tokens=k, temperature=0.8,
                                          num_samples=batch)
    run(2)  # compiles prefill + decode
    L = S - 100
    fwd = jax.jit(lambda p, t: Decoder(m).apply({"params": p}, t)[:, -1].argmax(-1),
                  compiler_options=sampling_compiler_options())  # same XLA options as cached
    tok = jnp.asarray(np.tile(np.resize(prompt, L), (batch, 1)), jnp.int32)
    np.asarray(fwd(params, tok))  # compile
    pre, dec, rec = [], [], []
    for _ in range(rounds):
        pre.append(timed(lambda: run(1)))
        dec.append((timed(lambda: run(1 + n_dec)) - pre[-1]) / n_dec)
        rec.append(timed(lambda: [np.asarray(fwd(params, tok)) for _ in range(n_rec)]) / n_rec)
    t_pre, t_dec, t_rec = (float(np.median(x)) for x in (pre, dec, rec))
    dec_tps, rec_tps = batch / t_dec, batch / t_rec
    tps200 = batch * 200 / (t_pre + 199 * t_dec)
    print(f"| {variant} | {S} | {batch} | {1e3 * t_dec:8.1f} | {dec_tps:8.2f} | {t_pre:6.2f} "
          f"| {tps200:8.2f} | {1e3 * t_rec:8.1f} (L={L}) | {rec_tps:7.2f} "
          f"| {dec_tps / rec_tps:5.1f}x | {tps200 / rec_tps:5.1f}x |", flush=True)


# case -> (variant, batch, decode steps timed, recompute steps timed)
PLAN = {"tiny1": ("tiny", 1, 199, 10), "tiny8": ("tiny", 8, 199, 5),
        "small1": ("small", 1, 32, 2), "small8": ("small", 8, 16, 1)}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", metavar="CASE",
                   help=f"any of {', '.join(PLAN)} (default: all)")
    return p


def run(args) -> None:
    unknown = [c for c in args.cases if c not in PLAN]
    if unknown:
        raise UserError(f"unknown case {unknown[0]}: choose from {', '.join(PLAN)}")
    print("| variant | context S | batch | cached ms/step | cached decode tok/s | prefill s (P=S-201) "
          "| cached tok/s, 200 tok incl. prefill | recompute ms/step | recompute tok/s "
          "| speedup decode | speedup 200 tok |", flush=True)
    for case in args.cases or list(PLAN):
        bench(*PLAN[case])


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # python -m

if __name__ == "__main__":
    command()
