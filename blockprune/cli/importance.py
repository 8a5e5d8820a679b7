"""``blockprune importance``: per-block importance scores, without compressing."""

from __future__ import annotations

import argparse

from ..compress import importance
from ..report import output_console
from .options import (
    add_calibration_arguments,
    add_model_arguments,
    add_offload_argument,
    add_scoring_arguments,
    load_for_run,
    parse_importance,
)


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "importance", parents=parents, help="score every block's importance",
        description="Score every residual block with the importance metrics and print the table in replacement "
        "order (least important first). Scores are cached, so a later compress of the same model and "
        "calibration at any ratio costs no scoring.",
    )
    add_model_arguments(parser)
    add_offload_argument(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    add_calibration_arguments(parser)
    add_scoring_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Score and print the table."""
    metrics = parse_importance(args.importance or "fit_residual")
    loaded, options = load_for_run(args)
    table = importance(loaded.model, args.adapter, loaded.batches, importance=metrics, progress=args.progress,
                       device=args.device, **options)
    if not args.progress:  # importance() prints the table itself when it shows progress
        output_console().print(table.table())
    if table.cached:
        output_console().print(f"from the score cache: {', '.join(table.cached)}")
    return 0
