"""Training curves: python -m chatgot_jax.plot RUN_DIR [RUN_DIR ...] [--out curves.png]

Draws, from each RUN_DIR/metrics.jsonl, the training loss (nats/char) and the
validation bits/char against optimizer steps, trained tokens and wall time (a
2 x 3 grid), one line per run labelled by its directory name, into one PNG.
Also the benchmark's --grid bar chart (used by bench.py). matplotlib is
imported only when a figure is drawn (the Agg backend, no display).
"""

import json
import math
import pathlib

from chatgot_jax import cli, comparison, stats
from chatgot_jax.errors import UserError


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """(figure, axes array) on the Agg canvas, without pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def grid_chart(points: list[list[str]], results: list[dict], path, title: str) -> None:
    """Bar charts of tokens/s (and XLA temp memory when measured) per grid point."""
    labels = ["\n".join(o.partition("=")[2] for o in point) for point in points]
    axis_names = " / ".join(o.partition("=")[0].split(".", 1)[-1] for o in points[0])
    panels = [("tokens_per_s", "tokens/s", 1.0, "{:,.0f}")]
    if any("temp_bytes" in r for r in results):
        panels.append(("temp_bytes", "XLA temporaries (GiB)", 2.0 ** -30, "{:.3f}"))
    fig, axes = new_figure(1, len(panels), (max(4.0, 0.9 * len(points)) * len(panels), 4.0))
    for ax, (key, name, scale, fmt) in zip(axes[0], panels):
        heights = [r.get(key, 0.0) * scale for r in results]
        bars = ax.bar(range(len(points)), heights, color="tab:blue")
        ax.bar_label(bars, labels=["failed" if "error" in r else fmt.format(h)
                                   for r, h in zip(results, heights)], fontsize=8)
        ax.set_xticks(range(len(points)), labels, fontsize=8)
        ax.set_xlabel(axis_names)
        ax.set_ylabel(name)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)


def read_metrics(run_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(training records with "loss", validation records with "val_bpc") of one run.

    A last line without its newline (a run still writing it) is skipped.
    """
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a training run directory?")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    train, val = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: still being written
                continue
            raise UserError(f"{path} line {i} is not JSON") from None
        if "loss" in record:
            train.append(record)
        elif "val_bpc" in record:
            val.append(record)
    if not train and not val:
        raise UserError(f"{path} has no loss or val_bpc lines yet")
    return train, val


def with_tokens(train: list[dict], val: list[dict]) -> list[dict]:
    """Validation records plus "tokens", from the run's tokens per optimizer step."""
    per_step = [r["tokens"] / r["step"] for r in train if r.get("step") and "tokens" in r]
    rate = per_step[-1] if per_step else math.nan
    return [{**r, "tokens": r["step"] * rate} for r in val]


def plot_curves(runs: dict[str, tuple[list[dict], list[dict]]], out):
    """The 2 x 3 grid: rows loss / val bits per char, columns steps / tokens / minutes.
    Saved to out; returns the figure."""
    fig, axes = new_figure(2, 3, (15.0, 8.0))
    xs = [("step", "optimizer step", 1.0), ("tokens", "tokens", 1.0),
          ("time", "wall time (min)", 1 / 60)]
    rows = [("loss", "training loss (nats/char)"), ("val_bpc", "validation bits/char")]
    for label, (train, val) in runs.items():
        for row, (ykey, ylabel) in enumerate(rows):
            records = train if row == 0 else with_tokens(train, val)
            for col, (xkey, xlabel, scale) in enumerate(xs):
                pts = [(r[xkey] * scale, r[ykey]) for r in records
                       if xkey in r and math.isfinite(r[xkey]) and math.isfinite(r[ykey])]
                ax = axes[row][col]
                if pts:
                    ax.plot(*zip(*pts), label=label,
                            **markers(len(pts), always=row == 1))
                label_axis(ax, xlabel, ylabel)
    return save_with_legends(fig, axes, out)


FEW_POINTS = 20  # a series with this many points or fewer is drawn with a mark at each


def markers(n_points: int, always: bool = False) -> dict:
    """Line style keywords: a mark at every point when the series has few (one
    evaluation would otherwise be an invisible zero-length line), or when asked."""
    return {"marker": "o", "markersize": 3} if always or n_points <= FEW_POINTS else {}


def label_axis(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def save_with_legends(fig, axes, out):
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    return fig


def band(curves: list[list[tuple[float, float]]]):
    """(x, mean, lo, hi) over the curves at the x values they all have: the mean and its
    95% Student-t interval over the curves (no band for one curve)."""
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    rows = [stats.mean_interval([dict(c)[x] for c in curves]) for x in common]
    mean = [r["mean"] for r in rows]
    return (common, mean, [m if r["lo"] is None else r["lo"] for m, r in zip(mean, rows)],
            [m if r["hi"] is None else r["hi"] for m, r in zip(mean, rows)])


def plot_groups(groups: dict[str, list[pathlib.Path]], out):
    """Validation and training loss (nats/char) against tokens: per group of runs (the
    seeds of one config), the mean as a line and its 95% interval as a band. Saved to
    out; returns the figure."""
    fig, axes = new_figure(1, 2, (14.0, 5.0))
    for label, dirs in groups.items():
        runs = [read_metrics(d) for d in dirs if (d / "metrics.jsonl").is_file()]
        if not runs:
            continue
        for ax, (key, title) in zip(axes[0], (("val_loss", "validation loss (nats/char)"),
                                              ("loss", "training loss (nats/char)"))):
            curves = [[(r["tokens"], r[key]) for r in (with_tokens(train, val) if key ==
                                                       "val_loss" else train)
                       if math.isfinite(r.get(key, math.nan)) and math.isfinite(r["tokens"])]
                      for train, val in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            x, mean, lo, hi = band(curves)
            (line,) = ax.plot(x, mean, label=f"{label} ({len(curves)})", **markers(len(x)))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            label_axis(ax, "tokens", title)
    return save_with_legends(fig, axes, out)


def run_labels(dirs: list[pathlib.Path]) -> list[str]:
    """Each run's directory name, or its path as given where two names clash."""
    names = [d.name for d in dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in dirs]


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--group", action="store_true",
                   help="runs whose configs differ only in seeds as one curve: the mean and "
                        "its 95%% band, validation and training loss against tokens")
    return p


def run(args) -> None:
    dirs = [pathlib.Path(d) for d in args.run_dirs]
    if args.group:
        groups = comparison.group_runs(dirs)
        plot_groups(groups, args.out)
        print(f"wrote {args.out}: " + "; ".join(f"{k} ({len(v)} runs)" for k, v in groups.items()))
        return
    runs = {label: read_metrics(d) for label, d in zip(run_labels(dirs), dirs)}
    plot_curves(runs, args.out)
    print(f"wrote {args.out}")


main = cli.entry_point(build_parser, run)
command = cli.command(main, tune_cpu=False)  # the chatgot-plot console script and python -m

if __name__ == "__main__":
    command()
