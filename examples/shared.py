"""What the FLUX and SD3 examples share: arguments, loading, timing, the image grid, and the run itself."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import blockprune
from blockprune import plugins
from blockprune.calibration import (
    bundled_prompts,
    read_prompts,
    record_pipeline_calibration,
)
from blockprune.cli.sources import DTYPES, check_output_folder
from blockprune.config import SandwichConfig, defaults
from blockprune.errors import BlockpruneError
from blockprune.plan import transformer_of
from blockprune.runtime.forward import model_device, output_tensor, to_device
from blockprune.runtime.timing import Latency, compare_text, machine, time_calls
from blockprune.toy.grid import save_image_grid


@dataclass
class Setup:
    """What an example compresses: a pipeline or bare transformer, its calibration, held-out inputs, a name."""

    model: Any
    calibration: list[dict[str, Any]] | None  # None: recorded from the pipeline on the prompts
    held_out: list[dict[str, Any]] | None  # None: one transformer call recorded from the pipeline
    label: str
    prompts: list[str] | None = None  # prompts the model can draw (a toy model's captions); None: the bundled ones


@dataclass
class Family:
    """One model family: its adapter, pipeline class, default weights, and how ``--tiny`` builds a stand-in."""

    title: str
    adapter: str
    pipeline_class: str
    repo: str
    build_tiny: Callable[[argparse.Namespace], Setup]
    describe_tiny: str


def parser_for(family: Family) -> argparse.ArgumentParser:
    """The example's command line."""
    parser = argparse.ArgumentParser(
        description=f"Compress {family.title} with blockprune (BRLL), save it, compare images and latency.",
    )
    parser.add_argument("--model-path", default=family.repo,
                        help=f"local folder or Hugging Face repo id, read with local_files_only=True (default {family.repo})")
    parser.add_argument("--tiny", action="store_true", help=f"run on CPU without downloads: {family.describe_tiny}")
    parser.add_argument("--prompts", metavar="FILE", help="calibration prompts, one a line (default: blockprune's bundled ones)")
    parser.add_argument("--ratio", type=float, default=0.2, help="share of blocks to replace (default 0.2)")
    parser.add_argument("--importance", metavar="METRIC",
                        help="how blocks are chosen: a metric such as fit_residual, or auto (default: compress's)")
    parser.add_argument("--output", default=f"{family.adapter}-compressed", help="folder to save the compressed transformer to")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.add_argument("--sandwich", action=argparse.BooleanOptionalAction, default=True,
                        help="sandwich training after each replacement (default on)")
    parser.add_argument("--sandwich-steps", type=int, default=SandwichConfig().steps,
                        help=f"optimizer steps per sandwich stage (default {SandwichConfig().steps})")
    parser.add_argument("--heal-steps", default=SandwichConfig().heal_steps,
                        type=lambda text: text if text == "auto" else int(text),
                        help=f"global healing after the last stage, steps at most, or auto: 100 on rectified-flow "
                             f"models such as FLUX and SD3 (default {SandwichConfig().heal_steps}: off)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the grid images (default 0 1)")
    parser.add_argument("--grid-prompts", type=int, default=2, help="prompts in the grid (default 2, from the calibration prompts)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps of the grid images (default 28)")
    parser.add_argument("--calibration-steps", type=int, default=defaults()["calibration_steps"],
                        help=f"denoising steps per calibration prompt (default {defaults()['calibration_steps']})")
    parser.add_argument("--steps-per-prompt", type=int, default=defaults()["steps_per_prompt"],
                        help=f"transformer calls kept per calibration prompt (default {defaults()['steps_per_prompt']})")
    parser.add_argument("--calibration-batches", type=int, default=16, help="synthetic calibration batches in --tiny mode")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the pipeline (default bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the pipeline")
    parser.add_argument("--latency-repeats", type=int, default=10,
                        help="timed forwards per measurement: the median and spread are printed (default 10)")
    parser.add_argument("--latency-warmup", type=int, default=2, help="untimed forwards before them (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of calibration and compress (default 0)")
    return parser


def load_pipeline(family: Family, args: argparse.Namespace) -> Any:
    """The pipeline from a local folder or the Hugging Face cache; never downloads."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_class)
    try:
        pipe = cls.from_pretrained(args.model_path, torch_dtype=DTYPES[args.dtype], local_files_only=True)
    except (OSError, ValueError) as error:
        raise BlockpruneError(
            f"cannot load {family.pipeline_class} from {args.model_path} without downloading ({type(error).__name__}); "
            f"download it first (huggingface-cli download {family.repo}), pass --model-path FOLDER, or use --tiny"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def forward_latency(transformer: torch.nn.Module, batch: dict[str, Any], repeats: int, warmup: int = 2) -> Latency:
    """Seconds of ``repeats`` transformer forwards on ``batch`` after ``warmup`` untimed ones (median and spread)."""
    device = model_device(transformer)
    batch = to_device(batch, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.no_grad():
        return time_calls(lambda: transformer(**batch), repeats, warmup, synchronize)


def generate(pipe: Any, adapter: str, prompts: list[str], seeds: list[int], steps: int) -> tuple[torch.Tensor, float]:
    """Images ``(N, 3, H, W)`` in [0, 1] for every prompt and seed, and the seconds per image."""
    started = time.perf_counter()
    images = plugins.get_adapter(pipe.transformer, adapter).generate(pipe, prompts, seeds, steps)
    return images, (time.perf_counter() - started) / len(images)


def save_grid(rows: dict[str, torch.Tensor], prompts: list[str], seeds: list[int], path: Path) -> Path:
    """One PNG: a labelled row per ``label → images (N, 3, H, W)`` in [0, 1], a column per prompt and seed
    (labelled), small images upscaled."""
    columns = [f"{prompt} (seed {seed})" for prompt in prompts for seed in seeds]
    return save_image_grid({label: images.float().cpu() for label, images in rows.items()}, path, columns=columns)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖got − expected‖² / ‖expected‖²``."""
    return float(((got.float() - expected.float()) ** 2).sum() / (expected.float() ** 2).sum())


def compress_and_compare(family: Family, args: argparse.Namespace) -> None:
    """Load, measure, compress, save, measure again, and print the comparison."""
    output = check_output_folder(args.output, args.overwrite)
    setup = family.build_tiny(args) if args.tiny else Setup(load_pipeline(family, args), None, None, args.model_path)
    prompts = read_prompts(args.prompts) if args.prompts else (setup.prompts or bundled_prompts())
    model, calibration, held_out = setup.model, setup.calibration, setup.held_out
    transformer = transformer_of(model)
    pipe = None if model is transformer else model
    if held_out is None:  # one transformer call recorded from the pipeline, for the latency and error measurements
        adapter = plugins.get_adapter(transformer, family.adapter)
        held_out = record_pipeline_calibration(pipe, adapter, prompts[:1], args.calibration_steps, 1, seed=args.seed + 1)
    batch = held_out[0]
    with torch.no_grad():
        reference = output_tensor(transformer(**to_device(batch, model_device(transformer))))
    before = forward_latency(transformer, batch, args.latency_repeats, args.latency_warmup)
    grid_prompts = prompts[: args.grid_prompts]
    if pipe is not None:
        originals, seconds_before = generate(pipe, family.adapter, grid_prompts, args.seeds, args.steps)
    options = {} if calibration is not None else {
        "calibration_prompts": prompts, "calibration_steps": args.calibration_steps, "steps_per_prompt": args.steps_per_prompt
    }
    if args.importance:
        options["importance"] = args.importance
    blockprune.compress(model, adapter=family.adapter, ratio=args.ratio, calibration=calibration,
                        sandwich=args.sandwich, sandwich_steps=args.sandwich_steps, heal_steps=args.heal_steps,
                        seed=args.seed, **options)
    blockprune.save_pretrained(model, output)
    print(f"saved the compressed transformer to {output}/; load it with blockprune.from_pretrained({str(output)!r})")
    after = forward_latency(transformer, batch, args.latency_repeats, args.latency_warmup)
    with torch.no_grad():
        error = relative_error(output_tensor(transformer(**to_device(batch, model_device(transformer)))), reference)
    print(f"relative output error on a held-out transformer input: {error:.4f}")
    _print_latency(transformer, before, after, args)
    if pipe is None:
        print(f"image grid skipped: {setup.label} is a bare {type(transformer).__name__} without a pipeline (text "
              f"encoders, VAE), so it cannot generate images")
        return
    compressed, seconds_after = generate(pipe, family.adapter, grid_prompts, args.seeds, args.steps)
    replaced = len(blockprune.plan(transformer).replaced)
    rows = {"original": originals, f"compressed: {replaced} blocks replaced ({args.ratio:.0%})": compressed}
    grid = save_grid(rows, grid_prompts, args.seeds, output / "grid.png")
    print(f"image grid: {grid} (rows: original, compressed; columns: {len(grid_prompts)} prompts × "
          f"{len(args.seeds)} seeds, {args.steps} steps)")
    print(f"grid prompts: {' | '.join(grid_prompts)}")
    print(f"generation: {seconds_before:.2f} s → {seconds_after:.2f} s per image, ratio "
          f"{seconds_after / seconds_before:.3f} (one timed run each, so no spread: the forward figures are the "
          f"measured ones)")


def _print_latency(transformer: torch.nn.Module, before: Latency, after: Latency, args: argparse.Namespace) -> None:
    """The forward latency before and after, with the spread, the machine, and whether it is within noise."""
    device = model_device(transformer)
    print(f"transformer forward ({device.type}, {next(transformer.parameters()).dtype}, on {machine(str(device))}; "
          f"median ± half the interquartile range of {args.latency_repeats} runs after {args.latency_warmup} warm-up): "
          f"{before.text()} → {after.text()}, latency ratio {compare_text(after, before)}")
    print("FLOPs (the plan above) are the steady figure; a latency ratio on a shared CPU moves from run to run")


def run_example(family: Family, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """The example's main: exit code 0 on success, 2 on bad input (printed on one line)."""
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.dtype = "cpu", "float32"
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads, and one thread times more steadily
    try:
        compress_and_compare(family, args)
    except BlockpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
