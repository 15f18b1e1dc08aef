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
# One arena, no mmap'd chunks, no trimming: XLA's per-step buffers stay mapped between
# steps. A thread on a second arena gets any block over 64 MiB (a heap's limit) by mmap
# whatever mmap_max says, and gives it back at free, so XLA's step temporaries (over
# 64 MiB at the default batch) would be faulted in again every step.
GLIBC_MALLOC = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                "glibc.malloc.trim_threshold=4294967295")
# YNNPACK for XLA:CPU's matrix products only: its other fusions are slower than XLA's own
# emitters for this model, and XLA's own dot cannot take bfloat16 x bfloat16 -> float32
# (model.bf16_dense), which YNNPACK runs on AMX where the CPU has it.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


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
    """YNNPACK for XLA:CPU's matrix products only (YNN_FLAG), unless XLA_FLAGS already
    choose."""
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
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, GLIBC_MALLOC])))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def has_avx512() -> bool:
    return "avx512f" in cpu_flags()


def ynn_dots_enabled(environ=os.environ) -> bool:
    """Whether XLA:CPU hands matrix products to YNNPACK: XLA_FLAGS' last
    xla_cpu_experimental_ynn_fusion_type names a DOT type, or none is given (XLA's default
    includes them)."""
    flags = environ.get("XLA_FLAGS", "").split()
    values = [f.partition("=")[2] for f in flags
              if f.lstrip("-").startswith("xla_cpu_experimental_ynn_fusion_type=")]
    return not values or "DOT" in values[-1].upper()


NR_ARCH_PRCTL = 158  # the arch_prctl system call on x86-64
ARCH_REQ_XCOMP_PERM = 0x1023  # arch_prctl: ask Linux for an extended state component
_XFEATURE_XTILEDATA = 18  # AMX's tile data


def linux_x86_64() -> bool:
    return sys.platform == "linux" and os.uname().machine == "x86_64"


@functools.cache
def amx_tiles_permitted() -> bool:
    """Whether Linux lets this process use AMX's tiles.

    A process must ask for the tile state before its first AMX instruction; the
    libraries that use AMX ask the same way and fall back to AVX-512 when refused
    (a seccomp policy, an old kernel). Asking twice is harmless.
    """
    if not linux_x86_64():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(NR_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def has_amx_bf16() -> bool:
    """Intel AMX with bfloat16 tiles (Sapphire Rapids and later), usable by this process:
    without the OS's permission YNNPACK's bf16 products fall back to AVX-512 and run
    slower than float32 ones (docs/performance.md)."""
    return "amx_bf16" in cpu_flags() and amx_tiles_permitted()


def sampling_compiler_options() -> dict:
    """512-bit vectors for XLA's own kernels on AVX-512 CPUs (XLA:CPU defaults to 256).

    The decode step is dominated by small fused loops and matrix-vector products,
    which the wider vectors speed up; other backends get no options.
    """
    import jax  # noqa: PLC0415

    if jax.default_backend() != "cpu" or not has_avx512():
        return {}
    return {"xla_cpu_prefer_vector_width": 512}
