"""The sweep: vmapped groups equal runs trained alone, reports, groups, resume, bad grids."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import comparison, sample_cli, sweep
from conftest import MICRO_OVERRIDES, ROOT

ARGS = MICRO_OVERRIDES + ["--max-steps", "6", "--eval-every", "3", "--save-every", "3",
                          "--batch-size", "8", "train.log_every=1", "mesh.data=1",
                          "train.eval_windows=8", "train.warmup_steps=2"]
GRID = "train.lr=1e-3,1e-2 model.dropout=0,0.1"
NAMES = ["lr=1e-3,dropout=0,seed=0", "lr=1e-3,dropout=0.1,seed=0",
         "lr=1e-2,dropout=0,seed=0", "lr=1e-2,dropout=0.1,seed=0"]


def sweep_argv(corpus, out, *extra, grid=GRID):
    return ["--data", str(corpus), "--out", str(out), "--grid", grid, *ARGS, *extra]


def logged(run_dir, last_start: bool = False) -> tuple[dict, dict]:
    """({step: train loss}, {step: val loss}) of a run (the later start's value where two
    logged a step), or of its last start only."""
    train, val = {}, {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "first_step_s" in r and last_start:
            train, val = {}, {}
        elif "loss" in r:
            train[r["step"]] = r["loss"]
        elif "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return train, val


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("sweeps") / "vmapped"
    rows = sweep.main(sweep_argv(corpus, out))
    return out, rows


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("sweeps") / "sequential"
    sweep.main(sweep_argv(corpus, out, "--sequential"))
    return out


def test_vmapped_runs_equal_runs_trained_alone(vmapped, sequential):
    out, _ = vmapped
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(NAMES)
    for name in NAMES:
        (train_v, val_v), (train_s, val_s) = logged(out / name), logged(sequential / name)
        assert sorted(train_v) == list(range(1, 7)) and sorted(val_v) == [3, 6]
        for got, want in ((train_v, train_s), (val_v, val_s)):
            np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
    # the four runs really differ: per-run lr and dropout reached the vmapped step
    finals = {name: logged(out / name)[0][6] for name in NAMES}
    assert len(set(finals.values())) == 4


def test_each_run_is_a_normal_run_directory(vmapped, capsys):
    out, _ = vmapped
    run = out / NAMES[2]
    for name in ("config.json", "config-history.jsonl", "provenance.jsonl", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert ckpt.existing_steps(run) == [3, 6]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 1e-2 and config["model"]["dropout"] == 0.0
    assert config["train"]["seed"] == 0 and config["train"]["sample_tokens"] == 0
    sample_cli.main(["--checkpoint", str(run), "--prompt", "ARYA: ", "--max-new-tokens", "20",
                 "--best"])
    text = capsys.readouterr().out
    assert text.startswith("ARYA: ") and len(text) >= len("ARYA: ") + 20


def test_summary_json_and_md(vmapped):
    out, summary = vmapped
    rows = summary["runs"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [r["name"] for r in rows] == NAMES and summary["metric"] == "val"
    for r in rows:
        train, val = logged(out / r["name"])
        assert r["final_val_loss"] == val[6] and r["best_val_loss"] == min(val.values())
        assert r["complete"] and r["tokens"] == 6 * 8 * 32 and r["seed"] == 0
        assert r["seeds"] == [0, 0, 0]
        assert r["run_dir"] == str(out / r["name"]) and r["wall_time_s"] > 0
    configs = summary["configs"]
    assert [c["n"] for c in configs] == [1] * 4  # one seed each: no interval
    assert all(c["lo"] is None for c in configs)
    assert [c["mean"] for c in configs] == sorted(c["mean"] for c in configs)  # best first
    by_config = {" ".join(r["overrides"]): r["final_val_loss"] for r in rows}
    assert configs[0]["config"] == min(by_config, key=by_config.get)
    assert configs[0]["verdict"] == "best"
    assert all(c["verdict"] == "not distinguishable at these seeds" for c in configs[1:])
    table = (out / "summary.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| train.")]
    assert len(body) == 4  # one line per config
    assert body[0].startswith(f"| {configs[0]['config']} | 1 | ")
    assert "(one seed: no interval)" in body[0]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_shape_changing_axes_make_groups(tmp_path, corpus, capsys):
    out = tmp_path / "groups"
    sweep.main(sweep_argv(corpus, out, "--seeds", "0", "1", "--max-steps", "2",
                          grid="model.d_hid=32,64"))
    printed = capsys.readouterr().out
    assert "group 1/2: 2 runs trained together (d_hid=32,seed=0, d_hid=32,seed=1)" in printed
    assert "group 2/2: 2 runs trained together (d_hid=64,seed=0, d_hid=64,seed=1)" in printed
    rows = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["complete"] for r in rows] == [True] * 4
    seeds = {r["name"]: logged(out / r["name"])[0][1] for r in rows}
    assert seeds["d_hid=32,seed=0"] != seeds["d_hid=32,seed=1"]  # seeds are really different


def test_each_run_of_a_group_cuts_its_own_batches(tmp_path, corpus, capsys):
    """Runs that differ only in their data seed are one vmapped group sharing one copy of
    the tokens on the device; each cuts the batches its seed gives when trained alone."""
    argv = ["--max-steps", "3", "--eval-every", "3", "--save-every", "3"]
    sweep.main(sweep_argv(corpus, tmp_path / "vmapped", *argv, grid="train.data_seed=1,2"))
    assert "2 runs trained together" in capsys.readouterr().out
    sweep.main(sweep_argv(corpus, tmp_path / "alone", "--sequential", *argv,
                          grid="train.data_seed=1,2"))
    losses = {}
    for name in ("data_seed=1,seed=0", "data_seed=2,seed=0"):
        (got, _), (want, _) = logged(tmp_path / "vmapped" / name), logged(tmp_path / "alone" / name)
        assert sorted(got) == sorted(want) == [1, 2, 3]
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
        losses[name] = got
    assert losses["data_seed=1,seed=0"][1] != losses["data_seed=2,seed=0"][1]  # other batches


def test_resume_after_kill_9(vmapped, tmp_path, corpus):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "chatgot_jax.sweep", *sweep_argv(corpus, out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, t0 = 240, time.monotonic()
        while not all(3 in ckpt.existing_steps(out / n) for n in NAMES):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() - t0 < deadline, "no checkpoint at step 3"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists()
    sweep.main(sweep_argv(corpus, out))  # the same command
    for name in NAMES:
        train, val = logged(out / name)
        want_train, want_val = logged(vmapped[0] / name)
        assert {s: train[s] for s in (4, 5, 6)} == {s: want_train[s] for s in (4, 5, 6)}
        assert val[6] == want_val[6]


def run_sweep(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sweep.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_another_definition_in_the_same_out_is_refused(vmapped, corpus, capsys):
    out, _ = vmapped
    before = (out / "sweep.json").read_text()
    line = run_sweep(sweep_argv(corpus, out, grid="train.lr=1e-3,3e-3"), capsys)
    assert "holds another sweep (grid ['train.lr=1e-3,1e-2', 'model.dropout=0,0.1'] -> " \
           "['train.lr=1e-3,3e-3'])" in line
    assert (out / "sweep.json").read_text() == before


@pytest.mark.parametrize("grid, seeds, expected", [
    ("train.lr", ["0"], "bad grid part 'train.lr'"),
    ("lr=1e-3,2e-3", ["0"], "bad grid part 'lr=1e-3,2e-3'"),
    ("train.lr=1e-3,,2e-3", ["0"], "a value is empty"),
    ("train.lrr=1e-3", ["0"], "unknown config key 'train.lrr'"),
    ("train.lr=-1", ["0"], "train.lr must be positive"),
    (" ", ["0"], "the grid is empty"),
    ("train.lr=1e-3", ["0", "1", "0"], "--seeds has a duplicate: 0 1 0"),
    # the seeds come from --seeds only: a grid over train.seed would be overridden by them
    ("train.seed=1,2,3", ["0"], "--grid cannot set train.seed: give the seeds with --seeds"),
    ("train.lr=1e-3,2e-3 train.seed=4", ["0"], "--grid cannot set train.seed"),
])
def test_bad_grids(tmp_path, corpus, capsys, grid, seeds, expected):
    out = tmp_path / "bad"
    line = run_sweep(sweep_argv(corpus, out, "--seeds", *seeds, grid=grid), capsys)
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize("given", [["--seed", "5"], ["train.seed=5"]])
def test_train_seed_in_the_overrides_is_refused(tmp_path, corpus, capsys, given):
    line = run_sweep(sweep_argv(corpus, tmp_path / "bad", *given), capsys)
    assert "the overrides cannot set train.seed: give the seeds with --seeds" in line
    assert not (tmp_path / "bad").exists()


def provenance_starts(run_dir) -> list[int]:
    return [json.loads(line)["start_step"]
            for line in (run_dir / "provenance.jsonl").read_text().splitlines()]


# Orbax's reader threads report the failed read once more, as an unraisable exception
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_more_steps_resume_from_the_newest_common_readable_checkpoint(vmapped, tmp_path, corpus,
                                                                      capsys):
    """A finished sweep given a higher --max-steps trains further, as train.py does. One
    run's newest checkpoint is corrupt: it is set aside, and the whole group resumes from
    the step before (the others' checkpoints after it are trained again and replaced),
    exactly as a group that had only that step; provenance says where each run resumed."""
    corrupt, trimmed = tmp_path / "corrupt", tmp_path / "trimmed"
    for copy in (corrupt, trimmed):
        shutil.copytree(vmapped[0], copy)
    for p in (corrupt / NAMES[1] / "checkpoints" / "6" / "params").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            os.truncate(p, p.stat().st_size // 2)
    for name in NAMES:  # the reference: every run holds only step 3
        shutil.rmtree(trimmed / name / "checkpoints" / "6")
    capsys.readouterr()
    more = ["--max-steps", "9"]
    sweep.main(sweep_argv(corpus, corrupt, *more))
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"checkpoint step 6 in {(corrupt / NAMES[1]).resolve()}" \
        in warnings[0], captured.err[-2000:]
    assert "resuming at step 3" in captured.out
    sweep.main(sweep_argv(corpus, trimmed, *more))
    assert "train.max_steps=9" in json.loads((corrupt / "sweep.json").read_text())["overrides"]
    for name in NAMES:
        (got, got_val), (want, want_val) = logged(corrupt / name, last_start=True), logged(
            trimmed / name, last_start=True)
        assert sorted(got) == list(range(4, 10)) and got == want and got_val == want_val
        assert ckpt.existing_steps(corrupt / name) == [3, 6, 9]
        assert provenance_starts(corrupt / name) == [0, 3]
        history = [json.loads(line) for line in
                   (corrupt / name / "config-history.jsonl").read_text().splitlines()]
        assert history[-1]["step"] == 3 and history[-1]["changes"] == {
            "train.max_steps": [6, 9]}
    assert [p.name[:2] for p in (corrupt / NAMES[1] / "corrupt-checkpoints").iterdir()] == \
        ["6-"]
    rows = json.loads((corrupt / "summary.json").read_text())["runs"]
    assert all(r["complete"] and r["steps"] == 9 for r in rows)


def test_plot_groups_run_directories_by_config(vmapped, tmp_path, capsys):
    from chatgot_jax import plot

    out, _ = vmapped
    png = tmp_path / "groups.png"
    plot.main([*(str(out / n) for n in NAMES), "--group", "--out", str(png)])
    printed = capsys.readouterr().out
    assert "model.dropout=0.0 train.lr=0.001 (1 runs)" in printed
    assert png.read_bytes()[:4] == b"\x89PNG"
    groups = comparison.group_runs([out / n for n in NAMES] + [out / NAMES[0]])
    assert len(groups) == 4 and len(groups["model.dropout=0.0 train.lr=0.001"]) == 2


def test_runs_with_one_evaluation_each_are_visible(tmp_path):
    """A series of one point would be a zero-length line: every series with few points
    gets a mark at each point (the drawn artists, not pixels)."""
    from chatgot_jax import plot

    groups = {}
    for lr in ("1e-3", "1e-2"):
        run = tmp_path / f"lr={lr}"
        run.mkdir()
        records = [{"step": s, "loss": 3.0 - s / 10, "tokens": 256 * s, "time": s}
                   for s in (1, 2, 3)] + [{"step": 3, "val_loss": 2.5, "val_bpc": 3.6,
                                          "time": 3.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        groups[f"lr={lr}"] = [run]
    for fig in (plot.plot_groups(groups, tmp_path / "groups.png"),
                plot.plot_curves({k: plot.read_metrics(v[0]) for k, v in groups.items()},
                                 tmp_path / "curves.png")):
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        single = [line for line in lines if len(line.get_xdata()) == 1]
        assert len(single) >= 2  # each run's one evaluation, in each figure
        for line in lines:
            assert line.get_marker() == "o" and line.get_markersize() > 0, line.get_label()
