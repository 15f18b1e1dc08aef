"""A sweep's reports: OUT/summary.json (every run, and every config's statistics over its
seeds), OUT/summary.md (the configs side by side with 95% intervals and paired
comparisons: chatgot_jax.comparison), OUT/curves.png (mean and 95% band per config).

The numbers come from each run's metrics.jsonl (the final windowed validation
loss), or with final_eval="full" from the full-split evaluation of each run's
final checkpoint (chatgot_jax.evaluate, remembered in the run directory), so
the reports can be rebuilt from the run directories at any time.
"""

import json
import math
import pathlib

from chatgot_jax import comparison
from chatgot_jax import config as config_lib


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


def entries(out: pathlib.Path, points, final_eval: str | None = None) -> list[dict]:
    rows = []
    for p in points:
        run = read_run(out / p.name)
        row = {"name": p.name, "overrides": list(p.overrides), "seed": p.seed,
               "seeds": [config_lib.seed_of(p.cfg.train, s) for s in ("init", "data",
                                                                       "dropout")],
               "run_dir": str(out / p.name), **run,
               "complete": run["steps"] >= p.cfg.train.max_steps
               and run["final_val_loss"] is not None}
        if final_eval == "full" and row["complete"]:
            from chatgot_jax.evaluate import evaluate_run  # noqa: PLC0415

            full = evaluate_run(out / p.name)
            row["full_val_loss"], row["full_val_se"] = full["nats_per_char"], full["se_nats"]
        rows.append(row)
    return rows


def config_label(overrides) -> str:
    return " ".join(overrides) or "(base config)"


def statistics(rows: list[dict], final_eval: str | None) -> dict:
    """comparison.report over the configs, from the runs that finished."""
    metric, key = ("full", "full_val_loss") if final_eval == "full" else ("val",
                                                                       "final_val_loss")
    groups: dict[str, list] = {}
    for r in rows:
        if r["complete"] and r.get(key) is not None and math.isfinite(r[key]):
            groups.setdefault(config_label(r["overrides"]), []).append(
                (tuple(r["seeds"]), r[key]))
    return comparison.report(groups, metric) if groups else {"metric": metric, "configs": []}


def write(out: pathlib.Path, points, final_eval: str | None = None) -> dict:
    """Writes the three reports and prints summary.md; returns summary.json's content."""
    rows = entries(out, points, final_eval)
    rep = statistics(rows, final_eval)
    summary = {"runs": rows, **rep}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    done = sum(r["complete"] for r in rows)
    text = (comparison.markdown(rep) if rep["configs"] else "No run finished.\n") + (
        f"\n{done} of {len(rows)} runs finished with a validation loss; a run that diverged "
        f"or was interrupted is left out of the statistics.\n")
    (out / "summary.md").write_text(f"# Sweep {out}\n\n{text}")
    from chatgot_jax import plot  # noqa: PLC0415 (matplotlib)

    groups: dict[str, list[pathlib.Path]] = {}
    for r in rows:
        groups.setdefault(config_label(r["overrides"]), []).append(pathlib.Path(r["run_dir"]))
    plot.plot_groups(groups, out / "curves.png")
    print(text + f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'curves.png'}")
    return summary
