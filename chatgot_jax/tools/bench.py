"""Benchmarks: python -m chatgot_jax.tools.bench --variant tiny [section.field=value ...] [--steps N]

train (default)  the real jitted train step (dropout, AdamW, MultiSteps,
                 shardings) after warm-up: compile time, median and spread of
                 step time waiting on every step (latency), then the pipelined
                 throughput (the same number of steps dispatched back to back,
                 one wait) that tokens/s, achieved TFLOP/s and MFU against the
                 device's peak come from; model FLOPs per token; XLA's
                 memory_analysis().
--torch          also the PyTorch baseline (bench_torch.py), in the same process,
                 runs alternated JAX, PyTorch, JAX, ... (--rounds of --steps steps).
--mode sample    cached decoding (sampling.generate_ids) on random weights.
--shapes         with --torch: the JAX/PyTorch ratio at three shapes in one invocation
                 (SHAPES: micro, the default recipe, the design doc's tiny), each
                 alternated JAX, PyTorch, ... for --rounds of --steps steps; where
                 model.matmul_dtype resolves to bfloat16 (auto on an AMX CPU), JAX
                 with float32 products joins the alternation.
--grid SPEC      one fresh subprocess per point of a product of overrides, e.g.
                 "model.remat=none,full model.compute_dtype=float32,bfloat16";
                 writes a markdown table and a PNG bar chart.

FLOPs per trained token (stated, MaxText/levanter style, attention not halved):
    6 * N + 12 * n_layers * d_model * T
with N the parameters without the token and position embeddings, T the
sequence length. On CPU the peak is a float32 / bfloat16 matmul measured by
this command; on GPUs it is the dense tensor-core peak of the table below.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from chatgot_jax import cli, train_lib
from chatgot_jax import config as config_lib
from chatgot_jax.errors import UserError
from chatgot_jax.model import matmul_dtype
from chatgot_jax import plot
from chatgot_jax.tools import report
from chatgot_jax.tools.params import count_params, state_bytes_per_device

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


@functools.lru_cache(maxsize=4)
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


class JaxTrainer:
    """The compiled train step on one fixed random batch; run(n) -> per-step seconds."""

    def __init__(self, cfg: config_lib.Config):
        self.mesh = train_lib.make_mesh(cfg.mesh)
        train_lib.check_batch(cfg, self.mesh)
        self.state, shardings = train_lib.create_sharded_state(cfg, self.mesh)
        step_fn = train_lib.make_train_step(cfg, self.mesh, shardings)
        B, T = cfg.train.batch_size, cfg.model.max_seq_length
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1))
        tokens = tokens.astype(np.int32)
        rows = train_lib.process_rows(B)
        self.x, self.y = train_lib.put_batch(self.mesh, tokens[rows.start:rows.stop, :-1],
                                             tokens[rows.start:rows.stop, 1:])
        t0 = time.perf_counter()
        self.hyper = train_lib.train_hyperparams(cfg, self.mesh)
        self.compiled = step_fn.lower(self.state, self.hyper, self.x, self.y).compile()
        self.metrics = None
        self.info = {"compile_s": time.perf_counter() - t0, **memory_figures(self.compiled),
                     "matmul_dtype": matmul_dtype(cfg.model),
                     "devices": self.mesh.devices.size, "device": jax.devices()[0].device_kind,
                     "batch": B, "seq_len": T, "params": sum(count_params(cfg.model).values())}
        per_device = state_bytes_per_device(self.state)
        self.info.update({f"{k}_bytes_per_device": v for k, v in per_device.items()})

    def pipelined(self, n: int) -> float:
        """Seconds per step over n steps dispatched back to back with one wait at the
        end: the throughput a training loop that does not wait on every step gets."""
        jax.block_until_ready(self.state)
        t = time.perf_counter()
        for _ in range(n):
            self.state, self.metrics = self.compiled(self.state, self.hyper, self.x, self.y)
        jax.block_until_ready((self.state, self.metrics))
        return (time.perf_counter() - t) / n

    def run(self, n: int) -> list[float]:
        """Per-step seconds, waiting on each step (latency; alternated with PyTorch)."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.hyper, self.x, self.y)
            jax.block_until_ready(self.metrics)
            times.append(time.perf_counter() - t)
        return times


def alternate(runners, rounds: int, steps: int) -> list[list[float]]:
    """runner.run(steps) for each runner in turn, `rounds` times (A B A B ...)."""
    times = [[] for _ in runners]
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            times[i] += runner.run(steps)
    return times


