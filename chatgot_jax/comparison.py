"""Comparisons of runs over seeds: runs grouped by config, each group's mean with its 95%
interval, and each group against the best one, paired by seed.

    group_runs(dirs, by)       {label: [run dir]}: by config (all but seeds and logging),
                               or by the named fields only
    seeds_of(run_dir)          the run's (init, data, dropout) seeds: runs that share them
                               share their initial weights, batches and dropout masks
                               (a PyTorch run, tools.torch_train: not the masks)
    final_val(run_dir)         the last windowed validation loss in metrics.jsonl
    report(groups, metric)     the statistics (chatgot_jax.stats) of {label: [(seeds, value)]}
    markdown(report)           the report as a table, best first

Used by the sweep's summary (sweep_report.py) and the compare command.
"""

import json
import math
import pathlib

from chatgot_jax import config as config_lib
from chatgot_jax import stats
from chatgot_jax.errors import UserError

METRICS = {"val": "final validation loss over the run's fixed windows (metrics.jsonl)",
           "full": "full-split validation loss of the final checkpoint (chatgot_jax.evaluate)"}


def read_config(run_dir: pathlib.Path) -> dict:
    """{"section.field": value} of a run's config.json, plus "run.side": "pytorch" for a
    run tools/torch_train.py trained (its torch.json says so), else "jax"; UserError if
    it has no config.json."""
    path = pathlib.Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a run directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    side = "pytorch" if (pathlib.Path(run_dir) / "torch.json").is_file() else "jax"
    return {"run.side": side,
            **{f"{s}.{k}": v for s, fields in cfg.items() for k, v in fields.items()}}


SEEDS = tuple(f"train.{k}" for k in config_lib.SEED_FIELDS)

# Fields that change what a run logs or keeps, never what it trains: runs that differ
# only in these (a sweep turns evaluation samples off, train.py leaves them on) are one
# config. max_steps, eval_windows and the rest of config.BOOKKEEPING can change the
# figure compared, so they still separate groups.
NOT_COMPARED = ("train.sample_tokens", "train.log_every", "train.eval_every",
                "train.save_every", "train.keep")


def seeds_of(flat: dict) -> tuple[int, int, int]:
    """(init, data, dropout) seed of a run's flat config (-1 means train.seed)."""
    seed = flat["train.seed"]
    return tuple(seed if flat.get(f"train.{s}_seed", -1) == -1 else flat[f"train.{s}_seed"]
                 for s in ("init", "data", "dropout"))


def group_runs(dirs, by: list[str] | None = None) -> dict[str, list[pathlib.Path]]:
    """Run directories grouped: by default those whose configs differ only in seeds and
    NOT_COMPARED fields (labelled by the fields in which the groups differ), else by the
    values of the named fields. UserError for a field no run has."""
    dirs = [pathlib.Path(d) for d in dirs]
    configs = [read_config(d) for d in dirs]
    if by:
        for field in by:
            if not any(field in c for c in configs):
                raise UserError(f"--by {field}: no run has that config field (write "
                                f"section.field, e.g. train.lr)")
        keys = list(by)
    else:
        keys = sorted({k for c in configs for k in c if k not in (*SEEDS, *NOT_COMPARED)
                       and len({json.dumps(o.get(k)) for o in configs}) > 1})
    groups: dict[str, list[pathlib.Path]] = {}
    for d, c in zip(dirs, configs):
        label = " ".join(f"{k}={c.get(k)}" for k in keys) or "(one config)"
        groups.setdefault(label, []).append(d)
    return groups


def final_val(run_dir: pathlib.Path) -> float | None:
    """The last val_loss of metrics.jsonl (the newest start's final evaluation), or None."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    value = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if "val_loss" in record and math.isfinite(record["val_loss"]):
                value = record["val_loss"]
    return value


def report(groups: dict[str, list[tuple[tuple, float]]], metric: str) -> dict:
    """Per group: mean and 95% t-interval over its seeds; against the best group (the
    lowest mean): the paired difference over the seeds both have (paired t-test), the
    unpaired one when seeds are not all shared (Welch), and a verdict."""
    rows = []
    for label, runs in groups.items():
        values = [v for _, v in runs]
        rows.append({"config": label, "seeds": [list(s) for s, _ in runs],
                     "values": values, **stats.mean_interval(values)})
    rows.sort(key=lambda r: r["mean"])
    best = rows[0]
    best_by_seed = {tuple(s): v for s, v in zip(best["seeds"], best["values"])}
    for row in rows[1:]:
        mine = {tuple(s): v for s, v in zip(row["seeds"], row["values"])}
        shared = [s for s in mine if s in best_by_seed]
        row["paired"] = (stats.paired_difference([mine[s] for s in shared],
                                                 [best_by_seed[s] for s in shared])
                         if shared else None)
        all_shared = set(mine) == set(best_by_seed)
        row["welch"] = None if all_shared else stats.welch_difference(row["values"],
                                                                     best["values"])
        row["verdict"] = stats.verdict(row["paired"] if all_shared else row["welch"])
    best.update(paired=None, welch=None, verdict="best")
    return {"metric": metric, "metric_means": METRICS[metric], "level": stats.LEVEL,
            "configs": rows}


def _interval(row: dict, scale: float = 1.0) -> str:
    if row["lo"] is None:
        return f"{row['mean'] * scale:.4f} (one seed: no interval)"
    return f"{row['mean'] * scale:.4f} [{row['lo'] * scale:.4f}, {row['hi'] * scale:.4f}]"


def _difference(d: dict | None) -> tuple[str, str]:
    if d is None:
        return "", ""
    if d["lo"] is None:
        return f"{d['diff']:+.4f} (n={d['n']}: no interval)", "-"
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] (n={d['n']})", f"{d['p']:.3g}"


def markdown(rep: dict) -> str:
    """The report as a markdown table, best first, and what its columns mean."""
    ln2 = math.log(2)
    lines = ["| config | seeds | nats/char: mean [95% CI] | bits/char: mean [95% CI] "
             "| vs best, paired: diff [95% CI] | p | vs best, Welch | p | verdict |",
             "|---" * 9 + "|"]
    for row in rep["configs"]:
        paired, p_paired = _difference(row.get("paired"))
        welch, p_welch = _difference(row.get("welch"))
        lines.append(f"| {row['config']} | {row['n']} | {_interval(row)} "
                     f"| {_interval(row, 1 / ln2)} | {paired} | {p_paired} | {welch} "
                     f"| {p_welch} | {row['verdict']} |")
    notes = ["", f"Metric: {rep['metric_means']}. Mean over each config's seeds with its 95% "
             f"Student-t interval. Each config is compared with the best one (the lowest "
             f"mean): paired = the mean of the seed-by-seed differences (runs with the same "
             f"seeds share their initial weights, batches and dropout masks; a PyTorch run "
             f"started from a JAX run's weights shares them and its batches, not its masks), "
             f"its 95% interval and the paired t-test's two-sided p-value, over the seeds "
             f"both have; Welch = the difference of the means with Welch's unpaired t-test, "
             f"shown when the two do not have the same seeds. Verdict: better or worse at p < 0.05 "
             f"(from the paired test when every seed is shared, else Welch's), otherwise "
             f"not distinguishable at these seeds."]
    return "\n".join(lines + notes) + "\n"
