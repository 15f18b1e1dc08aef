"""Device-resident batches: the step that cuts its own windows equals the host-batch step."""

import jax
import numpy as np
import pytest

from chatgot_jax import data as data_lib
from chatgot_jax import train_lib
from conftest import micro_config


@pytest.mark.parametrize("mesh_args", [("mesh.data=1",), ("mesh.data=2", "mesh.fsdp=2")])
def test_resident_batches_equal_host_batches(monkeypatch, mesh_args):
    """Seven micro-steps (grad_accum 2) across chunk boundaries (a chunk of 3): losses and
    final params bit-equal to the steps fed data.get_batch's batches from the host."""
    monkeypatch.setattr(train_lib, "STARTS_CHUNK", 3)
    cfg = micro_config("train.batch_size=8", "train.grad_accum=2", "train.warmup_steps=1",
                       *mesh_args)
    tokens = np.random.default_rng(0).integers(0, 40, 3000).astype(np.uint8)
    mesh = train_lib.make_mesh(cfg.mesh)
    hyper = train_lib.train_hyperparams(cfg, mesh)
    results = []
    for resident in (False, True):
        state, shardings = train_lib.create_sharded_state(cfg, mesh)
        if resident:
            step = train_lib.make_resident_train_step(cfg, mesh, shardings)
            batches = train_lib.ResidentBatches(cfg, mesh, tokens, seed=5)
        else:
            step = train_lib.make_train_step(cfg, mesh, shardings)
        losses = []
        for micro in range(7):
            if resident:
                args = batches.for_micro_step(micro)
            else:
                x, y = data_lib.get_batch(tokens, seed=5, step=micro, batch_size=8,
                                          seq_len=cfg.model.max_seq_length)
                args = train_lib.put_batch(mesh, x, y)
            state, metrics = step(state, hyper, *args)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state["params"])))
    (host_losses, host_params), (dev_losses, dev_params) = results
    assert dev_losses == host_losses and len(set(host_losses)) == 7
    jax.tree.map(np.testing.assert_array_equal, dev_params, host_params)
