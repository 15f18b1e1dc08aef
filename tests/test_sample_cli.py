"""sample.py end to end on a trained run, which checkpoints a run keeps (keep + best), the
prompt it starts from by default, and the command train.py prints to sample."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import data as data_lib
from chatgot_jax import sampling, train_cli, trainer
from chatgot_jax.sample_cli import main as sample_cli_main
from conftest import MICRO_OVERRIDES, ROOT

# Evaluated and saved at every step, and only the newest checkpoint kept beside the best.
OVERRIDES = MICRO_OVERRIDES + [
    "train.batch_size=8", "mesh.data=1", "train.eval_windows=8", "train.sample_tokens=0",
    "train.log_every=1", "train.warmup_steps=0", "train.lr=1e-2", "train.eval_every=1",
    "train.save_every=1", "train.keep=1"]
PROMPT = "ARYA: "
NEW_TOKENS = 40  # prompt + 40 > the context of 32: the window slides


def val_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """5 steps whose best validation loss is not the newest: 3 steps at lr 1e-2, then 2
    at lr 1.0 (the same run resumed with a new lr), which wreck the model.
    -> (run dir, {step: val loss})."""
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    cfg = config_lib.load_config("tiny", overrides=OVERRIDES + ["train.max_steps=3"])
    trainer.train_and_evaluate(cfg, str(corpus), str(run_dir))
    cfg = config_lib.load_config("tiny", overrides=OVERRIDES + ["train.max_steps=5",
                                                                "train.lr=1.0"])
    summary = trainer.train_and_evaluate(cfg, str(corpus), str(run_dir), resume=True)
    assert summary["steps"] == 5 and not summary["interrupted"]
    vals = val_losses(run_dir)
    assert sorted(vals) == [1, 2, 3, 4, 5]
    assert min(vals[4], vals[5]) > min(vals[s] for s in (1, 2, 3))  # lr 1.0 made it worse
    # The resumed run's summary reports the best over the whole run, not over its own steps.
    assert summary["best_val_loss"] == min(vals.values())
    return run_dir, vals


def sample_cli(*args):
    """sample.py as a user runs it -> (stdout, stderr); it must exit 0 with no traceback."""
    proc = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("Traceback", "Exception in thread"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_keep_1_keeps_the_newest_and_the_best(run):
    """The best checkpoint was saved before the resume, by another checkpoint manager: it
    must still be kept (its val loss must be on disk for the new manager to see it)."""
    run_dir, vals = run
    best_step = min(vals, key=vals.get)
    assert best_step <= 3  # not the newest, nor one the lr 1.0 steps made
    assert ckpt.existing_steps(run_dir) == [best_step, 5]  # every other save was deleted
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:
        assert ckpt.best_checkpoint(manager) == (vals[best_step], best_step)
    finally:
        manager.close()


def test_sample_prints_the_prompt_and_its_continuation(run):
    run_dir, _ = run
    stdout, stderr = sample_cli("--checkpoint", str(run_dir), "--prompt", PROMPT,
                                "--max-new-tokens", str(NEW_TOKENS))
    assert f"loaded step 5 from {run_dir}" in stderr  # the newest checkpoint by default
    assert stdout.startswith(PROMPT) and stdout.endswith("\n")
    text = stdout[len(PROMPT):-1]
    _, _, tokenizer, _ = ckpt.load_for_inference(str(run_dir))
    assert len(text) == NEW_TOKENS
    assert set(text) <= set(tokenizer.chars) | {"\ufffd"}  # U+FFFD: the unknown id


def test_sample_best_loads_the_best_checkpoint(run):
    run_dir, vals = run
    best_step = min(vals, key=vals.get)
    stdout, stderr = sample_cli("--checkpoint", str(run_dir), "--best", "--prompt", PROMPT,
                                "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0")
    assert f"loaded step {best_step} from {run_dir}" in stderr
    # The printed text is the best checkpoint's greedy continuation.
    params, cfg, tokenizer, step = ckpt.load_for_inference(str(run_dir), step=best_step)
    [expected] = sampling.generate(params, cfg.model, tokenizer, PROMPT,
                                   max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert stdout == PROMPT + expected + "\n"


# ------------------------------------------------------------ the prompt by default


def train_micro(corpus, run_dir, capsys) -> str:
    """2 micro steps through the train command -> what it printed on stdout."""
    capsys.readouterr()
    train_cli.main(["--data", str(corpus), "--out", str(run_dir), "--max-steps", "2",
                    "--eval-every", "2", *OVERRIDES])
    return capsys.readouterr().out


def sample_default(run_dir, capsys) -> tuple[str, str]:
    sample_cli_main(["--checkpoint", str(run_dir), "--max-new-tokens", "8",
                     "--temperature", "0"])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_sample_without_a_prompt_starts_from_the_runs_own(corpus, tmp_path, capsys):
    """A corpus with speaker lines: the run's evaluation prompt ('JON SNOW: ' or another
    speaker), stored in prompt.txt; a run without prompt.txt starts from a newline."""
    run_dir = tmp_path / "speakers"
    train_micro(corpus, run_dir, capsys)
    stored = (run_dir / "prompt.txt").read_text(encoding="utf-8")
    assert re.fullmatch(r"(JON SNOW|ARYA|TYRION): ", stored), stored
    out, err = sample_default(run_dir, capsys)
    assert out.startswith(stored) and len(out) == len(stored) + 8 + 1
    assert f"prompt: the run's evaluation prompt {stored!r}" in err
    (run_dir / "prompt.txt").unlink()  # as a converted run, or one trained before
    out, err = sample_default(run_dir, capsys)
    assert out.startswith("\n") and len(out) == 1 + 8 + 1 and "a newline" in err


def prose_with_newline_and_quote_at_the_split(path) -> pathlib.Path:
    """A corpus without SPEAKER: lines whose validation split starts with a newline and a
    double quote (then a single quote), so that the run's prompt holds all three."""
    words = "the night is dark and full of terrors winter is coming".split()
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(words, 3000))
    n_train = len(data_lib.split_tokens(np.zeros(len(text) + 3), 0.1)[0])
    text = text[:n_train] + "\n\"'" + text[n_train:]
    assert data_lib.split_tokens(np.arange(len(text)), 0.1)[1][0] == n_train
    path.write_text(text, encoding="utf-8")
    return path


def test_the_hint_after_training_is_one_line_a_shell_runs(tmp_path, capsys):
    corpus = prose_with_newline_and_quote_at_the_split(tmp_path / "prose.txt")
    run_dir = tmp_path / "a run"  # a space too
    printed = train_micro(corpus, run_dir, capsys)
    stored = (run_dir / "prompt.txt").read_text(encoding="utf-8")
    assert stored.startswith("\n\"'")  # the prompt holds a newline and both quotes
    [hint] = [line for line in printed.splitlines() if line.startswith("next: ")]
    command = hint.removeprefix("next: ")
    assert printed.splitlines()[-1] == hint  # nothing of it spills onto another line
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command + " --max-new-tokens 5"], cwd=tmp_path.parent,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(stored) and len(done.stdout) == len(stored) + 5 + 1
