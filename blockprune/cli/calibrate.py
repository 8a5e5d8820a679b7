"""``blockprune calibrate``: record a pipeline's transformer inputs into a calibration file (safetensors)."""

from __future__ import annotations

import argparse
import time

from .sources import DTYPES

DEFAULT_STEPS, DEFAULT_KEPT = 8, 2  # compress's calibration_steps and steps_per_prompt defaults


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "calibrate", parents=parents, help="record calibration batches from a pipeline into a safetensors file",
        description="Run a text-to-image pipeline on prompts and save its transformer's forward keyword arguments "
        "at evenly spaced denoising steps to a safetensors file (no pickles). 'blockprune compress TRANSFORMER "
        "--calibration FILE' reads it, as does blockprune.load_calibration(FILE) in Python.",
    )
    parser.add_argument("model", metavar="PIPELINE",
                        help="a folder written by a diffusers pipeline's save_pretrained, or a small model that is a "
                        "pipeline (flux-small, sd3-small)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the calibration file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--adapter", default="auto", help="adapter name (default: auto, chosen by the model's class)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="load the pipeline in this dtype and save the calibration in it (default: as saved)")
    parser.add_argument("--device", help="the device to run the pipeline on, e.g. cuda")
    parser.add_argument("--prompts", metavar="FILE",
                        help="prompts, one a line (default: the 40 bundled ones; a toy model's own captions for it)")
    parser.add_argument("--num-prompts", dest="num_prompts", type=int, metavar="N",
                        help="use the first N prompts (default: all; 40 for a toy model)")
    parser.add_argument("--height", type=int, metavar="PX", help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, metavar="PX", help="image width (default: the pipeline's)")
    parser.add_argument("--calibration-steps", dest="calibration_steps", type=int, default=DEFAULT_STEPS, metavar="N",
                        help=f"denoising steps per prompt (default {DEFAULT_STEPS})")
    parser.add_argument("--steps-per-prompt", dest="steps_per_prompt", type=int, default=DEFAULT_KEPT, metavar="N",
                        help=f"transformer calls kept per prompt, evenly spaced (default {DEFAULT_KEPT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise, prompt i gets seed + i (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(run=run)


def _prompts(args: argparse.Namespace, small) -> list[str]:
    from ..calibration import bundled_prompts, read_prompts
    from ..errors import BlockpruneError

    if args.num_prompts is not None and args.num_prompts < 1:
        raise BlockpruneError(f"--num-prompts must be a positive integer, got {args.num_prompts}")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif small is not None and small.prompts is not None:
        prompts = small.prompts(args.num_prompts or 40, args.seed)
    else:
        prompts = bundled_prompts()
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def run(args: argparse.Namespace) -> int:
    """Record, save, and print what a batch holds."""
    from .. import plugins
    from ..calibration import record_calibration
    from ..calibration_file import save_calibration
    from ..errors import BlockpruneError
    from ..report import calibration_table, output_console
    from .options import place
    from .sources import (
        check_adapter_name,
        check_output_file,
        is_pipeline,
        model_source,
    )

    output = check_output_file(args.output, args.overwrite)
    check_adapter_name(args.adapter)
    source = model_source(args.model)
    prompts = _prompts(args, source.small)
    pipe = source.load(DTYPES.get(args.dtype))
    if not is_pipeline(pipe):
        raise BlockpruneError(f"{args.model} is a bare {type(pipe).__name__}: calibrate runs a pipeline; pass the "
                              f"folder of the pipeline that holds it (with model_index.json)")
    if args.device is not None:
        place(pipe, args.device, offload=False)
    adapter = plugins.get_adapter(pipe.transformer, args.adapter)
    started = time.perf_counter()
    batches = record_calibration(pipe, prompts, adapter=adapter.name, num_inference_steps=args.calibration_steps,
                                 steps_per_prompt=args.steps_per_prompt, height=args.height, width=args.width,
                                 seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - started
    info = {"pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__, "adapter": adapter.name,
            "source": args.model, "prompts": prompts, "num_inference_steps": args.calibration_steps,
            "steps_per_prompt": args.steps_per_prompt, "height": args.height, "width": args.width, "seed": args.seed,
            "dtype": args.dtype}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(batches, output, info=info, dtype=DTYPES.get(args.dtype))
    console = output_console()
    title = f"a calibration batch ({adapter.name} adapter): the transformer's forward keyword arguments"
    console.print(calibration_table(batches, adapter.describe_batch(), title))
    console.print(f"recorded {len(batches)} batches from {len(prompts)} prompts in {seconds:.1f} s; saved to {output} "
                  f"({output.stat().st_size / 1e6:.1f} MB)")
    console.print(f"use it: blockprune compress TRANSFORMER_FOLDER --calibration {output}, or in Python "
                  f"blockprune.compress(transformer, calibration=blockprune.load_calibration({str(output)!r}))")
    return 0
