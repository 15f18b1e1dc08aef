"""Checkpoints: the newest readable one, unreadable ones set aside, loading for inference."""

import shutil

import jax
import numpy as np
import pytest

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import train_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument, UserError
from conftest import micro_config


@pytest.fixture
def run(tmp_path):
    """Checkpoints at steps 1, 2, 3 of a micro model; step s has val loss 5 - s, except 3."""
    tokenizer = CharTokenizer.from_text("ARYA: not today.")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    manager = ckpt.make_manager(tmp_path / "run", keep=5)
    states = {}
    for step in (1, 2, 3):
        states[step] = train_lib.init_state(cfg, rng_seed=step)
        ckpt.save(manager, states[step], cfg, tokenizer, step,
                  val_loss=None if step == 3 else 5.0 - step)
    return manager, cfg, states


def test_newest_readable_skips_and_reports_failures(run):
    manager = run[0]
    failed = []

    def read(step):
        if step == 3:
            raise OSError("truncated")
        return f"read {step}"

    assert ckpt.newest_readable(manager, read, lambda s, e: failed.append((s, str(e)))) == (
        2, "read 2")
    assert failed == [(3, "truncated")]
    assert ckpt.newest_readable(manager, lambda s: 1 / 0) == (None, None)


def test_restore_newest_sets_the_unreadable_aside(run, capsys):
    manager, cfg, states = run
    shutil.rmtree(manager.directory / "3" / "meta")
    abstract = train_lib.abstract_state(cfg)
    restored = ckpt.restore_newest(manager, abstract)
    jax.tree.map(np.testing.assert_array_equal, restored["params"], states[2]["params"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "checkpoint step 3" in warnings[0]
    assert manager.all_steps() == [1, 2]
    assert [p.name[:2] for p in (manager.directory.parent / "corrupt-checkpoints").iterdir()] \
        == ["3-"]


def test_load_for_inference_latest_step_and_best(run):
    manager, _, states = run
    run_dir = manager.directory.parent
    for kwargs, want in (({}, 3), ({"step": 1}, 1), ({"best": True}, 2)):
        params, cfg, tokenizer, step = ckpt.load_for_inference(str(run_dir), **kwargs)
        assert step == want
        jax.tree.map(np.testing.assert_array_equal, params, states[want]["params"])
    assert ckpt.load_for_inference(str(manager.directory / "1"))[3] == 1
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        ckpt.load_for_inference(str(run_dir), step=7)


def test_best_needs_a_validation_loss(tmp_path):
    tokenizer = CharTokenizer.from_text("ab")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    manager = ckpt.make_manager(tmp_path / "run")
    ckpt.save(manager, train_lib.init_state(cfg), cfg, tokenizer, 0)
    with pytest.raises(InvalidArgument, match="needs a checkpoint with a validation loss"):
        ckpt.load_for_inference(str(tmp_path / "run"), best=True)


def test_restores_checkpoints_that_also_hold_the_micro_step(tmp_path):
    """Checkpoints written before the micro-step was derived from the optimizer state
    hold it in their "train" item; they still resume."""
    import json

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from chatgot_jax import config as config_lib

    tokenizer = CharTokenizer.from_text("ab")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    state = train_lib.init_state(cfg, rng_seed=3)
    manager = ckpt.make_manager(tmp_path / "run")
    meta = {"config": config_lib.to_dict(cfg), "tokenizer": json.loads(tokenizer.to_json()),
            "opt_step": 0, "val_loss": None}
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"step": jnp.int32(0), "rng": state["rng"]}),
        meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    restored = ckpt.restore_newest(manager, train_lib.abstract_state(cfg))
    assert set(restored) == {"params", "opt_state", "rng"}
    np.testing.assert_array_equal(restored["rng"], state["rng"])
