"""A sweep's reports: OUT/summary.json (one entry per run), OUT/summary.md (configs side by
side: mean and std over seeds), OUT/curves.png (mean and min-max band per config).

The numbers come from each run's metrics.jsonl, so the reports can be rebuilt from
the run directories at any time.
"""

import json
import math
import pathlib

import numpy as np


def read_run(run_dir: pathlib.Path) -> dict:
    """From metrics.jsonl: the last step, validation losses, tokens and wall time.

    Wall time adds up each start's last `time` (a resumed run starts its clock again).
    """
    records = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    wall, last_time = 0.0, 0.0
    for r in records:
        if "first_step_s" in r:
            wall, last_time = wall + last_time, 0.0
        last_time = r.get("time", last_time)
    return {"steps": max((r["step"] for r in train), default=0),
            "final_val_loss": val[-1][1] if val else None,
            "best_val_loss": min(v for _, v in val) if val else None,
            "tokens": train[-1]["tokens"] if train else 0, "wall_time_s": wall + last_time}


def entries(out: pathlib.Path, points) -> list[dict]:
    rows = []
    for p in points:
        run = read_run(out / p.name)
        rows.append({"name": p.name, "overrides": list(p.overrides), "seed": p.seed,
                     "run_dir": str(out / p.name), **run,
                     "complete": run["steps"] >= p.cfg.train.max_steps
                     and run["final_val_loss"] is not None})
    return rows


def config_label(overrides) -> str:
    return " ".join(overrides) or "(base config)"


def table(rows: list[dict]) -> str:
    """summary.md: one line per config, best mean validation loss first."""
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(config_label(r["overrides"]), []).append(r)

    def stats(group, key):
        v = np.array([r[key] for r in group if r[key] is not None], dtype=float)
        return (float(v.mean()), float(v.std()), len(v)) if len(v) else (math.nan, math.nan, 0)

    lines = ["| config | runs | final val nats/char | best val nats/char | final val bits/char "
             "| best val bits/char | tokens | wall time s |", "|---" * 8 + "|"]
    ordered = sorted(by_config.items(), key=lambda kv: (
        math.isnan(stats(kv[1], "best_val_loss")[0]), stats(kv[1], "best_val_loss")[0]))
    for label, group in ordered:
        final, best = stats(group, "final_val_loss"), stats(group, "best_val_loss")
        done = sum(r["complete"] for r in group)
        ln2 = math.log(2)
        lines.append(
            f"| {label} | {done}/{len(group)} | {final[0]:.4f} ± {final[1]:.4f} "
            f"| {best[0]:.4f} ± {best[1]:.4f} | {final[0] / ln2:.4f} ± {final[1] / ln2:.4f} "
            f"| {best[0] / ln2:.4f} ± {best[1] / ln2:.4f} | {group[0]['tokens']:,} "
            f"| {np.mean([r['wall_time_s'] for r in group]):.0f} |")
    notes = ["", "Mean ± standard deviation over the seeds of each config; runs = runs that "
                 "finished with a validation loss / runs. A run that diverged or was "
                 "interrupted counts only with the evaluations it made."]
    return "\n".join(lines + notes) + "\n"


def write(out: pathlib.Path, points) -> list[dict]:
    """Writes the three reports and prints summary.md; returns summary.json's entries."""
    rows = entries(out, points)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (out / "summary.md").write_text(f"# Sweep {out}\n\n{text}")
    from chatgot_jax import plot  # noqa: PLC0415 (matplotlib)

    groups: dict[str, list[pathlib.Path]] = {}
    for r in rows:
        groups.setdefault(config_label(r["overrides"]), []).append(pathlib.Path(r["run_dir"]))
    plot.plot_groups(groups, out / "curves.png")
    print(text + f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'curves.png'}")
    return rows
