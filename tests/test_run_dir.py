"""Run directories: what they hold (inspect), drift, finished runs, one writer, provenance, paths."""

import json
import shutil
import subprocess

import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import run_dir, train_cli, train_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, UserError
from conftest import MICRO_OVERRIDES, micro_config, tree_digest, write_script_corpus


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory with checkpoints at steps 1 and 2 of a micro model."""
    path = tmp_path_factory.mktemp("runs") / "saved"
    tokenizer = CharTokenizer.from_text("ARYA: not today.")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    manager = ckpt.make_manager(path)
    state = train_lib.init_state(cfg)
    for step in (1, 2):
        ckpt.save(manager, state, cfg, tokenizer, step, val_loss=3.0 - step)
    manager.close()
    return path, cfg, tokenizer


def test_a_new_directory_holds_nothing(tmp_path):
    assert run_dir.inspect(tmp_path / "new", micro_config(), resume=False) == run_dir.Existing()
    with pytest.raises(InvalidArgument, match="holds no checkpoint") as e:
        run_dir.inspect(tmp_path / "new", micro_config(), resume=True)
    assert e.value.param == "resume"
    assert not (tmp_path / "new").exists()


def test_an_existing_run_gives_its_tokenizer_and_config(saved_run):
    path, cfg, tokenizer = saved_run
    found = run_dir.inspect(path, micro_config(), resume=True)
    assert found.steps == (1, 2) and found.tokenizer == tokenizer and found.config == cfg


def test_another_model_shape_is_refused(saved_run):
    path = saved_run[0]
    with pytest.raises(UserError, match=r"another model shape \(d_model 32 \(asked 64\)\)"):
        run_dir.inspect(path, micro_config("model.d_model=64"), resume=False)


def test_paths_that_cannot_hold_a_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, needle in ((blocker, "is not a directory"), (blocker / "run", "is a file")):
        with pytest.raises(UserError, match=needle):
            run_dir.inspect(path, micro_config(), resume=False)
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------- through train.py


ARGS = MICRO_OVERRIDES + ["train.batch_size=8", "mesh.data=1", "train.eval_windows=8",
                          "train.sample_tokens=0", "--max-steps", "2", "--eval-every", "2"]


def run_train(argv, capsys, code=0):
    """train_cli.main in this process -> (stdout, stderr lines); expects exit status `code`."""
    if code == 0:
        train_cli.main(argv)
    else:
        with pytest.raises(SystemExit) as exc:
            train_cli.main(argv)
        assert exc.value.code == code
    out = capsys.readouterr()
    return out.out, [line for line in out.err.splitlines() if line.startswith("error")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A finished 2-step micro run (its own copy per test: `finished_copy`)."""
    path = tmp_path_factory.mktemp("runs") / "finished"
    train_cli.main(["--data", str(corpus), "--out", str(path), *ARGS])
    return path


@pytest.fixture
def finished_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("change, expected", [
    (["--lr", "3e-3"], "train.lr 0.0014 -> 0.003"),
    (["--seed", "7"], "train.seed 0 -> 7"),
    (["data"], "data "),
    (["--lr", "3e-3", "model.dropout=0"], "model.dropout 0.1 -> 0.0; train.lr 0.0014 -> 0.003"),
])
def test_other_training_settings_are_refused(finished_copy, corpus, tmp_path, capsys, change,
                                             expected):
    data = corpus
    if change == ["data"]:
        data, change = write_script_corpus(tmp_path / "other.txt", seed=5), []
    before = tree_digest(finished_copy)
    _, errors = run_train(["--data", str(data), "--out", str(finished_copy), *ARGS, *change],
                          capsys, code=2)
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith(f"error: {finished_copy} holds a run trained with other settings")
    assert errors[0].endswith("use another --out for a new run, or add --resume to continue "
                              "this one with the new values")
    assert tree_digest(finished_copy) == before


