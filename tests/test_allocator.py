"""The CLIs' tcmalloc re-exec: it preloads tcmalloc when the system has one, and can be turned off."""

import os
import subprocess
import sys

import pytest

from chatgot_jax.allocator import find_tcmalloc

PROBE = ("from chatgot_jax.allocator import use_tcmalloc; use_tcmalloc(); "
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
