"""Faults during training: kill -9, a killed save, corrupt checkpoints, NaN, disk full, Ctrl-C.

Every run uses one micro config and a small inline corpus. One uninterrupted run
(8 steps, a checkpoint every 2) is the baseline: a run that survives a fault must
log exactly its losses after the resume point and end with exactly its params.

Orbax 0.12.8 writes a step into `<step>.orbax-checkpoint-tmp` (each item into
`<item>.orbax-checkpoint-tmp` inside it) and renames it to `<step>` when complete;
orbax's docstrings also show a `-<timestamp>` suffix. `checkpoint_steps` lists only
renamed steps, and a manager created with `cleanup_tmp_directories=True` deletes
any directory whose name contains `.orbax-checkpoint-tmp`.
"""

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import cli
from chatgot_jax import config as config_lib
from chatgot_jax import run_dir as run_dir_lib
from chatgot_jax import train_cli, train_lib, trainer
from chatgot_jax.errors import RunError, UserError
from conftest import MICRO_OVERRIDES

REPO = pathlib.Path(__file__).resolve().parents[1]
WRAPPER = str(REPO / "tests" / "fault_wrapper.py")  # train.py with one fault injected
TMP_SUFFIX = ".orbax-checkpoint-tmp"
OVERRIDES = MICRO_OVERRIDES + [
    "train.batch_size=8", "mesh.data=1", "train.eval_windows=8", "train.sample_tokens=0",
    "train.log_every=1", "train.warmup_steps=2", "train.keep=10"]
STEPS = list(range(1, 9))
SUBPROCESS_TIMEOUT = 240


# ---------------------------------------------------------------------------- helpers


def argv(run_dir, corpus, *flags):
    """train.py arguments: the baseline's 8 steps with a checkpoint every 2, then `flags`."""
    return ["--data", str(corpus), "--out", str(run_dir), "--max-steps", "8",
            "--save-every", "2", *flags, *OVERRIDES]


def config_for(args):
    parsed = train_cli.build_parser().parse_intermixed_args(args)
    return config_lib.load_config(parsed.variant, parsed.config, cli.overrides_of(parsed))


def runs_in_metrics(run_dir):
    """metrics.jsonl split into runs at each run's first_step_s record:
    [(the step the run started from, {step: loss})]."""
    runs = []
    for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "first_step_s" in record:
            runs.append((record["step"], {}))
        elif "loss" in record:
            assert record["step"] not in runs[-1][1], f"step {record['step']} logged twice"
            runs[-1][1][record["step"]] = record["loss"]
    return runs


def logged_steps(run_dir):
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def params_at(run_dir, step=None):
    params, _, _, got = ckpt.load_for_inference(str(run_dir), step=step)
    return got, jax.device_get(params)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def tmp_dirs(run_dir):
    return sorted(p.name for p in (pathlib.Path(run_dir) / ckpt.CKPT_SUBDIR).iterdir()
                  if TMP_SUFFIX in p.name)


def copy_run(src, dest, keep_steps):
    """A copy of run dir `src` with only the checkpoints `keep_steps` and no metrics."""
    shutil.copytree(src, dest)
    for step in ckpt.existing_steps(dest):
        if step not in keep_steps:
            shutil.rmtree(dest / ckpt.CKPT_SUBDIR / str(step))
    (dest / "metrics.jsonl").unlink()
    assert ckpt.existing_steps(dest) == sorted(keep_steps)


def main_in_process(args):
    """train_cli.main in this process; a Ctrl-C that escapes it must not end the test session."""
    try:
        train_cli.main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train_cli.main")


@contextlib.contextmanager
def spawn(cmd, tmp_path, name, env=None):
    """Popen with stdout/stderr in files; the process is killed on the way out."""
    out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=o, stderr=e,
                                env={**os.environ, **(env or {})})
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def run_bounded(cmd, tmp_path, name, env=None):
    """Runs cmd to its end (or SUBPROCESS_TIMEOUT) -> (returncode, stdout, stderr)."""
    with spawn(cmd, tmp_path, name, env) as (proc, out, err):
        try:
            code = proc.wait(timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} ran past {SUBPROCESS_TIMEOUT} s: {err.read_text()[-2000:]}")
    return code, out.read_text(), err.read_text()


