"""Bad input through the CLI entry points: one stderr line, exit status 2, nothing written."""

import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import config as config_lib
from chatgot_jax import sample_cli, train_cli, train_lib
from chatgot_jax.data import CharTokenizer
from conftest import MICRO_OVERRIDES, tree_digest

MICRO = MICRO_OVERRIDES + ["train.batch_size=8"]


def run_cli(main, argv, capsys) -> str:
    """Runs a CLI main, expects exit 2 and exactly one stderr line; returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    """A run directory with one checkpoint of a micro model (no training needed)."""
    run = tmp_path_factory.mktemp("runs") / "micro"
    tokenizer = CharTokenizer.from_text(corpus.read_text())
    cfg = config_lib.load_config("tiny", overrides=MICRO + [
        f"model.vocab_size={tokenizer.vocab_size}"])
    manager = ckpt.make_manager(run)
    ckpt.save(manager, train_lib.init_state(cfg), cfg, tokenizer, 0)
    manager.close()
    return run


BAD_DATA = {  # name -> (file contents, None for a missing path, "dir" for an empty dir)
    "missing": (None, "does not exist"),
    "no_txt_dir": ("dir", ".txt"),
    "empty": (b"", "empty"),
    "latin1": ("caf\xe9 ARYA".encode("latin-1") * 20, "UTF-8"),
    "binary": (b"ab\x00cd" * 50, "binary"),
    "too_short": (b"ARYA: hi", "at least"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_train_bad_data(tmp_path, capsys, name):
    contents, expected = BAD_DATA[name]
    data, out = tmp_path / "data.txt", tmp_path / "out"
    if contents == "dir":
        data = tmp_path / "folder"
        data.mkdir()
        (data / "notes.md").write_text("not a .txt file")
    elif contents is not None:
        data.write_bytes(contents)
    line = run_cli(train_cli.main, ["--data", str(data), "--out", str(out), *MICRO], capsys)
    assert expected.lower() in line.lower()
    assert not out.exists()


CONFIG_FILES = {
    "missing": (None, "does not exist"),
    "not_yaml": ("model: [d_model: 3\n", "not valid YAML"),
    "unknown_key": ("model:\n  d_modle: 64\n", "model.d_modle"),
    "wrong_type": ("model:\n  d_model: big\n", "model.d_model"),
    "not_mapping": ("- 1\n- 2\n", "mapping"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_train_bad_config_file(tmp_path, capsys, corpus, name):
    text, expected = CONFIG_FILES[name]
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    line = run_cli(train_cli.main, ["--data", str(corpus), "--config", str(path),
                                "--out", str(out)], capsys)
    assert expected in line and not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--variant", "huge"], "unknown variant 'huge'"),
    (["model.d_model=30"], "model.d_model (30) must be divisible by model.n_head (4)"),
    (["model.n_layers=0"], "model.n_layers must be positive"),
    (["model.d_hid=-3"], "model.d_hid must be positive"),
    (["--max-steps", "0"], "train.max_steps must be positive"),
    (["--batch-size", "0"], "train.batch_size must be positive"),
    (["--lr", "0"], "train.lr must be positive"),
    (["--lr=-1e-3"], "train.lr must be positive"),
    (["--batch-size", "12"], "divisible by the number of devices (8)"),
    (["--batch-size", "abc"], "invalid int value"),
    (["model.nope=1"], "unknown config key 'model.nope'"),
    (["--resume"], "--resume needs a checkpoint, but"),
    (["--process-id", "3", "--num-processes", "2", "--coordinator", "localhost:1"],
     "--process-id must be in [0, 2), got 3"),
])
def test_train_bad_settings(tmp_path, capsys, corpus, args, expected):
    out = tmp_path / "out"
    line = run_cli(train_cli.main, ["--data", str(corpus), "--out", str(out), *MICRO, *args], capsys)
    assert expected in line and not out.exists()


def test_train_out_not_writable(tmp_path, capsys, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = run_cli(train_cli.main, ["--data", str(corpus), "--out", str(blocker / "run"), *MICRO],
                   capsys)
    assert str(blocker) in line and blocker.read_text() == "x"


def test_train_refuses_other_model_shape(run_dir, corpus, capsys):
    before = tree_digest(run_dir)
    line = run_cli(train_cli.main, ["--data", str(corpus), "--out", str(run_dir),
                                *MICRO, "model.d_model=64"], capsys)
    assert "another model shape" in line and "d_model 32 (asked 64)" in line
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize("args, expected", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--prompt", "ARYA: жж"], "'ж'"),
])
def test_sample_bad_args(run_dir, capsys, args, expected):
    argv = ["--checkpoint", str(run_dir), "--prompt", "ARYA: "] + args
    assert expected in run_cli(sample_cli.main, argv, capsys)


def test_sample_bad_checkpoint(tmp_path, run_dir, capsys):
    assert "does not exist" in run_cli(
        sample_cli.main, ["--checkpoint", str(tmp_path / "nope"), "--prompt", "A"], capsys)
    assert "no checkpoint" in run_cli(
        sample_cli.main, ["--checkpoint", str(tmp_path), "--prompt", "A"], capsys)
    assert "no checkpoint at step 7" in run_cli(
        sample_cli.main, ["--checkpoint", str(run_dir), "--prompt", "A", "--step", "7"], capsys)


def test_sample_best_without_validation_loss(run_dir, capsys):
    line = run_cli(sample_cli.main, ["--checkpoint", str(run_dir), "--prompt", "A", "--best"], capsys)
    assert line.startswith("error: --best needs a checkpoint with a validation loss")


def test_cudnn_attention_without_a_gpu(tmp_path, capsys, corpus):
    line = run_cli(train_cli.main, ["--data", str(corpus), "--out", str(tmp_path / "out"), *MICRO,
                                "model.attention=cudnn"], capsys)
    assert "model.attention=cudnn needs a CUDA GPU" in line


@pytest.mark.parametrize("name", ["CHATGOT_NUM_PROCESSES", "CHATGOT_PROCESS_ID"])
def test_a_bad_environment_variable(monkeypatch, capsys, tmp_path, corpus, name):
    """train.py reads its multi-process settings from the environment when it runs, not
    when it builds its parser: --help still works, a run says what is wrong in one line."""
    monkeypatch.setenv(name, "two")
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--help"])
    assert exc.value.code == 0 and "--num-processes" in capsys.readouterr().out
    out = tmp_path / "out"
    line = run_cli(train_cli.main, ["--data", str(corpus), "--out", str(out), *MICRO], capsys)
    assert line == f"error: environment variable {name}='two' is not an integer"
    assert not out.exists()
