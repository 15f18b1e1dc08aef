"""Compare any run directories over seeds: the sweep's report for runs made at any time.

    python -m chatgot_jax.compare DIR [DIR ...] [--by FIELD ...] [--metric val|full]
        [--out curves.png] [--json FILE]                      (or: chatgot-compare ...)

DIR is a run directory (train.py's, a sweep's, a converted one) or a sweep
directory (each of its runs). Runs are grouped by config: every field but the
seeds and those that steer only logging (comparison.NOT_COMPARED) by default,
or only the fields named with --by. Each group's figure is the mean over its
runs with a 95% Student-t interval; every group is compared with the best one,
paired by seed (chatgot_jax.comparison, docs/sweeps.md).
--metric val (default) reads each run's final windowed validation loss from
its metrics.jsonl; --metric full evaluates its final checkpoint on the whole
validation split (chatgot_jax.evaluate, remembered in the run directory).
--out draws the mean validation curve of each group with its 95% band.
"""

import json
import pathlib

from chatgot_jax import cli, comparison
from chatgot_jax.errors import UserError


def run_dirs(paths) -> list[pathlib.Path]:
    """The run directories named, a sweep directory standing for its runs."""
    found = []
    for given in map(pathlib.Path, paths):
        if not given.is_dir():
            raise UserError(f"{given} is not a directory: give run or sweep directories")
        if (given / "sweep.json").is_file():
            runs = sorted(p for p in given.iterdir() if (p / "config.json").is_file())
            if not runs:
                raise UserError(f"sweep directory {given} holds no run directory yet")
            found.extend(runs)
        elif (given / "config.json").is_file():
            found.append(given)
        else:
            raise UserError(f"{given} is neither a run directory (config.json) nor a sweep "
                            f"directory (sweep.json)")
    if len(set(map(str, found))) != len(found):
        raise UserError("a run directory is named twice")
    return found


def value_of(run_dir: pathlib.Path, metric: str) -> float:
    if metric == "val":
        value = comparison.final_val(run_dir)
        if value is None:
            raise UserError(f"{run_dir} has no validation loss in its metrics.jsonl: use "
                            f"--metric full, or leave it out")
        return value
    from chatgot_jax import checkpoint as ckpt  # noqa: PLC0415
    from chatgot_jax.evaluate import evaluate_run  # noqa: PLC0415

    if not ckpt.existing_steps(run_dir):
        raise UserError(f"{run_dir} holds no checkpoint to evaluate: --metric full needs one")
    return evaluate_run(run_dir)["nats_per_char"]


def compare(paths, by=None, metric: str = "val") -> tuple[dict, dict]:
    """(report, {label: [run dir]}) of the runs under paths."""
    dirs = run_dirs(paths)
    groups = comparison.group_runs(dirs, by)
    if len(groups) < 2:
        raise UserError(f"the {len(dirs)} runs form one group ({next(iter(groups))}): there "
                        f"is nothing to compare; give runs of other configs, or --by FIELD")
    values = {label: [(comparison.seeds_of(comparison.read_config(d)), value_of(d, metric))
                      for d in members] for label, members in groups.items()}
    return comparison.report(values, metric), groups


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories")
    p.add_argument("--by", nargs="+", metavar="FIELD",
                   help="group by these config fields only (e.g. train.lr); default: every "
                        "field but the seeds and those that steer only logging ("
                        + ", ".join(comparison.NOT_COMPARED) + ")")
    p.add_argument("--metric", choices=sorted(comparison.METRICS), default="val",
                   help="val: final windowed validation loss; full: the whole validation "
                        "split, evaluated (default val)")
    p.add_argument("--out", metavar="PNG", help="draw each group's mean curve and 95%% band")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    return p


def run(args) -> dict:
    rep, groups = compare(args.dirs, args.by, args.metric)
    print(comparison.markdown(rep), end="")
    if args.json:
        try:
            pathlib.Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror}") from None
    if args.out:
        from chatgot_jax import plot  # noqa: PLC0415 (matplotlib)

        plot.plot_groups(groups, args.out)
        print(f"wrote {args.out}")
    return rep


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-compare console script and python -m

if __name__ == "__main__":
    command()
