"""run_dir.inspect: what a run directory holds, checked before anything is written."""

import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import run_dir, train_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, UserError
from conftest import micro_config


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
