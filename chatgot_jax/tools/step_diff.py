"""Step-by-step training losses of two runs, side by side (docs/fidelity.md):

    python -m chatgot_jax.tools.step_diff RUN_A RUN_B [--out diff.png] [--json FILE]

For two runs from the same initial weights on the same batches (train.py against
tools/torch_train.py with --init-from, say): the first step at which their training
losses differ by more than 1e-5, 1e-4, 1e-3 and 1e-2; the median and largest |difference|
over stretches of the run; the losses at a few steps; the validation losses at every
step both evaluated; and with --out a plot of |difference| (log scale) and both losses.
Steps logged twice (a resumed run) count once, the later record.
"""

import json
import pathlib

import numpy as np

from chatgot_jax import cli, plot
from chatgot_jax.errors import UserError

THRESHOLDS = (1e-5, 1e-4, 1e-3, 1e-2)
TABLE_STEPS = (1, 2, 5, 10, 50, 100, 200, 500, 1000, 1500, 1800, 2000, 2500, 3000, 5000)


def losses(run_dir: pathlib.Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: training loss}, {step: validation loss}) of a run; the later record wins."""
    train, val = plot.read_metrics(pathlib.Path(run_dir))
    return ({int(r["step"]): float(r["loss"]) for r in train},
            {int(r["step"]): float(r["val_loss"]) for r in val if "val_loss" in r})


def stretches(last: int) -> list[tuple[int, int]]:
    """1-10, 11-100, 101-500, 501-1000, then thousands, up to last."""
    edges = [0, 10, 100, 500] + list(range(1000, last + 1000, 1000))
    return [(lo + 1, min(hi, last)) for lo, hi in zip(edges, edges[1:]) if lo < last]


def compare(run_a, run_b) -> dict:
    (a, a_val), (b, b_val) = losses(run_a), losses(run_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise UserError(f"{run_a} and {run_b} share no logged training step")
    diff = {s: a[s] - b[s] for s in steps}
    first = {str(t): next((s for s in steps if abs(diff[s]) > t), None) for t in THRESHOLDS}
    ranges = []
    for lo, hi in stretches(steps[-1]):
        sel = [abs(diff[s]) for s in steps if lo <= s <= hi]
        if sel:
            ranges.append({"steps": f"{lo}-{hi}", "median": float(np.median(sel)),
                           "max": float(max(sel))})
    return {"steps": len(steps), "last_step": steps[-1], "first_step_above": first,
            "stretches": ranges,
            "table": [{"step": s, "a": a[s], "b": b[s], "diff": diff[s]}
                      for s in TABLE_STEPS if s in diff],
            "val": [{"step": s, "a": a_val[s], "b": b_val[s], "diff": a_val[s] - b_val[s]}
                    for s in sorted(set(a_val) & set(b_val))],
            "series": {"step": steps, "a": [a[s] for s in steps], "b": [b[s] for s in steps]}}


def markdown(result: dict, name_a: str, name_b: str) -> str:
    first = ", ".join(f"{t}: step {s}" if s is not None else f"{t}: never"
                      for t, s in result["first_step_above"].items())
    lines = [f"{result['steps']} shared steps; first |difference| above {first}", "",
             f"| step | {name_a} | {name_b} | difference |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['a']:.6f} | {r['b']:.6f} | {r['diff']:+.2e} |"
              for r in result["table"]]
    lines += ["", "| steps | median abs difference | largest |", "|---|---|---|"]
    lines += [f"| {r['steps']} | {r['median']:.2e} | {r['max']:.2e} |" for r in result["stretches"]]
    if result["val"]:
        lines += ["", f"| step | validation {name_a} | validation {name_b} | difference |",
                  "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} |"
                  for r in result["val"]]
    return "\n".join(lines)


def draw(result: dict, name_a: str, name_b: str, path) -> None:
    series = result["series"]
    steps = np.asarray(series["step"])
    a, b = np.asarray(series["a"]), np.asarray(series["b"])
    fig, axes = plot.new_figure(1, 2, (13, 4.2))
    left, right = axes[0]
    # Equal losses would vanish on a log scale: floor them at a tenth of the smallest
    # nonzero difference.
    gap = np.abs(a - b)
    floor = 0.1 * gap[gap > 0].min() if (gap > 0).any() else 1e-9
    left.semilogy(steps, np.maximum(gap, floor), lw=0.6)
    left.set_xlabel("optimizer step")
    left.set_ylabel(f"|{name_a} - {name_b}| training loss (nats/char)")
    right.plot(steps, a, lw=0.6, label=name_a)
    right.plot(steps, b, lw=0.6, label=name_b)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss (nats/char)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description="Step-by-step training losses of two runs, side by side.")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), default=("JAX", "PyTorch"),
                   help="labels of the two runs (default JAX PyTorch)")
    p.add_argument("--out", help="draw the differences and both losses into this PNG")
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def run(args) -> dict:
    result = compare(args.run_a, args.run_b)
    print(markdown(result, *args.names))
    if args.out:
        draw(result, *args.names, args.out)
        print(f"wrote {args.out}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


main = cli.entry_point(build_parser, run)
command = cli.command(main, tune_cpu=False)  # reads JSON only: no XLA to tune

if __name__ == "__main__":
    command()
