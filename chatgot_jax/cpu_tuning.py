"""CPU tuning, in one place, applied explicitly by the command-line entry points.

    prepare_process()            first thing in a command's __main__: XLA flags, then
                                 re-executes the process with tcmalloc preloaded
    sampling_compiler_options()  jax.jit compiler options for the sampling programs

What each setting buys, with the measurements, is in docs/performance.md.
Nothing here runs at import time.
"""

import ctypes.util
import functools
import os
import sys

TCMALLOC_SWITCH = "CHATGOT_JAX_TCMALLOC"  # "0" turns the tcmalloc re-exec off
# XLA:CPU's YNNPACK fusions are slower than XLA's own dot emitters for this model.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def prepare_process() -> None:
    """XLA flags for the CPU backend, then tcmalloc (may re-execute the process).

    Call before JAX starts a backend; a user's own XLA_FLAGS choice is kept.
    """
    set_xla_flags()
    use_tcmalloc()


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


def use_tcmalloc() -> None:
    """Re-executes this process (same interpreter, same argv) with tcmalloc preloaded.

    glibc's malloc returns XLA's large per-step buffers to the kernel and faults
    them in again every step; tcmalloc keeps them. Nothing happens without an
    installed tcmalloc, when LD_PRELOAD already names an allocator, off Linux, or
    with CHATGOT_JAX_TCMALLOC=0.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if (os.environ.get(TCMALLOC_SWITCH) == "0" or "malloc" in preload
            or not sys.platform.startswith("linux")):
        return
    library = find_tcmalloc()
    if library is None:
        return
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip(),
               # XLA allocates > 1 GiB at once for the small model: no stderr report for it.
               TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
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
