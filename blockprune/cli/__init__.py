"""The ``blockprune`` command: compress, inspect, importance, plugins, demo.

Exit codes: 0 success, 1 failure, 2 bad input (a :class:`~blockprune.errors.BlockpruneError` or a usage
error). Errors are printed on one line; ``--debug`` adds the traceback and blockprune's debug log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from ..errors import BlockpruneError
from . import compress, demo, importance, inspect, plugins

SUCCESS, FAILURE, BAD_INPUT = 0, 1, 2
COMMANDS = (compress, inspect, importance, plugins, demo)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    """The parser of every command; each command's ``run`` is stored as the ``run`` default."""
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a command's own --debug must not reset the one given before the command name.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print tracebacks and blockprune's debug log")
    parser = ArgumentParser(prog="blockprune", epilog="Run 'blockprune COMMAND --help' for a command's options.",
                            description="Make diffusion transformers faster by replacing whole blocks with fitted "
                            "linear layers. Exit codes: 0 success, 1 failure, 2 bad input.")
    parser.add_argument("--debug", action="store_true", default=False, help="print tracebacks and blockprune's debug log")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands, [debug])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``blockprune`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already printed
        return exit.code if isinstance(exit.code, int) else BAD_INPUT
    if args.debug:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("blockprune").setLevel(logging.DEBUG)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("blockprune: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error ends as one line and an exit code
        return _report(args, error)


def _report(args: argparse.Namespace, error: Exception) -> int:
    """Print ``error`` on one line (after its traceback with ``--debug``); return the exit code."""
    if isinstance(error, BlockpruneError):
        code, message = BAD_INPUT, str(error)
    else:
        code, message = FAILURE, f"{type(error).__name__}: {error}"
    if args.debug:
        traceback.print_exception(error)
    elif code == FAILURE:
        message += " (rerun with --debug for the traceback)"
    print(f"blockprune {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code
