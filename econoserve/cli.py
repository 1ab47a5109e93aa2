"""The ``econoserve`` command.

Each subsystem contributes its subcommands from a ``commands`` module exposing
``register(subparsers)``; a subcommand's handler takes the parsed arguments and returns an exit
status. A :class:`~econoserve.errors.UserError` (bad file, record, name or flag) is printed on one
line and exits with status 2, and so is an argument argparse refuses (one line naming the
option, and where to find ``--help``), and a file the system refuses to read or write (a
permission, a full disk, a path that is not a directory). Anything else is a bug and keeps its
traceback. :mod:`econoserve.validation` holds the checks the commands share.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from typing import Sequence

from econoserve import __version__
from econoserve.errors import UserError

#: Modules that add subcommands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "econoserve.workload.commands",
    "econoserve.predictor.commands",
    "econoserve.sim.commands",
    "econoserve.serving.commands",
    "econoserve.profiling.commands",
    "econoserve.experiments.placement_commands",
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with its errors on one line (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="econoserve",
        description=(
            "EconoServe reproduction toolkit: datasets and traces, the response-length "
            "predictor, the serving simulator and the vLLM scheduler. "
            "Run 'econoserve COMMAND --help' for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"econoserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a refused argument (already printed on one line)
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"econoserve: error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:
        if error.filename is None:
            raise
        print(f"econoserve: error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return UserError.exit_status
    except KeyboardInterrupt:
        print("econoserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
