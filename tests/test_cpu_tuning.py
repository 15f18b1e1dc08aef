"""CPU tuning: the tcmalloc re-exec and the XLA flags the entry points apply."""

import os
import subprocess
import sys

import pytest

from chatgot_jax import cpu_tuning
from chatgot_jax.cpu_tuning import find_tcmalloc

PROBE = ("from chatgot_jax.cpu_tuning import use_tcmalloc; use_tcmalloc(); "
         "maps = open('/proc/self/maps').read(); print('tcmalloc' in maps, 'malloc' in "
         "__import__('os').environ.get('LD_PRELOAD', ''))")


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's dynamic loader")
def test_reexec_preloads_tcmalloc_when_installed():
    if find_tcmalloc() is None:
        assert probe() == ["False", "False"]  # nothing to preload: the process runs as it is
    else:
        assert probe() == ["True", "True"]  # re-executed with the library loaded
    assert probe(CHATGOT_JAX_TCMALLOC="0") == ["False", "False"]


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
