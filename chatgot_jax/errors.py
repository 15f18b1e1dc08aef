"""User-facing errors: one line on stderr, exit status 2, no traceback."""

import argparse
import functools
import os
import sys


class UserError(Exception):
    """Bad input the user can fix. The message is one line that says what to do."""


class RunError(Exception):
    """A run that cannot go on (diverged, disk full): one line, exit status 1."""


def cli_main(fn):
    """Wraps a CLI entry point: a UserError becomes one stderr line and exit 2,
    a RunError one stderr line and exit 1.

    Real bugs keep their traceback. CHATGOT_DEBUG=1 (or --debug, which the CLIs
    turn into that variable) re-raises UserErrors too.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, RunError) as e:
            if os.environ.get("CHATGOT_DEBUG"):
                raise
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2 if isinstance(e, UserError) else 1)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
