"""Benchmarks: python -m chatgot_jax.bench --variant tiny [section.field=value ...] [--steps N]

Measures the real jitted train step (dropout, AdamW, MultiSteps, shardings) after
warm-up: compile time, median and spread of step time, tokens/s, model FLOPs per
token, achieved TFLOP/s and MFU against the device's peak, and XLA's
memory_analysis() of the compiled step. Prints a table and can write JSON.

FLOPs per trained token (stated, MaxText/levanter style, attention not halved):
    6 * N + 12 * n_layers * d_model * T
with N the parameters without the token and position embeddings, T the
sequence length. On CPU the peak is a float32 / bfloat16 matmul measured by
this command; on GPUs it is the dense tensor-core peak of the table below.
"""

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from chatgot_jax import config as config_lib
from chatgot_jax import train_lib
from chatgot_jax.errors import ArgumentParser, cli_main
from chatgot_jax.params import count_params

# Dense peak FLOP/s per device: (bfloat16, float32). float32 matmuls on these GPUs
# run as TF32 under XLA's default precision, so float32 uses the TF32 peak.
GPU_PEAKS = {
    "H200": (989e12, 495e12),
    "H100": (989e12, 495e12),  # SXM; PCIe is lower
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "GTX 1650 Ti": (3.0e12, 3.0e12),  # no tensor cores: the fp32 rate for both
}


def flops_per_token(m: config_lib.ModelConfig, seq_len: int) -> float:
    counts = count_params(m)
    n = sum(counts.values()) - counts["token embeddings"] - counts["position embeddings"]
    return 6 * n + 12 * m.n_layers * m.d_model * seq_len


def measured_matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n^3 matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak(dtype: str) -> tuple[float, str]:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measured_matmul_peak(dtype), f"measured {dtype} matmul"
    for name, (bf16, fp32) in GPU_PEAKS.items():
        if name.lower() in dev.device_kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), f"{name} datasheet"
    return float("nan"), f"unknown device {dev.device_kind}"


def memory_figures(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}


def bench_train(cfg: config_lib.Config, steps: int, warmup: int, compile_only: bool) -> dict:
    mesh = train_lib.make_mesh(cfg.mesh)
    train_lib.check_batch(cfg, mesh)
    state, shardings = train_lib.create_sharded_state(cfg, mesh)
    step_fn = train_lib.make_train_step(cfg, mesh, shardings)
    B, T = cfg.train.batch_size, cfg.model.max_seq_length
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    rows = train_lib.process_rows(B)
    x, y = train_lib.put_batch(mesh, tokens[rows.start:rows.stop, :-1],
                               tokens[rows.start:rows.stop, 1:])
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, x, y).compile()
    result = {"compile_s": time.perf_counter() - t0, **memory_figures(compiled),
              "devices": mesh.devices.size, "device": jax.devices()[0].device_kind,
              "batch": B, "seq_len": T, "params": sum(count_params(cfg.model).values())}
    per_device = train_lib.state_bytes_per_device(state)
    result.update({f"{k}_bytes_per_device": v for k, v in per_device.items()})
    if compile_only:
        return result
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, x, y)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tok_s = B * T / step_s
    flops = flops_per_token(cfg.model, T)
    peak, peak_source = device_peak(cfg.model.compute_dtype)
    result.update({
        "step_ms": 1e3 * step_s, "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
        "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "tokens_per_s": tok_s,
        "flops_per_token": flops, "tflops": tok_s * flops / 1e12,
        "peak_tflops": peak / 1e12,  # per device
        "peak_source": peak_source, "mfu": tok_s * flops / (peak * mesh.devices.size),
        "loss": float(metrics["loss"])})
    return result


COLUMNS = [("compile_s", "compile s", "{:.1f}"), ("step_ms", "step ms", "{:.1f}"),
           ("step_ms_p10", "p10", "{:.1f}"), ("step_ms_p90", "p90", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("flops_per_token", "FLOPs/token", "{:.3g}"),
           ("tflops", "TFLOP/s", "{:.3f}"), ("mfu", "MFU", "{:.1%}"),
           ("temp_bytes", "temp GiB", "{:.3f}"), ("argument_bytes", "args GiB", "{:.3f}")]


def format_row(r: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        v = r.get(key)
        if key.endswith("_bytes") and v is not None:
            v = v / 2 ** 30
        cells.append(f"{title} " + (fmt.format(v) if v is not None else "-"))
    return " | ".join(cells)


@cli_main
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and report memory_analysis() without running")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = p.parse_args(argv)
    cfg = config_lib.load_config(args.variant, overrides=args.overrides)
    result = {"variant": args.variant, "overrides": args.overrides,
              **bench_train(cfg, args.steps, args.warmup, args.compile_only)}
    print(f"{args.variant} {' '.join(args.overrides)} on {result['devices']} x "
          f"{result['device']}, batch {result['batch']} x {result['seq_len']}")
    print(format_row(result))
    if "peak_source" in result:
        print(f"MFU against {result['peak_tflops']:.3f} TFLOP/s ({result['peak_source']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
