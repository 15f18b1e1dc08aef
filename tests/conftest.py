"""Test setup: 8 simulated CPU devices (before jax is imported) and shared micro configs."""

import os
import sys
import tempfile

# Compile time dominates the suite: LLVM's cheapest optimisation level, and a
# persistent compilation cache shared by the tests and the CLI subprocesses they run.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "chatgot-jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from chatgot_jax.config import ModelConfig  # noqa: E402

MICRO = dict(vocab_size=40, d_model=32, n_layers=2, n_head=4, d_hid=64, max_seq_length=32)


@pytest.fixture
def micro_cfg():
    return ModelConfig(**MICRO)
