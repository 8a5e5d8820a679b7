"""``blockprune compress``: replace a share of a model's blocks by fitted linear layers and save the result."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

from ..compress import ORDERS, compress
from ..config import (
    HEAL_KEPT,
    HEAL_STATES,
    TARGETS,
    SandwichConfig,
    sandwich_option_names,
)
from ..plan import plan
from ..report import output_console, print_plan
from ..serialization import save_pretrained
from .options import (
    add_calibration_arguments,
    add_model_arguments,
    add_offload_argument,
    add_scoring_arguments,
    auto_or,
    load_for_run,
    parse_importance,
)
from .sources import check_output_folder

SANDWICH_HELP = {
    "width": "blocks trained per stage: 1 the linear layers alone, 3 with the nearest unreplaced block on each "
    "side (the paper), 5 with two on each side",
    "steps": "optimizer steps per stage at most (the held-out guard may stop earlier)",
    "lr": "AdamW peak rate, or auto: the best of short probes at 1e-4, 3e-4 and 1e-3, each scored after a cool-down",
    "batch_size": "calibration batches per optimizer step",
    "split": "share of the batches not held out that train (the least squares fit on all of them)",
    "held_out": "share of the calibration batches held out: the guard's check and the before/after report",
    "eval_every": "steps between held-out checks (the best weights seen are kept), or auto: a twentieth of the steps, "
                  "at least 10",
    "patience": "checks in a row without improvement before a stage stops early",
    "heal_steps": "global healing after the last stage, steps at most (0: off), or auto: 100 where it trains on the "
                  "model's own trajectory (rectified-flow models without offload), else off",
    "heal_kept": "how healing trains the kept blocks: lora (merged after) or full (every weight; far more memory)",
    "heal_states": "what healing trains on: trajectory (the compressed model's own sampling), calibration, or auto "
    "(the trajectory for rectified-flow models without offload)",
    "target": "local: the original blocks on the span's input; global: the unpruned model's activation",
    "lora_rank": "LoRA rank on the neighbours",
    "lora_alpha": "LoRA alpha",
    "lora_targets": "module names inside a block that get LoRA (default: the adapter's)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "train_surrogates": "train the span's linear layers too (default on; off: they keep their least-squares fit)",
    "activation_budget": "bytes of recorded activations kept in RAM before spilling to disk",
}


def add_sandwich_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sandwich/--no-sandwich`` and one option per :class:`SandwichConfig` field, named as in ``compress``."""
    group = parser.add_argument_group("sandwich training", "after each replacement, train its span (LoRA on the "
                                      "neighbours, the linear layers in full); merged, so inference costs nothing extra")
    group.add_argument("--sandwich", action=argparse.BooleanOptionalAction, default=None,
                       help="sandwich training after each replacement (default: compress()'s, on)")
    defaults = SandwichConfig()
    for field, name in zip(fields(SandwichConfig), sandwich_option_names()):
        default = getattr(defaults, field.name)
        flag = "--" + name.replace("_", "-")
        text = SANDWICH_HELP[field.name] + ("" if default is None or isinstance(default, bool) else f" (default {default})")
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "target":
            group.add_argument(flag, dest=name, choices=TARGETS, help=text)
        elif field.name in ("heal_kept", "heal_states"):
            group.add_argument(flag, dest=name, choices=HEAL_KEPT if field.name == "heal_kept" else HEAL_STATES,
                               help=text)
        elif field.name == "lora_targets":
            group.add_argument(flag, dest=name, nargs="+", metavar="NAME", help=text)
        elif field.name == "lr":
            group.add_argument(flag, dest=name, type=auto_or(float, "a number"), metavar="X", help=text)
        elif field.name in ("heal_steps", "eval_every"):
            group.add_argument(flag, dest=name, type=auto_or(int, "a whole number"), metavar="N", help=text)
        else:
            group.add_argument(flag, dest=name, type=type(default), metavar="N" if isinstance(default, int) else "X",
                               help=text)


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "compress", parents=parents, help="compress a model and save it",
        description="Replace round(ratio × blocks) residual blocks of a model by linear layers fitted by least "
        "squares (BRLL), least important first, with sandwich training after each replacement, and save the "
        "result with blockprune.save_pretrained.",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to save the compressed model to")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--fuse", action="store_true",
                        help="fuse runs of adjacent replaced blocks before saving (irreversible; no reuse or retraining)")
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--order", default="importance",
                        help=f"replacement order: {', '.join(ORDERS)}, or comma-separated block names (default importance)")
    parser.add_argument("--surrogate", metavar="KIND",
                        help="a registered surrogate kind: linear, fitted by least squares (BRLL, default); identity, "
                        "Y = X, the blocks deleted (a baseline to compare with); or a plugin's")
    parser.add_argument("--auto-held-out", dest="auto_held_out", type=float, metavar="X",
                        help="importance auto: share of the calibration batches kept out to check each candidate "
                        "plan (default 0.25)")
    parser.add_argument("--auto-refine", dest="auto_refine", type=int, metavar="N",
                        help="importance auto: rounds of greedy block swaps after the best candidate (default 1)")
    parser.add_argument("--auto-check", dest="auto_check", choices=("auto", "images", "trajectory", "outputs"),
                        help="importance auto: check candidates on sampled images (the default with a pipeline), on a "
                        "short latent trajectory from held-out batches (the default without one, for FLUX / SD3), or "
                        "on one-step outputs")
    parser.add_argument("--auto-check-batches", dest="auto_check_batches", type=int, metavar="N",
                        help="importance auto: held-out batches a trajectory or outputs check runs on (default 8)")
    parser.add_argument("--auto-check-samples", dest="auto_check_samples", type=int, metavar="N",
                        help="importance auto: noise draws a trajectory check makes at least, its batches repeated "
                        "with fresh noise (default 32; bounds its cost with --auto-check-batches)")
    parser.add_argument("--auto-finalists", dest="auto_finalists", type=int, metavar="N",
                        help="importance auto: best plans re-checked over the sampling steps (default 3; 0: none)")
    parser.add_argument("--sampling-steps", dest="sampling_steps", type=int, metavar="N",
                        help="the denoising steps you sample with: importance auto re-checks its best plans over them "
                        "(default: the pipeline's; 28 without one)")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, metavar="S",
                        help="the classifier-free guidance scale you sample with: importance auto's trajectory check "
                        "and the heal guard step with it (default: the pipeline's; 1: unguided)")
    parser.add_argument("--rescore", choices=("once", "each"),
                        help="score blocks once (the paper) or again after each replacement (default once)")
    parser.add_argument("--reuse-from", dest="reuse_from", metavar="DIR",
                        help="assemble from the folder of a higher-ratio run, without scoring or training")
    parser.add_argument("--workdir", metavar="DIR",
                        help="save finished work there as it goes; the same command resumes after an interruption")
    parser.add_argument("--keep-activations", dest="keep_activations", action="store_true", default=None,
                        help="keep spilled activation shards in the workdir after their stage")
    add_offload_argument(parser)
    parser.add_argument("--record-device", dest="record_device", metavar="DEVICE",
                        help="device of the float64 least-squares accumulators (default: the block's device)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    add_sandwich_arguments(parser)
    add_calibration_arguments(parser)
    add_scoring_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compress, save, and print the plan."""
    output = check_output_folder(args.output, args.overwrite)
    importance = parse_importance(args.importance or "auto")
    order = args.order if args.order in ORDERS else [name.strip() for name in args.order.split(",") if name.strip()]
    loaded, options = load_for_run(args)
    if args.sandwich is not None:
        options["sandwich"] = args.sandwich
    started = time.perf_counter()
    compress(loaded.model, adapter=args.adapter, ratio=args.ratio, calibration=loaded.batches, order=order,
             importance=importance, seed=args.seed, progress=args.progress, device=args.device, **options)
    seconds = time.perf_counter() - started
    save_pretrained(loaded.model, output, fuse=args.fuse)
    if not args.progress:
        print_plan(plan(loaded.model))
    console = output_console()
    console.print(f"compressed {args.model} in {seconds:.1f} s and saved to {output}")
    console.print(f"load it with blockprune.from_pretrained({str(output)!r})")
    return 0
