"""CPU tuning: the allocator re-exec and the XLA flags the entry points apply."""

import os
import subprocess
import sys

import pytest

from chatgot_jax import cpu_tuning
from chatgot_jax.cpu_tuning import find_tcmalloc

# Re-executes itself as the entry points do, then reports: tcmalloc mapped, LD_PRELOAD
# names an allocator, GLIBC_TUNABLES tunes malloc.
PROBE = ("from chatgot_jax.cpu_tuning import use_fast_allocator; use_fast_allocator(); "
         "import os; maps = open('/proc/self/maps').read(); print('tcmalloc' in maps, "
         "'malloc' in os.environ.get('LD_PRELOAD', ''), "
         "'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''))")


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's dynamic loader")
def test_reexec_with_a_faster_allocator():
    if find_tcmalloc() is None:
        assert probe() == ["False", "False", "True"]  # no tcmalloc: glibc's malloc tuned
    else:
        assert probe() == ["True", "True", "False"]  # re-executed with tcmalloc loaded
    assert probe(CHATGOT_JAX_ALLOCATOR="glibc") == ["False", "False", "True"]
    assert probe(CHATGOT_JAX_ALLOCATOR="off") == ["False", "False", "False"]


def test_xla_flags_keep_the_users_choice():
    env = {}
    cpu_tuning.set_xla_flags(env)
    assert env["XLA_FLAGS"] == cpu_tuning.YNN_FLAG
    env = {"XLA_FLAGS": "--a=1"}
    cpu_tuning.set_xla_flags(env)
    assert env["XLA_FLAGS"] == f"--a=1 {cpu_tuning.YNN_FLAG}"
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    cpu_tuning.set_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_importing_the_package_leaves_the_environment_alone():
    code = ("import os; e = dict(os.environ); import chatgot_jax, chatgot_jax.cli, "
            "chatgot_jax.cpu_tuning, chatgot_jax.config, chatgot_jax.data; "
            "assert e == dict(os.environ), set(os.environ.items()) ^ set(e.items())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
