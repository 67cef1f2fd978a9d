"""The `emoe` command line: `main` parses, runs one subcommand and maps the user's mistakes to exit 2.

Each module here holds one group of subcommands, each command's arguments beside its handler, its
choices read from the registries they name; heavy imports (torch, pandas) happen inside handlers.
A handler raises traces.errors.UserError for the user's mistakes (one line on stderr, exit 2); an
OSError on a path the user gave is theirs too; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sim.cli import hardware, models, plot, predictor, real_model, run, sweep, trace
# the exit statuses tests and scripts check
from sim.cli.hardware import CONFIRM_FAILED, CONFIRM_INCONCLUSIVE  # noqa: F401
from sim.cli.version import VersionAction
from traces.errors import UserError, message

GROUPS = (trace, run, sweep, plot, hardware, real_model, predictor, models)


class _Parser(argparse.ArgumentParser):
    """Argument mistakes as one line, like every other user error (the usage is in --help)."""

    def error(self, msg):
        print(f"{self.prog}: error: {msg} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emoe", description="Simulate and replay memory-efficient MoE inference "
                                "(eMoE and baselines) from routing traces.")
    p.add_argument("--version", action=VersionAction, help="print the package and code versions and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def _given_path(e: OSError, argv) -> bool:
    """The OS refused a path the user gave (or one inside or above it): the user's to fix.
    An OSError on any other path is the program's and keeps its traceback."""
    if not isinstance(e.filename, str):
        return False
    failed = Path(e.filename).absolute()
    if failed == Path.cwd() or failed == Path(failed.anchor):   # what every relative path is under
        return False
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("-") else arg
        if not value:
            continue
        given = Path(value).absolute()
        if failed == given or given in failed.parents or failed in given.parents:
            return True
    return False


def main(argv=None) -> int:
    import os
    os.environ.setdefault("MPLBACKEND", "Agg")   # figures go to files; never open a window
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser.parse_args(argv)
    try:
        code = a.func(a)   # a handler may return its own exit status (confirm: 4 when a check fails)
    except UserError as e:   # only this; any other exception is a bug and keeps its traceback
        print(f"emoe: error: {message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if not _given_path(e, argv):
            raise
        print(f"emoe: error: {e.filename}: {e.strerror} (a path given on the command line); "
              "choose another", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoe: interrupted", file=sys.stderr)
        return 130
    return code or 0
