"""Where a train step's time goes, per operation, in JAX and in the PyTorch baseline.

    python -m chatgot_jax.tools.profile_step --variant tiny [section.field=value ...]
        [--steps 20] [--torch] [--top 15] [--out-md FILE]

JAX: the compiled train step of bench.py (one fixed batch) traced for --steps
steps with jax.profiler (a Perfetto trace); every event that names an
instruction of the compiled HLO module (XLA:CPU runs one thunk per fusion,
matmul, copy, ...) is timed, and the instructions are sorted into categories
from their opcodes and, for fusions, the opcodes inside them. Also the
module's instruction, fusion, matmul and copy counts. PyTorch (--torch):
torch.profiler over the same number of steps of bench_torch's step, its
operators' self CPU time, sorted into the same categories (the profiler adds
its own cost per operator call, so PyTorch's summed times exceed its step).
Both: milliseconds per step and shares of the summed operation time, beside
the unprofiled step time.
"""

import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

import jax

from chatgot_jax import cli
from chatgot_jax import config as config_lib

# Category of an HLO instruction or fusion, from the opcodes it holds (first match).
CATEGORIES = [
    ("matmul", ("dot", "convolution", "ynn", "xnn", "onednn")),
    ("gather/scatter (embeddings)", ("gather", "scatter", "dynamic-slice",
                                     "dynamic-update-slice")),
    ("reduction (softmax, LayerNorm, loss, norms)", ("reduce",)),
    ("copy/transpose", ("copy", "transpose")),
    ("random bits (dropout)", ("rng", "threefry", "shift-right-logical")),
]
OTHER = "elementwise and other"
TORCH_CATEGORIES = [
    ("attention (fused kernel)", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm")),
    ("gather/scatter (embeddings)", ("embedding", "index", "gather", "scatter")),
    ("reduction (softmax, LayerNorm, loss, norms)", ("softmax", "layer_norm", "nll",
                                                      "cross_entropy", "sum", "norm", "mean")),
    ("copy/transpose", ("copy", "clone", "contiguous", "transpose", "permute", "t", "view")),
    ("optimizer (AdamW, clipping)", ("adam", "foreach", "_fused", "lerp", "addcdiv",
                                     "addcmul", "sqrt", "mul_", "add_", "clamp")),
    ("random bits (dropout)", ("dropout", "bernoulli", "rand")),
]


def hlo_instructions(hlo_text: str) -> dict[str, str]:
    """{instruction name: category} of an optimized HLO module's entry instructions;
    a fusion is categorised by the opcodes of the computation it calls."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header[1]
            computations[current] = []
        elif current is not None and "=" in line:
            computations[current].append(line)
    category = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(", line)
            if not m:
                continue
            name, opcode = m[1], m[2]
            ops = {opcode}
            if opcode == "fusion" and (called := re.search(r"calls=%?([\w.\-]+)", line)):
                ops = {re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z][\w\-]*)\(", x)[1]
                       for x in computations.get(called[1], [])
                       if re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z][\w\-]*)\(", x)}
            text = " ".join(sorted(ops)) + " " + name
            category[name] = next((c for c, keys in CATEGORIES
                                   if any(k in text for k in keys)), OTHER)
    return category


def hlo_counts(hlo_text: str) -> dict:
    """Instruction counts of the optimized module (every computation)."""
    opcodes = collections.Counter(
        m[1] for m in re.finditer(r"=\s*[^=\n]*?\s([a-z][\w\-]*)\(", hlo_text))
    return {"instructions": sum(opcodes.values()), "fusions": opcodes["fusion"],
            "dots": opcodes["dot"] + opcodes["custom-call"], "copies": opcodes["copy"],
            "transposes": opcodes["transpose"]}


def trace_events(run_steps, steps: int) -> list[dict]:
    """The complete ('X') events of a Perfetto trace of run_steps(steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run_steps(steps)
        [path] = pathlib.Path(tmp).rglob("perfetto_trace.json.gz")
        data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def profile_jax(cfg, steps: int) -> dict:
    from chatgot_jax.tools.bench import JaxTrainer  # noqa: PLC0415

    jx = JaxTrainer(cfg)
    jx.run(3)  # warm
    hlo = jx.compiled.as_text()
    category = hlo_instructions(hlo)
    t0 = time.perf_counter()
    events = trace_events(jx.run, steps)
    wall = (time.perf_counter() - t0) / steps
    per_op = collections.defaultdict(float)
    for e in events:
        if e["name"] in category:
            per_op[e["name"]] += e["dur"] / 1e3 / steps  # us -> ms per step
    by_category = collections.defaultdict(float)
    for name, ms in per_op.items():
        by_category[category[name]] += ms
    step_s = min(jx.run(steps))
    return {"step_ms": 1e3 * step_s, "traced_step_ms": 1e3 * wall,
            "ops_ms": sum(per_op.values()), "by_category": dict(by_category),
            "top": sorted(((ms, n, category[n]) for n, ms in per_op.items()), reverse=True),
            "hlo": hlo_counts(hlo)}


def torch_category(name: str) -> str:
    base = name.removeprefix("aten::").lower()
    for cat, keys in TORCH_CATEGORIES:
        if any(base == k or base.startswith(k + "_") or k in base.split("_") or
               (len(k) > 3 and k in base) for k in keys):
            return cat
    return OTHER


def profile_torch(cfg, steps: int) -> dict:
    import torch  # noqa: PLC0415

    from chatgot_jax.tools.bench_torch import TorchTrainer  # noqa: PLC0415

    tt = TorchTrainer(cfg)
    tt.run(3)
    step_s = min(tt.run(steps))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tt.run(steps)
    rows = [(e.self_cpu_time_total / 1e3 / steps, e.key, e.count // steps)
            for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_category = collections.defaultdict(float)
    for ms, name, _ in rows:
        by_category[torch_category(name)] += ms
    return {"step_ms": 1e3 * step_s, "ops_ms": sum(ms for ms, _, _ in rows),
            "by_category": dict(by_category),
            "top": sorted(((ms, f"{n} x{c}", torch_category(n)) for ms, n, c in rows),
                          reverse=True),
            "ops_per_step": sum(c for _, _, c in rows)}


def markdown(jx: dict, pt: dict | None, top: int) -> str:
    cats = sorted({*jx["by_category"], *(pt["by_category"] if pt else {})},
                  key=lambda c: -jx["by_category"].get(c, 0.0))
    lines = ["| category | JAX ms/step | share | " + ("PyTorch ms/step | share |" if pt else ""),
             "|---|---|---|" + ("---|---|" if pt else "")]
    for c in cats:  # shares of the operations' summed time
        row = f"| {c} | {jx['by_category'].get(c, 0):.2f} | " \
              f"{jx['by_category'].get(c, 0) / jx['ops_ms']:.0%} |"
        if pt:
            row += f" {pt['by_category'].get(c, 0):.2f} | " \
                   f"{pt['by_category'].get(c, 0) / pt['ops_ms']:.0%} |"
        lines.append(row)
    lines.append(f"| sum of the operations (profiled) | {jx['ops_ms']:.2f} | 100% |"
                 + (f" {pt['ops_ms']:.2f} | 100% |" if pt else ""))
    lines.append(f"| step wall time, unprofiled (best of the timed steps) | {jx['step_ms']:.2f} "
                 f"| |" + (f" {pt['step_ms']:.2f} | |" if pt else ""))
    h = jx["hlo"]
    lines += ["", f"JAX module: {h['instructions']} instructions, {h['fusions']} fusions, "
                  f"{h['dots']} matmuls (dot or custom-call), {h['copies']} copies, "
                  f"{h['transposes']} transposes." + (
                      f" PyTorch: {pt['ops_per_step']} operator calls per step." if pt else ""),
              "", f"Top {top} JAX operations (ms per step):", "",
              "| ms | instruction | category |", "|---|---|---|"]
    lines += [f"| {ms:.3f} | {name} | {cat} |" for ms, name, cat in jx["top"][:top]]
    if pt:
        lines += ["", f"Top {top} PyTorch operators (self CPU ms per step, calls per step):",
                  "", "| ms | operator | category |", "|---|---|---|"]
        lines += [f"| {ms:.3f} | {name} | {cat} |" for ms, name, cat in pt["top"][:top]]
    return "\n".join(lines) + "\n"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--steps", type=int, default=20, help="traced steps (default 20)")
    p.add_argument("--torch", action="store_true", help="also profile the PyTorch baseline")
    p.add_argument("--top", type=int, default=15, help="operations listed (default 15)")
    p.add_argument("--out-md", metavar="FILE", help="also write the tables here")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def run(args) -> dict:
    cfg = config_lib.load_config(args.variant, None, args.overrides)
    jx = profile_jax(cfg, args.steps)
    pt = profile_torch(cfg, args.steps) if args.torch else None
    text = markdown(jx, pt, args.top)
    print(text, end="")
    if args.out_md:
        pathlib.Path(args.out_md).write_text(text)
    return {"jax": jx, "torch": pt}


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # python -m

if __name__ == "__main__":
    command()