def test_a_finished_run_has_nothing_to_do(finished_copy, corpus, capsys):
    before = tree_digest(finished_copy)
    out, errors = run_train(["--data", str(corpus), "--out", str(finished_copy), *ARGS,
                             "--eval-every", "1", "train.keep=5"], capsys)  # bookkeeping only
    assert out.strip() == (f"nothing to do: {finished_copy} is already at step 2 "
                           f"(train.max_steps 2); raise --max-steps to train further")
    assert not errors and tree_digest(finished_copy) == before
    summary = train_cli.main(["--data", str(corpus), "--out", str(finished_copy), *ARGS])
    best = json.loads((finished_copy / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["best_val_loss"] == pytest.approx(best["val_loss"])  # from the checkpoint


def test_resume_with_changed_settings_keeps_a_history(finished_copy, corpus, capsys):
    out, _ = run_train(["--data", str(corpus), "--out", str(finished_copy), *ARGS, "--resume",
                        "--lr", "3e-3", "--max-steps", "3"], capsys)
    assert "settings changed from step 2 on: train.lr 0.0014 -> 0.003; train.max_steps 2 -> 3" \
        in out
    history = [json.loads(line) for line in
               (finished_copy / "config-history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["changes"]) for h in history] == [
        (0, {}), (2, {"train.lr": [0.0014, 0.003], "train.max_steps": [2, 3]})]
    assert history[0]["config"]["train"]["lr"] == 0.0014
    assert json.loads((finished_copy / "config.json").read_text())["train"]["lr"] == 0.003
    assert ckpt.existing_steps(finished_copy) == [2, 3]  # saved at the end of each start


def test_provenance_and_hparams(finished):
    [record] = [json.loads(line) for line in (finished / "provenance.jsonl").read_text()
                .splitlines()]
    assert record["start_step"] == 0 and record["pid"] > 0 and record["host"]
    assert "--out" in record["command"] and record["chatgot_jax"]
    assert set(record["packages"]) >= {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}
    assert all(record["packages"].values())
    assert record["device_count"] == 1 and record["platform"] == "cpu"
    assert record["data"]["source"].endswith("scripts.txt") and len(record["data"]["sha256"]) == 64
    assert record["git"] is None or len(record["git"]["commit"]) == 40
    events = b"".join(p.read_bytes() for p in finished.glob("events.out.tfevents.*"))
    assert b"hparams" in events and b"train.lr" in events


def test_a_second_writer_is_refused_at_once(finished_copy, corpus, capsys):
    lock = run_dir.RunLock(finished_copy)
    lock.acquire()  # as another process would: flock locks each open description
    try:
        before = tree_digest(finished_copy)
        _, errors = run_train(["--data", str(corpus), "--out", str(finished_copy), *ARGS,
                               "--max-steps", "3"], capsys, code=2)
        assert len(errors) == 1 and errors[0].startswith(f"error: {finished_copy} is in use by "
                                                         f"process ")
        assert tree_digest(finished_copy) == before
    finally:
        lock.release()
    run_train(["--data", str(corpus), "--out", str(finished_copy), *ARGS, "--max-steps", "3"],
              capsys)  # released: the same command goes on


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only tmpfs (needs root and mount rights; skipped, with the reason, without)."""
    path = tmp_path / "ro"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"{ENVIRONMENT}cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_paths_where_nothing_can_be_created(corpus, read_only_mount, capsys):
    for out, reason in (("/proc/chatgot-out", "No such file or directory"),
                        (read_only_mount / "run", "Read-only file system")):
        _, errors = run_train(["--data", str(corpus), "--out", str(out), *ARGS], capsys, code=2)
        assert errors == [f"error: cannot create run directory {out}: {reason}"]


def test_an_existing_run_on_a_read_only_mount(finished, corpus, tmp_path, capsys):
    path = tmp_path / "mnt"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)]).returncode:
        pytest.skip(f"{ENVIRONMENT}cannot mount a tmpfs here")
    try:
        shutil.copytree(finished, path / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        before = tree_digest(path / "run")
        _, errors = run_train(["--data", str(corpus), "--out", str(path / "run"), *ARGS,
                               "--max-steps", "3"], capsys, code=2)
        assert errors == [f"error: cannot write in run directory {path / 'run'}: "
                          f"Read-only file system"]
        assert tree_digest(path / "run") == before
    finally:
        subprocess.run(["umount", str(path)], check=True)
