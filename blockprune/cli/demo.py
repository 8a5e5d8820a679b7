"""``blockprune demo``: a trained small model compressed, saved, reloaded and compared with the original."""

from __future__ import annotations

import argparse

from ..toy.small_models import TOY_MODELS
from .sources import check_output_folder


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "demo", parents=parents, help="compress the embedded default model and report",
        description="Compress flux-small, the project's 20-block FLUX-architecture text-to-image model trained on "
        "toy shapes (importance scoring, least squares and sandwich training); print the plan; save, reload, and "
        "report image fidelity against the original, attribute accuracy, FLOPs and CPU latency; write an image grid.",
    )
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--model", choices=sorted(TOY_MODELS), default="flux-small", help="trained small model (default flux-small)")
    parser.add_argument("--output", default="blockprune-demo", help="folder for the compressed transformer and grid.png")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--prompts", type=int, default=16, help="prompts to compare on (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration data, prompts and noise (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from ..toy.demo import demo

    check_output_folder(args.output, args.overwrite)
    demo(ratio=args.ratio, output=args.output, seed=args.seed, model=args.model, prompts=args.prompts)
    return 0
