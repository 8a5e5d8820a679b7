"""The ``blockprune`` command: compress, calibrate, inspect, importance, plugins, demo.

Exit codes: 0 success, 1 failure, 2 bad input (a :class:`~blockprune.errors.BlockpruneError` or a usage
error). Errors are printed on one line; ``--debug`` adds the traceback and blockprune's debug log.

Only the command named on the command line is imported (with torch and diffusers, as it needs them), so
``blockprune --help`` and ``blockprune --version`` return at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from .._version import __version__
from ..errors import BlockpruneError

SUCCESS, FAILURE, BAD_INPUT = 0, 1, 2
# command -> its one-line help, in the order ``blockprune --help`` lists them; each is the module cli/<command>.py
COMMANDS = {
    "compress": "compress a model and save it",
    "calibrate": "record calibration batches from a pipeline into a safetensors file",
    "inspect": "list a model's blocks, streams, parameters and FLOPs",
    "importance": "score every block's importance",
    "plugins": "list plugins and the adapters and metrics they register",
    "demo": "compress the embedded default model and report",
}


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, exit code 2, and that takes no abbreviated flags
    (``--steps`` must not silently mean ``--steps-per-prompt``: one meaning per flag name)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Iterable[str] | None = None) -> ArgumentParser:
    """The parser of every command (``commands``: only these in full, the others listed by name and help);
    each full command's ``run`` is stored as the ``run`` default."""
    built = set(COMMANDS if commands is None else commands)
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a command's own --debug must not reset the one given before the command name.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print tracebacks and blockprune's debug log")
    parser = ArgumentParser(prog="blockprune", epilog="Run 'blockprune COMMAND --help' for a command's options.",
                            description="Make diffusion transformers faster by replacing whole blocks with fitted "
                            "linear layers. Exit codes: 0 success, 1 failure, 2 bad input.")
    parser.add_argument("--version", action="version", version=f"blockprune {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="print tracebacks and blockprune's debug log")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name in built:
            importlib.import_module(f".{name}", __name__).add_parser(subparsers, [debug])
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def named_command(argv: list[str]) -> list[str]:
    """The command that ``argv`` names (its first word that is not an option), as a list; empty if none is known."""
    word = next((item for item in argv if not item.startswith("-")), None)
    return [word] if word in COMMANDS else []


def main(argv: list[str] | None = None) -> int:
    """Run the ``blockprune`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(named_command(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error already printed
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
