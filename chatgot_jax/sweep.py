"""Research comparisons: many runs trained as one program and reported side by side.

    python -m chatgot_jax.sweep --variant tiny --out runs/lr-sweep --seeds 0 1 2 \\
        --grid "train.lr=1e-3,2e-3,4e-3" [--data PATH] [--sequential] [train.py flags ...]

The sweep is the cross product of the grid's axes and the seeds. Runs whose
configs differ only in per-run values (PER_RUN: lr and schedule, weight decay,
betas, clipping, dropout rate, seeds) form a group: their train states are
stacked on a leading run axis and one jitted train step is vmapped over it,
each run with its own hyper-parameters, batches and dropout keys (the trainer's
one loop, chatgot_jax.trainer.train_runs). Axes that change shapes or the loop
(model size, batch, context, accumulation, steps) split the sweep into groups
trained one after another. --sequential trains each run on its own, as
train.py does. Seeds come from --seeds only: train.seed in --grid or in the
overrides is refused (the other seed fields, init/data/dropout_seed, may be
axes).

Every run gets a normal run directory OUT/NAME (config, metrics.jsonl,
TensorBoard events, checkpoints, provenance); OUT/sweep.json holds the sweep's
definition, and the reports are OUT/summary.json, OUT/summary.md and
OUT/curves.png (chatgot_jax.sweep_report). The same command resumes a killed
sweep, and with a higher --max-steps (or other bookkeeping: config.BOOKKEEPING)
trains a finished one further, as train.py does; another definition in the
same OUT is refused.
"""

import dataclasses
import json
import pathlib
import time

from chatgot_jax import cli
from chatgot_jax import config as config_lib
from chatgot_jax.errors import UserError

# Config fields that may differ between the runs of one vmapped group.
PER_RUN = ("train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay",
           "train.beta1", "train.beta2", "train.grad_clip", "train.seed", "train.init_seed",
           "train.data_seed", "train.dropout_seed", "model.dropout")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    name: str  # its run directory's name: the grid values, then the seed
    overrides: tuple[str, ...]  # the grid point (the seed is separate)
    seed: int
    cfg: config_lib.Config


def plan(variant, config_file, overrides, grid: str, seeds) -> list[Point]:
    """Every (grid point, seed) with its validated config; raises UserError first."""
    points = config_lib.parse_grid(grid)
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds has a duplicate: {' '.join(map(str, seeds))}")
    for given, where in ((points[0], "--grid"), (overrides, "the overrides")):
        if any(o.partition("=")[0] == "train.seed" for o in given):
            raise UserError(f"{where} cannot set train.seed: give the seeds with --seeds "
                            f"(each grid point runs once per seed)")
    out = []
    for point in points:
        for seed in seeds:
            cfg = config_lib.load_config(variant, config_file,
                                         [*overrides, *point, f"train.seed={seed}"])
            name = ",".join([*(p.partition(".")[2] for p in point), f"seed={seed}"])
            out.append(Point(name, tuple(point), seed, cfg))
    return out


def group_key(cfg: config_lib.Config) -> tuple:
    """What the runs of one vmapped group share: everything but PER_RUN."""
    flat = {f"{s}.{k}": v for s, fields in config_lib.to_dict(cfg).items()
            for k, v in fields.items()}
    return tuple(sorted((k, v) for k, v in flat.items() if k not in PER_RUN))