def bench_train(cfg: config_lib.Config, steps: int, warmup: int, compile_only: bool,
                torch: bool = False, rounds: int = 1, float32_too: bool = False) -> dict:
    """float32_too: with torch, also JAX with float32 products (alternated with the two)
    when cfg's resolve to bfloat16."""
    jx = JaxTrainer(cfg)
    result = dict(jx.info)
    if compile_only:
        return result
    runners = [jx]
    if torch:
        from chatgot_jax.tools import bench_torch  # imports torch
        runners.append(bench_torch.TorchTrainer(cfg, jax.devices()[0].platform))
        result.update(runners[1].info)
        if float32_too and result["matmul_dtype"] != "float32":
            runners.append(JaxTrainer(dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, matmul_dtype="float32"))))
    for runner in runners:
        runner.run(warmup)
    times = alternate(runners, rounds, steps)
    pipelined_s = jx.pipelined(max(steps * rounds, 1))
    B, T = cfg.train.batch_size, cfg.model.max_seq_length
    step_s = float(np.median(times[0]))
    tok_s = B * T / pipelined_s
    flops = flops_per_token(cfg.model, T)
    peak, peak_source = device_peak(cfg.model.compute_dtype)
    result.update({
        "step_ms": 1e3 * step_s, "step_ms_p10": 1e3 * float(np.percentile(times[0], 10)),
        "step_ms_p90": 1e3 * float(np.percentile(times[0], 90)),
        "pipelined_step_ms": 1e3 * pipelined_s, "tokens_per_s": tok_s,
        "flops_per_token": flops, "tflops": tok_s * flops / 1e12,
        "peak_tflops": peak / 1e12,  # per device
        "peak_source": peak_source, "mfu": tok_s * flops / (peak * jx.mesh.devices.size),
        "loss": float(jx.metrics["loss"]), "timed_steps": len(times[0])})
    if torch:
        torch_s = float(np.median(times[1]))
        result.update({"torch_step_ms": 1e3 * torch_s, "torch_tokens_per_s": B * T / torch_s,
                       "torch_loss": runners[1].loss, "jax_torch_ratio": torch_s / step_s})
    if len(runners) == 3:
        f32_s = float(np.median(times[2]))
        result.update({"f32_step_ms": 1e3 * f32_s, "f32_torch_ratio": torch_s / f32_s})
    return result


# --shapes: (name, variant, overrides) of the three shapes JAX is compared with PyTorch at.
SHAPES = (
    ("micro (d_model 32, 1 layer, 16 x 64)", "tiny",
     ["model.d_model=32", "model.n_layers=1", "model.d_hid=128"]),
    ("the default recipe (16 x 64, d_hid 512)", "tiny", []),
    ("the design doc's tiny (8 x 256, d_hid 1024, dropout 0.1)", "tiny-doc",
     ["train.batch_size=8"]),
)


def bench_shapes(steps: int, warmup: int, rounds: int, overrides) -> list[dict]:
    """bench_train with --torch at each of SHAPES -> one result per shape."""
    results = []
    for name, variant, shape in SHAPES:
        cfg = config_lib.load_config(variant, overrides=[*shape, *overrides])
        results.append({"shape": name, **bench_train(cfg, steps, warmup, False, True, rounds,
                                                     float32_too=True)})
        r = results[-1]
        f32 = (f", JAX with float32 products {r['f32_step_ms']:.1f} ms "
               f"({r['f32_torch_ratio']:.2f}x)" if "f32_step_ms" in r else "")
        print(f"{name}: JAX ({r['matmul_dtype']} products) {r['step_ms']:.1f} ms, "
              f"PyTorch {r['torch_step_ms']:.1f} ms, JAX/PyTorch {r['jax_torch_ratio']:.2f}x"
              f"{f32}", flush=True)
    return results


def bench_sample(cfg: config_lib.Config, new_tokens: int | None, num_samples: int,
                 rounds: int, prompt_len: int) -> dict:
    """Decode throughput of generate_ids: one warm-up call, then `rounds` timed calls."""
    from chatgot_jax.model import init_params
    from chatgot_jax.sampling import generate_ids
    S = cfg.model.max_seq_length
    if not 1 <= prompt_len < S:
        raise UserError(f"--prompt-len must be in [1, {S - 1}] (the context is {S}), "
                        f"got {prompt_len}")
    n = new_tokens or S - prompt_len + 1  # the most that fit without sliding the window
    params = init_params(cfg.model, jax.random.key(0))
    prompt = np.random.default_rng(0).integers(1, cfg.model.vocab_size, prompt_len)

    def once():
        marks = []
        t0 = time.perf_counter()
        generate_ids(params, cfg.model, prompt, max_new_tokens=n, num_samples=num_samples,
                     on_ids=lambda _: marks.append(time.perf_counter()))
        return marks[0] - t0, time.perf_counter() - marks[0]

    t0 = time.perf_counter()
    once()
    warmup_s = time.perf_counter() - t0
    first_s, rest_s = (float(np.median(v)) for v in zip(*[once() for _ in range(rounds)]))
    B = num_samples
    return {"compile_s": warmup_s, "device": jax.devices()[0].device_kind, "devices": 1,
            "batch": B, "seq_len": S, "prompt_len": prompt_len, "new_tokens": n,
            "slides": n > S - prompt_len + 1, "params": sum(count_params(cfg.model).values()),
            "first_token_ms": 1e3 * first_s, "tokens_per_s": B * n / (first_s + rest_s),
            "decode_ms_per_step": 1e3 * rest_s / max(n - 1, 1),
            "decode_tokens_per_s": B * (n - 1) / rest_s if n > 1 else float("nan")}