def wait_for(predicate, proc, err, what, timeout=SUBPROCESS_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n"
                        f"{err.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """The uninterrupted run: (run dir, {step: loss}, final params)."""
    run_dir = tmp_path_factory.mktemp("faults") / "baseline"
    summary = trainer.train_and_evaluate(config_for(argv(run_dir, corpus)), str(corpus),
                                         str(run_dir))
    assert summary["steps"] == 8 and not summary["interrupted"]
    [(start, losses)] = runs_in_metrics(run_dir)
    assert start == 0 and sorted(losses) == STEPS
    assert all(np.isfinite(list(losses.values())))
    assert ckpt.existing_steps(run_dir) == [2, 4, 6, 8]
    step, params = params_at(run_dir)
    assert step == 8
    return run_dir, losses, params


def expected_losses(baseline, steps):
    return {s: baseline[1][s] for s in steps}


def assert_finished_like_baseline(run_dir, baseline):
    """All checkpoints exist, no temporary dirs are left, the final params are the baseline's."""
    assert ckpt.existing_steps(run_dir) == [2, 4, 6, 8]
    assert tmp_dirs(run_dir) == []
    step, params = params_at(run_dir)
    assert step == 8
    assert_same_params(params, baseline[2])


# ---------------------------------------------------------------------------- 1. kill -9


def test_kill_9_during_training_resumes_exactly(baseline, corpus, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    args = argv(run_dir, corpus)
    # Parked before step 7 (micro-step 6) until killed: however fast it ran, it is mid-run.
    env = {"FAULT_MODE": "park", "FAULT_ARG": "6", "FAULT_MARKER": str(tmp_path / "parked"),
           "FAULT_RELEASE": str(tmp_path / "never")}
    with spawn([sys.executable, WRAPPER, *args], tmp_path, "killed", env) as (proc, out, err):
        wait_for(lambda: (tmp_path / "parked").exists()
                 and (run_dir / ckpt.CKPT_SUBDIR / "4").is_dir(), proc, err,
                 "checkpoint step 4")
        with pytest.raises(SystemExit) as second:  # a second writer while the first runs
            train_cli.main(args)
        assert second.value.code == 2
        [line] = error_lines(capsys.readouterr().err)
        assert line.startswith(f"error: {run_dir} is in use by process {proc.pid} on "), line
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    at_kill = ckpt.existing_steps(run_dir)
    assert at_kill[:2] == [2, 4] and 8 not in at_kill, at_kill  # killed mid-run
    resume_from = max(at_kill)

    main_in_process(args)  # the same command again
    captured = capsys.readouterr()
    assert f"resuming at step {resume_from}" in captured.out
    assert not warning_lines(captured.err)
    (start0, killed), (start1, resumed) = runs_in_metrics(run_dir)
    assert start0 == 0 and start1 == resume_from
    assert sorted(resumed) == list(range(resume_from + 1, 9))
    assert killed == expected_losses(baseline, killed)  # what the killed run logged
    assert resumed == expected_losses(baseline, resumed)  # bit for bit
    assert_finished_like_baseline(run_dir, baseline)


# ---------------------------------------------------------------------------- 2. killed save


def test_half_written_checkpoints_are_never_loaded(baseline, corpus, tmp_path, capsys):
    """What kill -9 leaves in the middle of saving 6 and just before renaming 8."""
    run_dir = tmp_path / "partial"
    copy_run(baseline[0], run_dir, keep_steps={2, 4})
    checkpoints, source = run_dir / ckpt.CKPT_SUBDIR, baseline[0] / ckpt.CKPT_SUBDIR
    # killed while writing 6, named as orbax 0.12.8 names it: items are written into
    # <item>.orbax-checkpoint-tmp too; here params is half-written, opt_state not begun
    half = checkpoints / f"6{TMP_SUFFIX}"
    shutil.copytree(source / "6", half)
    shutil.rmtree(half / "opt_state")
    (half / "params").rename(half / f"params{TMP_SUFFIX}")
    for p in (half / f"params{TMP_SUFFIX}").rglob("*"):
        if p.is_file() and p.stat().st_size > 64:
            os.truncate(p, p.stat().st_size // 2)
    (half / "commit_success.txt").unlink(missing_ok=True)
    # complete but not renamed, under the older orbax naming with a timestamp
    shutil.copytree(source / "8", checkpoints / f"8{TMP_SUFFIX}-1764284000")
    assert ckpt.existing_steps(run_dir) == [2, 4]

    main_in_process(argv(run_dir, corpus))
    captured = capsys.readouterr()
    assert "resuming at step 4" in captured.out  # not 6, not 8, not from scratch
    assert not warning_lines(captured.err)
    assert runs_in_metrics(run_dir) == [(4, expected_losses(baseline, [5, 6, 7, 8]))]
    assert not (run_dir / "corrupt-checkpoints").exists()
    assert_finished_like_baseline(run_dir, baseline)


def test_kill_9_inside_a_save(baseline, corpus, tmp_path, capsys):
    """A real SIGKILL while orbax writes checkpoint 6, then the same command again."""
    run_dir = tmp_path / "killed-save"
    args = argv(run_dir, corpus)
    code, _, stderr = run_bounded([sys.executable, WRAPPER, *args], tmp_path,
                                  "killed-save", env={"FAULT_MODE": "die-in-save",
                                                      "FAULT_ARG": "6"})
    assert code == -signal.SIGKILL, stderr[-2000:]
    assert ckpt.existing_steps(run_dir) == [2, 4]
    assert tmp_dirs(run_dir) == [f"6{TMP_SUFFIX}"]  # the half-written step, as orbax names it

    main_in_process(args)
    captured = capsys.readouterr()
    assert "resuming at step 4" in captured.out and not warning_lines(captured.err)
    (start0, killed), (start1, resumed) = runs_in_metrics(run_dir)
    assert (start0, start1) == (0, 4)
    # Checkpoint 6 is written in the background: the loop logged step 6 before saving it
    # and may have trained on (it waits for 6 to be complete before saving 8).
    assert set(range(1, 7)) <= set(killed) <= set(STEPS)
    assert killed == expected_losses(baseline, killed)
    assert resumed == expected_losses(baseline, [5, 6, 7, 8])
    assert_finished_like_baseline(run_dir, baseline)


# ---------------------------------------------------------------------------- 3. corrupt files


def truncate_array_files(step_dir):
    """Truncates the array data files of params/ (the OCDBT data files) to half their size."""
    files = [p for p in (step_dir / "params").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    assert files, sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    for p in files:
        os.truncate(p, p.stat().st_size // 2)


# orbax's reader threads report the failed read once more, as an unraisable exception
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back(baseline, corpus, tmp_path, capsys):
    run_dir = tmp_path / "corrupt"
    copy_run(baseline[0], run_dir, keep_steps={2, 4, 6})
    truncate_array_files(run_dir / ckpt.CKPT_SUBDIR / "6")

    main_in_process(argv(run_dir, corpus))
    captured = capsys.readouterr()
    warnings = warning_lines(captured.err)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: checkpoint step 6 in {run_dir.resolve()}")
    assert "is unreadable" in warnings[0]
    assert "resuming at step 4" in captured.out
    [moved] = (run_dir / "corrupt-checkpoints").iterdir()
    assert re.fullmatch(r"6-\d+", moved.name)
    assert runs_in_metrics(run_dir) == [(4, expected_losses(baseline, [5, 6, 7, 8]))]
    assert_finished_like_baseline(run_dir, baseline)


def test_checkpoint_without_meta_falls_back(baseline, corpus, tmp_path, capsys):
    """Step 6 lost its meta item (e.g. an interrupted copy): it is not a usable checkpoint
    (sample.py cannot read it), so it must be set aside like any other unreadable one."""
    run_dir = tmp_path / "no-meta"
    copy_run(baseline[0], run_dir, keep_steps={2, 4, 6})
    shutil.rmtree(run_dir / ckpt.CKPT_SUBDIR / "6" / "meta")

    main_in_process(argv(run_dir, corpus))
    captured = capsys.readouterr()
    warnings = warning_lines(captured.err)
    assert warnings and all("checkpoint step 6 in" in line for line in warnings)
    assert "resuming at step 4" in captured.out
    assert [p.name[:2] for p in (run_dir / "corrupt-checkpoints").iterdir()] == ["6-"]
    assert runs_in_metrics(run_dir) == [(4, expected_losses(baseline, [5, 6, 7, 8]))]
    assert_finished_like_baseline(run_dir, baseline)


# ---------------------------------------------------------------------------- 4. NaN


def test_nan_loss_stops_without_saving(baseline, corpus, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    copy_run(baseline[0], run_dir, keep_steps={2})  # 2 normal steps, saved
    with pytest.raises(SystemExit) as exc:
        main_in_process(argv(run_dir, corpus, "--max-steps", "6", "--lr", "1e9", "--resume"))
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    [line] = error_lines(captured.err)
    match = re.fullmatch(
        r"error: the loss became (nan|inf|-inf) at step (\d+); nothing was saved after it, "
        r"the last good checkpoint is step 2 in (\S+): lower the learning rate \(train.lr\) "
        r"and resume", line)
    assert match, line
    bad = int(match[2])
    assert match[3] == str(run_dir) and 3 < bad <= 6
    [(start, losses)] = runs_in_metrics(run_dir)
    assert start == 2 and sorted(losses) == list(range(3, bad))  # the bad step is not logged
    assert all(np.isfinite(list(losses.values())))
    assert ckpt.existing_steps(run_dir) == [2] and tmp_dirs(run_dir) == []
    step, params = params_at(run_dir)
    assert step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert_same_params(params, params_at(baseline[0], step=2)[1])


def test_nan_loss_while_a_checkpoint_is_written(baseline, corpus, tmp_path, capsys):
    """A checkpoint every step: the one before the bad step is still being written in the
    background when the loop stops; it is completed, and named as the last good one."""
    run_dir = tmp_path / "nan-in-flight"
    copy_run(baseline[0], run_dir, keep_steps={2})
    with pytest.raises(SystemExit) as exc:
        main_in_process(argv(run_dir, corpus, "--max-steps", "6", "--lr", "1e9", "--resume",
                             "--save-every", "1"))
    assert exc.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    match = re.fullmatch(r"error: the loss became \S+ at step (\d+); nothing was saved after "
                         r"it, the last good checkpoint is step (\d+) in \S+: .*", line)
    assert match, line
    bad, kept = int(match[1]), int(match[2])
    assert 3 <= bad <= 6 and kept == bad - 1
    assert ckpt.existing_steps(run_dir) == list(range(2, bad)) and tmp_dirs(run_dir) == []
    step, params = params_at(run_dir)
    assert step == bad - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_non_finite_update_is_never_saved(baseline, corpus, tmp_path, monkeypatch, capsys):
    """Gradients overflow while the loss is still finite: the update makes the params NaN."""
    run_dir = tmp_path / "inf-grad"
    copy_run(baseline[0], run_dir, keep_steps={2})
    real_loss_fn = train_lib.loss_fn

    @jax.custom_vjp
    def overflowing_grad(loss):
        return loss

    overflowing_grad.defvjp(lambda loss: (loss, None), lambda _, g: (g * jnp.inf,))
    monkeypatch.setattr(train_lib, "loss_fn",
                        lambda *args: overflowing_grad(real_loss_fn(*args)))
    with pytest.raises(SystemExit) as exc:
        main_in_process(argv(run_dir, corpus, "--save-every", "1"))
    assert exc.value.code == 1
    for step in ckpt.existing_steps(run_dir):  # every "good" checkpoint must be finite
        params = params_at(run_dir, step=step)[1]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), f"step {step}"
    [line] = error_lines(capsys.readouterr().err)
    assert "at step 3;" in line and "the last good checkpoint is step 2 " in line, line
    assert ckpt.existing_steps(run_dir) == [2]


def test_nan_found_while_a_second_ctrl_c_is_handled(baseline, corpus, tmp_path, monkeypatch,
                                                    capsys):
    """A second Ctrl-C lands while the newest step's non-finite loss is not yet fetched
    and the checkpoint before it is still being written: the stop finds the divergence,
    waits for that checkpoint and names it as the last good one, as any divergence does."""
    probe = tmp_path / "probe"  # where this config diverges (the same on every run)
    copy_run(baseline[0], probe, keep_steps={2})
    with pytest.raises(SystemExit):
        main_in_process(argv(probe, corpus, "--max-steps", "8", "--lr", "1e9", "--resume"))
    bad = int(re.search(r"at step (\d+);", error_lines(capsys.readouterr().err)[0])[1])
    assert 4 <= bad <= 8, bad  # checkpoint bad - 1 is written after the resume point

    run_dir = tmp_path / "ctrl-c-nan"
    copy_run(baseline[0], run_dir, keep_steps={2})
    real_for_micro_step = train_lib.ResidentBatches.for_micro_step

    def second_ctrl_c(self, micro):  # micro-step `bad` begins optimizer step bad + 1
        if micro == bad:
            raise KeyboardInterrupt
        return real_for_micro_step(self, micro)

    monkeypatch.setattr(train_lib.ResidentBatches, "for_micro_step", second_ctrl_c)
    with pytest.raises(SystemExit) as exc:  # saves at bad - 1; logs only when it saves
        main_in_process(argv(run_dir, corpus, "--max-steps", str(bad + 1), "--lr", "1e9",
                             "--resume", "--save-every", str(bad - 1), "train.log_every=100"))
    assert exc.value.code == 1
    captured = capsys.readouterr()
    [line] = error_lines(captured.err)
    assert re.fullmatch(rf"error: the (loss|gradient norm) became \S+ at step {bad}; nothing "
                        rf"was saved after it, the last good checkpoint is step {bad - 1} in "
                        rf"{run_dir}: lower the learning rate \(train.lr\) and resume", line), line
    assert "Traceback" not in captured.err and "interrupted at" not in captured.out
    assert ckpt.existing_steps(run_dir) == [2, bad - 1] and tmp_dirs(run_dir) == []
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_at(run_dir)[1]))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_run_whose_every_checkpoint_is_unreadable_is_refused(baseline, corpus, tmp_path,
                                                               open_managers):
    """Its checkpoint manager is made before the checkpoint is found unreadable: the
    refusal closes it and releases the run directory's lock."""
    run_dir = tmp_path / "all-corrupt"
    copy_run(baseline[0], run_dir, keep_steps={2})
    truncate_array_files(run_dir / ckpt.CKPT_SUBDIR / "2")
    with pytest.raises(UserError, match=r"no checkpoint in \S+ is readable: move the directory"):
        trainer.train_and_evaluate(config_for(argv(run_dir, corpus)), str(corpus), str(run_dir))
    assert open_managers == {}
    lock = run_dir_lib.RunLock(run_dir)
    lock.acquire()  # not held any more
    lock.release()


# ---------------------------------------------------------------------------- 5. disk full


def fail_second_manager_save(monkeypatch):
    """CheckpointManager.save: the 2nd call leaves a half-written step dir and raises ENOSPC."""
    real_save, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            half = pathlib.Path(self.directory) / f"{step}{TMP_SUFFIX}"
            (half / "params").mkdir(parents=True)
            (half / "params" / "partial").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt.ocp.CheckpointManager, "save", save)


def fail_meta_write_of_step_4(monkeypatch):
    """Deeper: orbax's own write of checkpoint 4's meta item fails with ENOSPC."""
    real_async_save = ocp.handlers.JsonCheckpointHandler.async_save

    async def async_save(self, directory, *args, **kwargs):
        if f"/4{TMP_SUFFIX}" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_async_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", async_save)


# A failed write's leftovers (TensorStore's callbacks on a closed event loop) report as
# unraisable exceptions: a library call leaves them to the process (the CLI holds them).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("inject", [fail_second_manager_save, fail_meta_write_of_step_4],
                         ids=["manager-save", "orbax-write"])
def test_disk_full_during_save(baseline, corpus, tmp_path, monkeypatch, capsys, inject):
    run_dir = tmp_path / "full"
    inject(monkeypatch)
    with pytest.raises(RunError) as exc:
        trainer.train_and_evaluate(config_for(argv(run_dir, corpus)), str(corpus),
                                   str(run_dir))
    assert str(exc.value) == (f"could not write checkpoint step 4 in "
                              f"{run_dir.resolve() / ckpt.CKPT_SUBDIR}: No space left on "
                              f"device; earlier checkpoints are intact")
    assert ckpt.existing_steps(run_dir) == [2]
    step, params = params_at(run_dir)
    assert step == 2
    assert_same_params(params, params_at(baseline[0], step=2)[1])
    assert runs_in_metrics(run_dir) == [(0, expected_losses(baseline, [1, 2, 3, 4]))]

    if inject is fail_meta_write_of_step_4:  # orbax left its half-written step 4 behind
        monkeypatch.undo()  # space again: the same command resumes from step 2
        capsys.readouterr()
        main_in_process(argv(run_dir, corpus))
        assert "resuming at step 2" in capsys.readouterr().out
        assert runs_in_metrics(run_dir)[1] == (2, expected_losses(baseline, range(3, 9)))
        assert_finished_like_baseline(run_dir, baseline)


def test_real_write_error_while_saving_arrays(baseline, corpus, tmp_path):
    """No mock: the array data files cannot be written (RLIMIT_FSIZE makes write() fail with
    EFBIG, through TensorStore's real write path, as a full disk fails with ENOSPC)."""
    run_dir = tmp_path / "fsize"
    env = {**os.environ, "FAULT_MODE": "fsize", "FAULT_ARG": str(32 * 1024)}
    # pipes, not files: the size limit would truncate files the child writes its output to
    proc = subprocess.Popen([sys.executable, WRAPPER, *argv(run_dir, corpus)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    # No traceback from any thread, even one glued onto a progress-bar line (which the
    # line check below leaves out).
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr[-3000:]
    # One line and the progress bar: no traceback or log line from any thread, at any time.
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    bar = [line for line in lines if re.search(r"\d+/8 \[", line)]
    assert [line for line in lines if line not in bar] == [
        f"error: could not write checkpoint step 2 in {run_dir.resolve() / ckpt.CKPT_SUBDIR}: "
        f"File too large; earlier checkpoints are intact"], stderr[-3000:]
    assert ckpt.existing_steps(run_dir) == []
    # Checkpoint 2 is written in the background; the loop learns of the failure when it
    # next waits for it, before saving step 4.
    assert runs_in_metrics(run_dir) == [(0, expected_losses(baseline, [1, 2, 3, 4]))]


# ---------------------------------------------------------------------------- 6. Ctrl-C


def ctrl_c_in_process_at_micro_step(monkeypatch, micro_step):
    """A real SIGINT to this process just before micro-step `micro_step` is computed."""
    real_for_micro_step = train_lib.ResidentBatches.for_micro_step

    def for_micro_step(self, micro):
        if micro == micro_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_for_micro_step(self, micro)

    monkeypatch.setattr(train_lib.ResidentBatches, "for_micro_step", for_micro_step)


def test_ctrl_c_saves_once_and_resumes(corpus, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "ctrl-c"
    marker, release = tmp_path / "parked", tmp_path / "release"
    args = argv(run_dir, corpus, "--max-steps", "1000", "--save-every", "500")
    env = {"FAULT_MODE": "park", "FAULT_ARG": "5", "FAULT_MARKER": str(marker),
           "FAULT_RELEASE": str(release)}
    with spawn([sys.executable, WRAPPER, *args], tmp_path, "ctrl-c", env) as (
            proc, out, err):
        # Parked after 5 steps; the loop logs one interval late, so steps 1-4 are logged.
        wait_for(lambda: marker.exists() and len(logged_steps(run_dir)) >= 4, proc, err,
                 "4 logged steps")
        assert ckpt.existing_steps(run_dir) == []
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        release.touch()
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within 120 s of SIGINT: {err.read_text()[-2000:]}")
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    match = re.search(r"interrupted at step (\d+): checkpoint saved in (\S+); run the same "
                      r"command to resume", stdout)
    assert match, stdout[-2000:]
    step = int(match[1])
    assert match[2] == str(run_dir) and 5 <= step < 1000
    assert ckpt.existing_steps(run_dir) == [step]  # exactly one new checkpoint, at that step
    assert tmp_dirs(run_dir) == []
    [(start, losses)] = runs_in_metrics(run_dir)
    assert start == 0 and sorted(losses) == list(range(1, step + 1))
    assert params_at(run_dir)[0] == step

    # The same command resumes from it; another Ctrl-C a step later saves once more (at
    # the step it lands in, or at the end of that step).
    ctrl_c_in_process_at_micro_step(monkeypatch, step + 1)
    main_in_process(args)
    captured = capsys.readouterr()
    assert f"resuming at step {step}" in captured.out
    match = re.search(r"interrupted at step (\d+): checkpoint saved", captured.out)
    assert match and int(match[1]) in (step + 1, step + 2), captured.out[-2000:]
    again = int(match[1])
    [_, (start, resumed)] = runs_in_metrics(run_dir)
    assert start == step and sorted(resumed) == list(range(step + 1, again + 1))
    assert all(np.isfinite(list(resumed.values())))
    assert ckpt.existing_steps(run_dir) == [step, again]


def test_ctrl_c_inside_the_train_step(corpus, tmp_path, monkeypatch, capsys):
    """SIGINT arrives while the train step runs: its input state is already donated."""
    run_dir = tmp_path / "ctrl-c-in-step"
    real_make = train_lib.make_resident_train_step

    def make_train_step(cfg, mesh, shardings):
        step_fn, calls = real_make(cfg, mesh, shardings), []

        def step_with_ctrl_c(state, hyper, *batch):
            result = step_fn(state, hyper, *batch)  # donates `state`
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # before the result reaches the loop
            return result

        return step_with_ctrl_c

    monkeypatch.setattr(train_lib, "make_resident_train_step", make_train_step)
    summary = None
    try:
        summary = trainer.train_and_evaluate(
            config_for(argv(run_dir, corpus, "--save-every", "500")), str(corpus),
            str(run_dir))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train_and_evaluate")
    assert summary["interrupted"] and summary["steps"] in (2, 3)
    assert f"interrupted at step {summary['steps']}" in capsys.readouterr().out
    assert ckpt.existing_steps(run_dir) == [summary["steps"]]
    step, params = params_at(run_dir)
    assert step == summary["steps"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


ACCUM_FLAGS = ("--grad-accum", "2", "--save-every", "500")  # saves at the end (and on Ctrl-C)


@pytest.fixture(scope="module")
def accum_baseline(corpus, tmp_path_factory):
    """The uninterrupted run with grad_accum 2: (run dir, {step: loss}, final params)."""
    run_dir = tmp_path_factory.mktemp("faults") / "accum-baseline"
    summary = trainer.train_and_evaluate(config_for(argv(run_dir, corpus, *ACCUM_FLAGS)),
                                         str(corpus), str(run_dir))
    assert summary["steps"] == 8 and not summary["interrupted"]
    [(start, losses)] = runs_in_metrics(run_dir)
    assert start == 0 and sorted(losses) == STEPS
    step, params = params_at(run_dir)
    assert step == 8
    return run_dir, losses, params


def test_ctrl_c_during_gradient_accumulation(accum_baseline, corpus, tmp_path, monkeypatch,
                                             capsys):
    """Ctrl-C between the two micro-batches of step 3: the step is finished and saved, and
    the same command resumes exactly (later losses and final params bit-equal)."""
    run_dir = tmp_path / "ctrl-c-accum"
    args = argv(run_dir, corpus, *ACCUM_FLAGS)
    with monkeypatch.context() as patch:
        ctrl_c_in_process_at_micro_step(patch, 5)  # inside optimizer step 3 (micro 4, 5)
        main_in_process(args)
    out = capsys.readouterr().out
    match = re.search(r"interrupted at step (\d+): checkpoint saved in", out)
    assert match, out[-2000:]
    assert match[1] == "3"  # Ctrl-C stops between optimizer steps, so step 3 is finished
    assert ckpt.existing_steps(run_dir) == [3]  # the message tells the truth

    main_in_process(args)  # the same command again, without Ctrl-C
    assert "resuming at step 3" in capsys.readouterr().out
    (start0, before), (start1, after) = runs_in_metrics(run_dir)
    assert (start0, start1) == (0, 3)
    assert before == expected_losses(accum_baseline, [1, 2, 3])
    assert after == expected_losses(accum_baseline, range(4, 9))  # bit for bit
    assert ckpt.existing_steps(run_dir) == [3, 8]
    step, params = params_at(run_dir)
    assert step == 8
    assert_same_params(params, accum_baseline[2])
