"""Checkpoints: the newest readable one, unreadable ones set aside, loading for inference."""

import pathlib
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


def test_restore_common_sets_the_unreadable_aside(run, capsys):
    manager, cfg, states = run
    shutil.rmtree(manager.directory / "3" / "meta")
    abstract = train_lib.abstract_state(cfg)
    step, [restored] = ckpt.restore_common([manager], abstract)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, restored["params"], states[2]["params"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "checkpoint step 3" in warnings[0]
    assert manager.all_steps() == [1, 2]
    assert [p.name[:2] for p in (manager.directory.parent / "corrupt-checkpoints").iterdir()] \
        == ["3-"]


def test_load_for_inference_latest_step_and_best(run, open_managers):
    manager, _, states = run
    run_dir = manager.directory.parent
    open_managers.clear()  # the fixture's own manager is the test's to close
    for kwargs, want in (({}, 3), ({"step": 1}, 1), ({"best": True}, 2)):
        params, cfg, tokenizer, step = ckpt.load_for_inference(str(run_dir), **kwargs)
        assert step == want
        jax.tree.map(np.testing.assert_array_equal, params, states[want]["params"])
    assert ckpt.load_for_inference(str(manager.directory / "1"))[3] == 1
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        ckpt.load_for_inference(str(run_dir), step=7)
    assert open_managers == {}  # closed, whether the load succeeded or not


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
    _, [restored] = ckpt.restore_common([manager], train_lib.abstract_state(cfg))
    assert set(restored) == {"params", "opt_state", "rng"}
    np.testing.assert_array_equal(restored["rng"], state["rng"])


def test_a_background_save_keeps_the_state_it_was_given(tmp_path, monkeypatch):
    """save(wait=False) returns while Orbax still writes; the loop then donates the state
    to the next train step. The checkpoint appears only when complete and holds the
    state as it was at save(), not the buffers' later contents."""
    import threading

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    tokenizer = CharTokenizer.from_text("ARYA: not today.")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    state = train_lib.init_state(cfg, rng_seed=4)
    expected = jax.device_get(state)
    release, writing = threading.Event(), threading.Event()
    real_save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

    async def held_save_fn(self, x, directory, *args, **kwargs):
        writing.set()
        assert release.wait(60)  # the writer thread waits here, the test goes on
        return await real_save_fn(self, x, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", held_save_fn)
    manager = ckpt.make_manager(tmp_path / "run", async_saves=True)
    try:
        ckpt.save(manager, state, cfg, tokenizer, 5, val_loss=1.5, wait=False)
        assert writing.wait(60)
        assert ckpt.existing_steps(tmp_path / "run") == []  # still being written
        # What the loop does next: the state goes to a donating step, which writes new values.
        state = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones_like(x), s),
                        donate_argnums=0)(state)
        jax.block_until_ready(state)
        release.set()
        ckpt.finish_save(manager)
        assert ckpt.existing_steps(tmp_path / "run") == [5]
        restored = ckpt.restore_state(manager, 5, train_lib.abstract_state(cfg))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
        assert ckpt.best_checkpoint(manager) == (1.5, 5)
    finally:
        release.set()
        ckpt.close(manager)


def test_a_failed_background_write_is_one_error_when_waited_for(tmp_path, monkeypatch):
    """The writer thread fails (disk full) while the loop goes on: finish_save reports it
    as one RunError and leaves no complete checkpoint. (What Orbax's threads log about it
    is the command line's to hold: tests/test_cli_errors.py.)"""
    import errno
    import threading
    import time

    import orbax.checkpoint as ocp

    from chatgot_jax.errors import RunError

    tokenizer = CharTokenizer.from_text("ab")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    state = train_lib.init_state(cfg)

    go, failed = threading.Event(), threading.Event()

    async def full_disk(self, x, directory, *args, **kwargs):
        assert go.wait(60)  # fail while the loop trains, not inside save() or finish_save()
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)
    manager = ckpt.make_manager(tmp_path / "run", async_saves=True)
    ckpt.save(manager, state, cfg, tokenizer, 3, wait=False)
    go.set()
    assert failed.wait(60)
    time.sleep(1.0)  # Orbax's thread logs its failure now
    try:
        with pytest.raises(RunError) as exc:
            ckpt.finish_save(manager)
    finally:
        ckpt.close(manager, quiet=True)
    assert str(exc.value) == (f"could not write checkpoint step 3 in {manager.directory}: "
                              f"No space left on device; earlier checkpoints are intact")
    assert ckpt.existing_steps(tmp_path / "run") == []


def test_one_runs_finished_write_leaves_anothers_failure_to_its_own_wait(tmp_path,
                                                                          monkeypatch):
    """A group writes one checkpoint per run in the background: after run A's write is
    waited for, run B's write, still in flight, fails; that failure is reported once,
    by B's own wait."""
    import errno
    import threading
    import time

    import orbax.checkpoint as ocp

    from chatgot_jax.errors import RunError

    tokenizer = CharTokenizer.from_text("ab")
    cfg = micro_config(f"model.vocab_size={tokenizer.vocab_size}")
    state = train_lib.init_state(cfg)
    go, failed = threading.Event(), threading.Event()
    real_save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

    async def fail_b(self, x, directory, *args, **kwargs):
        if "/b/" not in str(directory):
            return await real_save_fn(self, x, directory, *args, **kwargs)
        assert go.wait(60)
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", fail_b)
    a = ckpt.make_manager(tmp_path / "a", async_saves=True)
    b = ckpt.make_manager(tmp_path / "b", async_saves=True)
    try:
        ckpt.save(a, state, cfg, tokenizer, 1, wait=False)
        ckpt.save(b, state, cfg, tokenizer, 1, wait=False)
        ckpt.finish_save(a)  # run A is done; B is still writing
        go.set()
        assert failed.wait(60)
        time.sleep(1.0)  # Orbax's thread logs B's failure now
        ckpt.finish_save(a)  # nothing left in flight for A
        with pytest.raises(RunError, match="could not write checkpoint step 1 in .*b/"):
            ckpt.finish_save(b)
    finally:
        go.set()
        ckpt.close(a, quiet=True)
        ckpt.close(b, quiet=True)
    assert ckpt.existing_steps(tmp_path / "a") == [1] and ckpt.existing_steps(tmp_path / "b") == []


def test_io_failure_reads_tensorstores_real_error_text(tmp_path):
    """TensorStore has no typed error for a failed write: io_failure reads the OS error
    code from its message. A real failed write (RLIMIT_FSIZE, in a child process) must
    still carry it in the form io_failure parses; this fails if TensorStore rewords it."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys\n"
        "import numpy as np, tensorstore as ts\n"
        "from chatgot_jax.checkpoint import io_failure\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': sys.argv[1]}}\n"
        "t = ts.open(spec, create=True, dtype=ts.float32, shape=[1 << 16]).result()\n"
        "try:\n"
        "    t.write(np.random.default_rng(0).random(1 << 16, np.float32)).result()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, '|', io_failure(e), '|', e)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "array")],
                          capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    kind, reason, message = done.stdout.strip().split(" | ", 2)
    assert kind == "ValueError" and reason == "File too large", done.stdout + done.stderr
    assert "os_error_code" in message
