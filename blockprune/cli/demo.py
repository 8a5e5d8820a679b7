"""``blockprune demo``: a trained small model compressed, saved, reloaded and compared with the original."""

from __future__ import annotations

import argparse

from ..toy.small_models import TOY_MODELS
from .options import auto_or
from .sources import check_output_folder


class RenamedFlag(argparse.Action):
    """A flag that was renamed: using it is a usage error naming the new flag."""

    def __init__(self, option_strings: list[str], dest: str, new: str, note: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new, self.note = new, note

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was renamed {self.new} ({self.note})")


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "demo", parents=parents, help="compress the embedded default model and report",
        description="Compress flux-small, the project's 20-block FLUX-architecture text-to-image model trained on "
        "toy shapes (importance scoring, least squares, sandwich training and global healing); print the plan; save, "
        "reload, and report image fidelity against the original, attribute accuracy, FLOPs and CPU latency (median and "
        "spread of repeated, interleaved runs); write a labelled image grid.",
    )
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--model", choices=sorted(TOY_MODELS), default="flux-small", help="trained small model (default flux-small)")
    parser.add_argument("--output", default="blockprune-demo", help="folder for the compressed transformer and grid.png")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--num-prompts", dest="num_prompts", type=int, default=16, metavar="N",
                        help="how many prompts to compare on (default 16)")
    parser.add_argument("--prompts", action=RenamedFlag, new="--num-prompts N",
                        note="a count; --prompts FILE names a prompts file in compress, importance and calibrate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration data, prompts and noise (default 0)")
    parser.add_argument("--heal-steps", dest="heal_steps", type=auto_or(int, "a whole number"), default=0,
                        metavar="N", help="global healing's steps at most (default 0, as compress: none; auto: 100 on "
                                          "these rectified-flow models)")
    parser.add_argument("--sandwich-steps", dest="sandwich_steps", type=int, default=None, metavar="N",
                        help="sandwich training's steps per stage at most (default compress's, 1000; 100: a faster run)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from ..toy.demo import demo

    check_output_folder(args.output, args.overwrite)
    demo(ratio=args.ratio, output=args.output, seed=args.seed, model=args.model, num_prompts=args.num_prompts,
         progress=args.progress, heal_steps=args.heal_steps, sandwich_steps=args.sandwich_steps)
    return 0
