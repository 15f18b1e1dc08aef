"""CPU tuning, in one place, applied explicitly by the command-line entry points.

    prepare_process()            first thing in a command's __main__: XLA flags, the
                                 compilation cache, then re-executes the process with a
                                 faster allocator
    sampling_compiler_options()  jax.jit compiler options for the sampling programs

What each setting buys, with the measurements, is in docs/performance.md.
Nothing here runs at import time.
"""

import ctypes.util
import functools
import os
import sys

# auto (default): tcmalloc when installed, else glibc malloc tuned; glibc: the tuned glibc
# malloc only; off: the process's allocator as it is.
ALLOCATOR_SWITCH = "CHATGOT_JAX_ALLOCATOR"
# No mmap'd chunks, no trimming, one arena per core: XLA's per-step buffers stay mapped
# between steps. With the default arena count its worker threads' arenas still fault
# their buffers in every step; with a single arena those threads contend for its lock.
GLIBC_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def glibc_malloc_tunables() -> str:
    """GLIBC_TUNABLES for XLA's allocation pattern (see GLIBC_MALLOC)."""
    return f"glibc.malloc.arena_max={max(2, os.cpu_count() or 1)}:{GLIBC_MALLOC}"
# XLA:CPU's YNNPACK fusions are slower than XLA's own dot emitters for this model.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def prepare_process() -> None:
    """XLA flags for the CPU backend, the persistent compilation cache
    (compile_cache.py), then a faster allocator (may re-execute the process).

    Call before JAX starts a backend; a user's own XLA_FLAGS choice is kept.
    """
    from chatgot_jax.compile_cache import use_compile_cache  # noqa: PLC0415

    set_xla_flags()
    use_compile_cache()
    use_fast_allocator()


def set_xla_flags(environ=os.environ) -> None:
    """Turns XLA:CPU's YNNPACK fusions off unless XLA_FLAGS already choose."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library's name for the dynamic loader, or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def use_fast_allocator() -> None:
    """Re-executes this process (same interpreter, same argv) with tcmalloc preloaded, or,
    without tcmalloc, with glibc's malloc tuned (GLIBC_TUNABLES).

    glibc's malloc returns XLA's large per-step buffers to the kernel and faults
    them in again every step; both keep them. Nothing happens off Linux, when
    LD_PRELOAD already names an allocator or GLIBC_TUNABLES already tunes malloc
    (so the re-executed process goes on), or with CHATGOT_JAX_ALLOCATOR=off.
    """
    choice = os.environ.get(ALLOCATOR_SWITCH, "auto")
    preload, tunables = os.environ.get("LD_PRELOAD", ""), os.environ.get("GLIBC_TUNABLES", "")
    if (choice == "off" or "malloc" in preload or "glibc.malloc" in tunables
            or not sys.platform.startswith("linux")):
        return
    library = find_tcmalloc() if choice == "auto" else None
    if library is not None:
        env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip(),
                   # XLA allocates > 1 GiB at once for the small model: no report for it.
                   TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
    else:
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, glibc_malloc_tunables()])))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


@functools.cache
def has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def sampling_compiler_options() -> dict:
    """512-bit vectors for XLA's own kernels on AVX-512 CPUs (XLA:CPU defaults to 256).

    The decode step is dominated by small fused loops and matrix-vector products,
    which the wider vectors speed up; other backends get no options.
    """
    import jax  # noqa: PLC0415

    if jax.default_backend() != "cpu" or not has_avx512():
        return {}
    return {"xla_cpu_prefer_vector_width": 512}
