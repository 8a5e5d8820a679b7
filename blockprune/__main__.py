"""``python -m blockprune`` / ``blockprune``: run the embedded demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blockprune`` command."""
    parser = argparse.ArgumentParser(prog="blockprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compress the embedded default model and report")
    demo.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    demo.add_argument("--output", default="blockprune-demo", help="folder to save the compressed model to")
    args = parser.parse_args(argv)
    from .demo import run_demo

    run_demo(ratio=args.ratio, output=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