def child_argv(args, point: list[str], json_path: str) -> list[str]:
    argv = [sys.executable, "-m", "chatgot_jax.tools.bench", "--variant", args.variant,
            "--mode", args.mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--num-samples", str(args.num_samples), "--prompt-len", str(args.prompt_len),
            "--json", json_path]
    for flag, value in (("--rounds", args.rounds), ("--new-tokens", args.new_tokens)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--torch"] * args.torch + ["--compile-only"] * args.compile_only
    return argv + list(args.overrides) + point


def run_grid(args, points: list[list[str]]) -> list[dict]:
    """Each point in a fresh interpreter; a failed point gets {"error": last stderr line}."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, point in enumerate(points):
            path = os.path.join(tmp, f"{i}.json")
            print(f"[{i + 1}/{len(points)}] {' '.join(point)}", flush=True)
            proc = subprocess.run(child_argv(args, point, path),
                                  capture_output=True, text=True)
            if proc.returncode == 0 and os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
                print("\n".join("  " + line for line in proc.stdout.rstrip().splitlines()))
            else:
                lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
                results.append({"overrides": point, "error": lines[-1]})
                print(f"  failed: {lines[-1]}")
    return results


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--mode", choices=("train", "sample"), default="train")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    p.add_argument("--rounds", type=int, help="timed rounds: alternated with --torch "
                   "(default 4), timed generate calls in sample mode (default 3), else 1")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch baseline")
    p.add_argument("--shapes", action="store_true",
                   help="with --torch: the ratio at the micro, default and doc tiny shapes")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and report memory_analysis() without running")
    p.add_argument("--num-samples", type=int, default=1, help="sample mode: batch rows")
    p.add_argument("--new-tokens", type=int,
                   help="sample mode: tokens per row (default: fill the context)")
    p.add_argument("--prompt-len", type=int, default=1, help="sample mode: prompt tokens")
    p.add_argument("--grid", help='e.g. "model.remat=none,full train.batch_size=8,32"')
    p.add_argument("--out-md", default="bench-grid.md", help="grid: markdown table")
    p.add_argument("--out-png", default="bench-grid.png", help="grid: bar chart")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def run(args):
    for name in ("steps", "num_samples", "rounds", "new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.mode == "sample" and (args.torch or args.compile_only):
        raise UserError("--torch and --compile-only are for --mode train")
    if args.grid:
        return grid_main(args)
    if args.shapes:
        if not args.torch or args.mode != "train":
            raise UserError("--shapes compares with PyTorch: add --torch (train mode)")
        results = bench_shapes(args.steps, args.warmup, args.rounds or 4, args.overrides)
        print(report.shapes_markdown(results))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    cfg = config_lib.load_config(args.variant, overrides=args.overrides)
    if args.mode == "sample":
        out = bench_sample(cfg, args.new_tokens, args.num_samples, args.rounds or 3,
                           args.prompt_len)
    else:
        out = bench_train(cfg, args.steps, args.warmup, args.compile_only, args.torch,
                          args.rounds or (4 if args.torch else 1))
    result = {"variant": args.variant, "mode": args.mode, "overrides": args.overrides, **out}
    print("\n".join(report.report_lines(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def grid_main(args) -> list[dict]:
    points = config_lib.parse_grid(args.grid)
    for point in points:  # refuse a bad key or value before starting any run
        config_lib.load_config(args.variant, overrides=list(args.overrides) + point)
    results = run_grid(args, points)
    ok = [r for r in results if "error" not in r]
    where = f" on {ok[0]['devices']} x {ok[0]['device']}" if ok else ""
    title = f"{args.variant} {args.mode} {' '.join(args.overrides)}{where}".replace("  ", " ")
    pathlib.Path(args.out_md).write_text(report.grid_markdown(points, results, title))
    plot.grid_chart(points, results, args.out_png, title)
    print(f"wrote {args.out_md} and {args.out_png}")
    return results


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-bench console script and python -m

if __name__ == "__main__":
    command()
