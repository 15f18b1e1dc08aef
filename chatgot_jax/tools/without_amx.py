"""Run a command as on a CPU without AMX: the OS refuses its tile state.

    python -m chatgot_jax.tools.without_amx COMMAND [ARGS ...]

Linux hands a process AMX's tile registers only after it asks
(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). This installs a seccomp
filter that answers that request with EPERM, then execs COMMAND: libraries
that check the answer (YNNPACK, oneDNN, cpu_tuning.has_amx_bf16) fall back to
their AVX-512 kernels, so one AMX machine can time both kinds of CPU. The
filter is inherited by every child and cannot be lifted. Linux x86-64 only.
"""

import argparse
import ctypes
import os
import sys

from chatgot_jax import cli, cpu_tuning

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_EPERM = 1
# Classic BPF opcodes: load a word at an absolute offset, jump if equal, return.
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# Offsets in struct seccomp_data: nr (int), arch (u32), instruction_pointer (u64), args[6].
_NR_OFFSET, _ARG0_OFFSET = 0, 16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def deny_amx() -> None:
    """Make this process's (and its children's) requests for AMX tile state fail."""
    if not cpu_tuning.linux_x86_64():
        raise OSError("without_amx needs Linux on x86-64")
    program = [
        (_LD_W_ABS, 0, 0, _NR_OFFSET),
        (_JEQ_K, 0, 3, cpu_tuning.NR_ARCH_PRCTL),                # not arch_prctl: allow
        (_LD_W_ABS, 0, 0, _ARG0_OFFSET),
        (_JEQ_K, 0, 1, cpu_tuning.ARCH_REQ_XCOMP_PERM),
        (_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    prog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    if (libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0
            or libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0):
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command and its arguments (run with AMX's tiles refused)")
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.error("give a COMMAND to run")
    try:
        deny_amx()
        os.execvp(args.command[0], args.command)
    except OSError as e:
        if args.debug:
            raise
        print(f"error: without_amx: {args.command[0]}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
