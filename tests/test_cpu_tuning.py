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


def run_probe(code, **env):
    """code's printed words, run with no allocator chosen beyond env."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def probe(**env):
    return run_probe(PROBE, **env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's dynamic loader")
def test_reexec_with_a_faster_allocator():
    if find_tcmalloc() is None:
        assert probe() == ["False", "False", "True"]  # no tcmalloc: glibc's malloc tuned
    else:
        assert probe() == ["True", "True", "False"]  # re-executed with tcmalloc loaded
    assert probe(CHATGOT_JAX_ALLOCATOR="glibc") == ["False", "False", "True"]
    assert probe(CHATGOT_JAX_ALLOCATOR="off") == ["False", "False", "False"]


# Re-executes itself as the entry points do, then, on a thread other than the main one
# (XLA's step runs on one), allocates, writes and frees 80 MiB four times: the minor page
# faults of the last three rounds. Kept mapped, the block faults in once.
REFAULT_PROBE = """
import ctypes, resource, threading
from chatgot_jax.cpu_tuning import use_fast_allocator
use_fast_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 80 << 20, []
def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(*faults[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tuned_glibc_keeps_a_large_block_mapped_between_steps():
    def faults(**env):
        return [int(n) for n in run_probe(REFAULT_PROBE, **env)]

    pages = (80 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert max(faults(CHATGOT_JAX_ALLOCATOR="glibc")) < pages // 20
    # What the tuning prevents: with a second arena, the thread's block is mmap'd (over a
    # heap's 64 MiB) and unmapped at free, so every round faults it in again.
    two_arenas = cpu_tuning.GLIBC_MALLOC.replace("arena_max=1", "arena_max=2")
    assert min(faults(GLIBC_TUNABLES=two_arenas)) > pages // 2


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


def test_compile_cache_directory_and_switch():
    from chatgot_jax.compile_cache import cache_dir, use_compile_cache

    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/chatgot-jax/jax"
    assert cache_dir({"CHATGOT_JAX_COMPILE_CACHE": "/y"}) == "/y"
    assert cache_dir({"CHATGOT_JAX_COMPILE_CACHE": "off"}) is None
    env = {"CHATGOT_JAX_COMPILE_CACHE": "off"}
    use_compile_cache(env)
    assert "JAX_COMPILATION_CACHE_DIR" not in env
    env = {"JAX_COMPILATION_CACHE_DIR": "/mine", "XDG_CACHE_HOME": "/x"}
    use_compile_cache(env)
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/mine"  # the user's own setting wins


def test_train_py_fills_the_compile_cache(tmp_path):
    """The entry point itself turns the cache on: a second run finds its programs there."""
    from conftest import MICRO_OVERRIDES, ROOT

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "train.py", "--max-steps", "1", "--batch-size", "8",
           "--out", str(tmp_path / "run"), *MICRO_OVERRIDES, "train.eval_windows=8",
           "train.sample_tokens=0", "mesh.data=1"]  # the fewest programs to compile
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = list((tmp_path / "cache" / "chatgot-jax" / "jax").iterdir())
    assert entries, "no compiled program was cached"


# Asks Linux for AMX's tile state (ARCH_REQ_XCOMP_PERM) and reads the permissions
# (ARCH_GET_XCOMP_PERM) with raw syscalls; prints each errno, then has_amx_bf16().
AMX_PROBE = ("import ctypes, errno; from chatgot_jax import cpu_tuning; "
             "libc = ctypes.CDLL(None, use_errno=True); bits = ctypes.c_ulong(); "
             "out = []\n"
             "for args in ((0x1023, 18), (0x1022, ctypes.byref(bits))):\n"
             "    ctypes.set_errno(0); r = libc.syscall(158, *args)\n"
             "    out.append(errno.errorcode.get(ctypes.get_errno(), 'OK') if r else 'OK')\n"
             "print(*out, cpu_tuning.has_amx_bf16())")


@pytest.mark.skipif(not cpu_tuning.linux_x86_64(), reason="seccomp filter for x86-64 Linux")
def test_without_amx_refuses_the_tile_state_and_nothing_else():
    """tools.without_amx runs a command whose request for AMX's tiles fails with EPERM
    (before the kernel sees it, AMX or not), other arch_prctl calls still reach the
    kernel, and has_amx_bf16() then says no: auto takes float32 products there."""
    cmd = [sys.executable, "-m", "chatgot_jax.tools.without_amx", sys.executable, "-c",
           AMX_PROBE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    request, get, amx = proc.stdout.split()
    assert request == "EPERM"
    assert get != "EPERM"
    assert amx == "False"
    plain = subprocess.run([sys.executable, "-c", AMX_PROBE], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    request, _, amx = plain.stdout.split()
    assert amx == str(request == "OK" and "amx_bf16" in cpu_tuning.cpu_flags())


@pytest.mark.parametrize("args, words", [([], "COMMAND"), (["/nonexistent/cmd"], "nonexistent")])
def test_without_amx_bad_command_is_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "chatgot_jax.tools.without_amx", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr


def test_amx_needs_the_flag_before_the_permission(monkeypatch):
    """A CPU without amx_bf16 never asks the OS; one with it asks and obeys the answer."""
    asked = []
    monkeypatch.setattr(cpu_tuning, "amx_tiles_permitted", lambda: asked.append(1) or True)
    monkeypatch.setattr(cpu_tuning, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert not cpu_tuning.has_amx_bf16() and not asked
    monkeypatch.setattr(cpu_tuning, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert cpu_tuning.has_amx_bf16() and asked
    monkeypatch.setattr(cpu_tuning, "amx_tiles_permitted", lambda: False)
    assert not cpu_tuning.has_amx_bf16()
