"""``blockprune demo``: the embedded default compressed, saved and reloaded."""

from __future__ import annotations

import argparse

from ..report import output_console
from .sources import check_output_folder


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "demo", parents=parents, help="compress the embedded default model and report",
        description="Compress the embedded default, a 20-block FLUX-architecture transformer with random "
        "weights, on synthetic inputs (least squares and sandwich training); print the plan; save, reload, and "
        "report the output error on held-out inputs.",
    )
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--output", default="blockprune-demo", help="folder to save the compressed model to")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from ..demo import run_demo

    check_output_folder(args.output, args.overwrite)
    run_demo(ratio=args.ratio, output=args.output, seed=args.seed)
    output_console().print(
        "no image grid: the embedded default has random weights and no pipeline (text encoders, VAE), "
        "so it cannot generate images"
    )
    return 0
