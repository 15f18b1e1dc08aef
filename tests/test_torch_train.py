"""Fidelity in training: the original's PyTorch model trained side by side with the JAX
trainer from the same initial weights on the same batches (tools/torch_train.py)."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from chatgot_jax import checkpoint as ckpt  # noqa: E402
from chatgot_jax import config as config_lib  # noqa: E402
from chatgot_jax import optim, train_lib, trainer  # noqa: E402
from chatgot_jax.runs import prepare_data  # noqa: E402
from chatgot_jax.tools import torch_train  # noqa: E402
from conftest import MICRO_OVERRIDES  # noqa: E402

STEPS = 6
OVERRIDES = [*MICRO_OVERRIDES, *torch_train.ORIGINAL, "model.dropout=0", "train.batch_size=8",
             "mesh.data=1", "train.eval_windows=8", "train.sample_tokens=0",
             "train.log_every=1", "train.warmup_steps=2", f"train.max_steps={STEPS}",
             f"train.eval_every={STEPS}", f"train.save_every={STEPS}", "train.lr=1e-2"]
# Per-step |loss difference| allowed between the two sides. The losses are ~3.4, where a
# float32 ulp is 2.4e-7. Measured on these micro runs (float32, 6 steps at lr 1e-2):
# 9.5e-7 at step 1 (the same weights and batch: only the forward's summation order), at
# most 2.4e-6 (10 ulps) over the 6 steps, as Adam's updates carry the differences on.
# The bound, 2e-5, leaves 8x for other BLAS orders; a wrong optimizer on one side
# (weight decay on every parameter against the matrices only, at weight_decay 0.5) was
# 8.0e-3 apart by step 6, 400x the bound.
TOL = 2e-5


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl")
                                              .read_text().splitlines()) if "loss" in r}


def pair(corpus, tmp_path, jax_extra=(), torch_extra=()):
    """(JAX losses, PyTorch losses) of the same config, the PyTorch side started from the
    JAX run's initial weights."""
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    trainer.train_and_evaluate(config_lib.load_config("tiny", overrides=[*OVERRIDES,
                                                                          *jax_extra]),
                               str(corpus), str(jax_dir))
    torch_train.train(config_lib.load_config("tiny", overrides=[*OVERRIDES, *torch_extra]),
                      str(corpus), torch_dir, init_from=jax_dir)
    return losses(jax_dir), losses(torch_dir)


def test_both_sides_cut_the_same_batches(corpus):
    cfg, data = prepare_data(config_lib.load_config("tiny", overrides=OVERRIDES), str(corpus))
    mesh = train_lib.make_mesh(cfg.mesh)
    resident = train_lib.ResidentBatches(cfg, mesh, data.train_tokens,
                                         config_lib.seed_of(cfg.train, "data"))
    run = torch_train.TorchRun(cfg, data.train_tokens)
    T = cfg.model.max_seq_length
    for micro in (0, 1, 5, 1023, 1024, 1500):  # across an upload of the starts
        tokens, starts_KxB, first = jax.device_get(resident.for_micro_step(micro))
        windows = tokens[starts_KxB[micro - first][:, None] + np.arange(T + 1)]
        x, y = run.batch(micro)
        np.testing.assert_array_equal(x.numpy(), windows[:, :-1])
        np.testing.assert_array_equal(y.numpy(), windows[:, 1:])


def test_same_init_same_batches_same_losses(corpus, tmp_path, capsys):
    jax_losses, torch_losses = pair(corpus, tmp_path)
    assert sorted(jax_losses) == sorted(torch_losses) == list(range(1, STEPS + 1))
    diffs = [abs(jax_losses[s] - torch_losses[s]) for s in range(1, STEPS + 1)]
    assert diffs[0] < 1e-5  # step 1: the same weights and batch, only the forward's order
    assert max(diffs) < TOL, diffs
    assert jax_losses[STEPS] < jax_losses[1] - 0.1  # both trained
    # The PyTorch run is a normal run directory: its checkpoint loads as this project's.
    params, cfg, _, step = ckpt.load_for_inference(str(tmp_path / "torch"))
    assert step == STEPS and cfg.model.head_bias is False and cfg.model.memory_length == 0
    assert json.loads((tmp_path / "torch" / "torch.json").read_text())["side"] == "pytorch"


def test_a_wrong_optimizer_on_one_side_fails_the_tolerance(corpus, tmp_path):
    """Decay on every parameter on the PyTorch side only: apart beyond TOL; with
    train.decay=all on both sides, together again (both honour the field)."""
    heavy = ["train.weight_decay=0.5"]
    jax_losses, torch_losses = pair(corpus, tmp_path / "wrong", heavy,
                                    [*heavy, "train.decay=all"])
    wrong = max(abs(jax_losses[s] - torch_losses[s]) for s in jax_losses)
    assert wrong > 3 * TOL
    jax_losses, torch_losses = pair(corpus, tmp_path / "both", [*heavy, "train.decay=all"],
                                    [*heavy, "train.decay=all"])
    assert max(abs(jax_losses[s] - torch_losses[s]) for s in jax_losses) < TOL


def test_decay_all_masks_every_parameter():
    cfg = config_lib.load_config("tiny", overrides=OVERRIDES)
    params = train_lib.init_state(cfg)["params"]
    leaves = jax.tree.leaves(optim.decay_mask(params, "all"))
    assert all(leaves)
    matrices = jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
    assert {p[-1].key for p, on in matrices if not on} == {"bias", "scale"}
