"""Compress FLUX.1-dev with blockprune, save it, and compare images and latency with the original.

    python examples/flux/compress_flux.py --ratio 0.2 --output flux-compressed
    python examples/flux/compress_flux.py --tiny   # CPU, no downloads: flux-small, the project's trained toy model

The pipeline is read from a local folder or the Hugging Face cache (``local_files_only=True``); nothing is
downloaded. Calibration is recorded from the pipeline on blockprune's bundled prompts or ``--prompts FILE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import Family, Setup, parser_for, run_example  # noqa: E402

from blockprune.toy.small_models import DEFAULT_SMALL_MODEL, small_model


def build_tiny(args: argparse.Namespace) -> Setup:
    """The small model named by ``--model``, with calibration and held-out inputs from its own builder, and for a
    trained toy pipeline (the default, flux-small) grid prompts it can draw."""
    small = small_model(args.model)
    model = small.build()
    calibration = small.calibration(model, args.calibration_batches, args.seed)
    prompts = small.prompts(max(args.grid_prompts, 1), args.seed) if small.prompts is not None else None
    return Setup(model, calibration, small.calibration(model, 1, args.seed + 1), args.model, prompts)


FLUX = Family(
    title="FLUX.1-dev",
    adapter="flux",
    pipeline_class="FluxPipeline",
    repo="black-forest-labs/FLUX.1-dev",
    build_tiny=build_tiny,
    describe_tiny="a small FLUX-architecture model from blockprune's registry (--model; default flux-small, "
    "trained on toy shapes, which draws the grid from its own captions)",
)


def main(argv: list[str] | None = None) -> int:
    """Run the example."""
    parser = parser_for(FLUX)
    parser.add_argument("--model", default=DEFAULT_SMALL_MODEL,
                        help=f"small model for --tiny, from blockprune.toy.small_models (default {DEFAULT_SMALL_MODEL})")
    return run_example(FLUX, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
