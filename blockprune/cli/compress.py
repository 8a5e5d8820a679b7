"""``blockprune compress``: replace a share of a model's blocks by fitted linear layers and save the result."""

from __future__ import annotations

import argparse
import time

from ..compress import ORDERS, compress
from ..plan import plan
from ..report import output_console, print_plan
from ..serialization import save_pretrained
from .options import (
    add_calibration_arguments,
    add_model_arguments,
    add_scoring_arguments,
    load_model,
    parse_importance,
    scoring_options,
)
from .sources import check_output_folder


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "compress", parents=parents, help="compress a model and save it",
        description="Replace round(ratio × blocks) residual blocks of a model by linear layers fitted by least "
        "squares (BRLL), least important first, and save the result with blockprune.save_pretrained.",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to save the compressed model to")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--order", default="importance",
                        help=f"replacement order: {', '.join(ORDERS)}, or comma-separated block names (default importance)")
    parser.add_argument("--rescore", choices=("once", "each"),
                        help="score blocks once (the paper) or again after each replacement (default once)")
    parser.add_argument("--sandwich", action=argparse.BooleanOptionalAction, default=None,
                        help="sandwich training after each replacement (default: compress()'s default, sandwich "
                        "training, which is not implemented yet: pass --no-sandwich)")
    parser.add_argument("--record-device", metavar="DEVICE",
                        help="device of the float64 least-squares accumulators (default: the block's device)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    add_calibration_arguments(parser)
    add_scoring_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compress, save, and print the plan."""
    output = check_output_folder(args.output, args.overwrite)
    importance = parse_importance(args.importance)
    order = args.order if args.order in ORDERS else [name.strip() for name in args.order.split(",") if name.strip()]
    loaded = load_model(args)
    loaded.check_calibration()
    options = {**scoring_options(args), **loaded.calibration_options()}
    for name in ("rescore", "record_device"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.sandwich is not None:
        options["sandwich"] = args.sandwich
    started = time.perf_counter()
    try:
        compress(loaded.model, adapter=args.adapter, ratio=args.ratio, calibration=loaded.batches, order=order,
                 importance=importance, seed=args.seed, progress=args.progress, **options)
    except NotImplementedError as error:
        raise NotImplementedError(f"{error} (on the command line: --no-sandwich)") from error
    seconds = time.perf_counter() - started
    save_pretrained(loaded.model, output)
    if not args.progress:
        print_plan(plan(loaded.model))
    console = output_console()
    console.print(f"compressed {args.model} in {seconds:.1f} s and saved to {output}")
    console.print(f"load it with blockprune.from_pretrained({str(output)!r})")
    return 0