def groups_of(points: list[Point]) -> list[list[Point]]:
    """Points grouped by group_key, in the order of their first point."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(group_key(p.cfg), []).append(p)
    return list(groups.values())


def definition(args, overrides: list[str]) -> dict:
    """What makes a sweep: a rerun with the same definition resumes it."""
    return {"variant": args.variant, "config": args.config, "data": args.data,
            "overrides": overrides, "grid": args.grid.split(), "seeds": args.seeds}


def training_part(definition: dict) -> dict:
    """The definition without its bookkeeping overrides (config.BOOKKEEPING: max_steps,
    eval_every, ...), which a resumed sweep may change as a resumed run may."""
    overrides = [o for o in definition.get("overrides", [])
                 if o.partition("=")[0] not in config_lib.BOOKKEEPING]
    return {**definition, "overrides": overrides}


def check_definition(out: pathlib.Path, wanted: dict) -> None:
    """Refuses an OUT that holds another sweep (or that is not a sweep directory)."""
    path = out / "sweep.json"
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no sweep.json: use another --out")
        return
    try:
        saved = training_part(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): use another --out") from None
    wanted = training_part(wanted)
    diff = [f"{k} {saved.get(k)} -> {v}" for k, v in wanted.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"{out} holds another sweep ({'; '.join(diff)}): use another --out, "
                        f"or the same command to resume it")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0],
                           epilog="Any train.py flag or section.field=value applies to every "
                                  "run. Samples at evaluation are off unless "
                                  "train.sample_tokens is set.")
    cli.add_config_arguments(p)
    p.add_argument("--out", required=True, help="the sweep directory (one run directory each)")
    p.add_argument("--grid", required=True,
                   help='axes of the sweep, e.g. "train.lr=1e-3,3e-3 model.dropout=0,0.1"')
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="train.seed values: each grid point runs once per seed (default 0); "
                        "the only way to set train.seed in a sweep")
    p.add_argument("--sequential", action="store_true",
                   help="train each run on its own, with train.py's code path")
    p.add_argument("--final-eval", choices=["full"],
                   help="full: compare the configs on each run's final checkpoint evaluated "
                        "over the whole validation split (python -m chatgot_jax.evaluate), "
                        "not on the windowed validation loss of its log")
    return p


def run(args) -> dict:
    overrides = cli.overrides_of(args)
    if not any(o.startswith("train.sample_tokens=") for o in overrides):
        overrides.append("train.sample_tokens=0")
    points = plan(args.variant, args.config, overrides, args.grid, args.seeds)
    out = pathlib.Path(args.out)
    from chatgot_jax import run_dir as run_dir_lib  # noqa: PLC0415 (--help stays instant)
    from chatgot_jax import sweep_report  # noqa: PLC0415

    run_dir_lib.check_path(out)
    wanted = definition(args, overrides)
    check_definition(out, wanted)
    lock = run_dir_lib.RunLock(out)
    run_dir_lib.create(out, lock)
    try:
        (out / "sweep.json").write_text(json.dumps(wanted, indent=2) + "\n")
        t0 = time.time()
        try:
            finished = train_all(points, args.data, out, args.sequential, args.command)
        except KeyboardInterrupt:  # a second Ctrl-C, in the middle of a step
            finished = False
        if not finished:
            print(f"interrupted: the runs in {out} keep their last checkpoints; run the same "
                  f"command to resume the sweep")
            return {}
        print(f"{len(points)} runs done in {time.time() - t0:.0f} s")
        return sweep_report.write(out, points, args.final_eval)
    finally:
        lock.release()


def train_all(points, data_path, out: pathlib.Path, sequential: bool, command) -> bool:
    """Trains every run, group by group (each run alone with `sequential`); False if
    Ctrl-C stopped the sweep (it saved; the same command resumes)."""
    from chatgot_jax import trainer  # noqa: PLC0415

    groups = [[p] for p in points] if sequential else groups_of(points)
    for i, g in enumerate(groups, 1):
        print(f"group {i}/{len(groups)}: {len(g)} run{'s' * (len(g) > 1)}"
              f"{' trained together' * (len(g) > 1)} ({', '.join(p.name for p in g)})",
              flush=True)
        summaries = trainer.train_runs([(p.name, p.cfg, out / p.name) for p in g], data_path,
                                       command=command)
        if any(s["interrupted"] for s in summaries):
            return False
    return True


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-sweep console script and python -m

if __name__ == "__main__":
    command()
