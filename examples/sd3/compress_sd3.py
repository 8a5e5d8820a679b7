"""Compress Stable Diffusion 3 / 3.5 with blockprune, save it, and compare images and latency with the original.

    python examples/sd3/compress_sd3.py --model-path stabilityai/stable-diffusion-3.5-medium --ratio 0.2
    python examples/sd3/compress_sd3.py --tiny   # CPU, no downloads: a tiny SD3 transformer, random weights

The pipeline is read from a local folder or the Hugging Face cache (``local_files_only=True``); nothing is
downloaded. Calibration is recorded from the pipeline on blockprune's bundled prompts or ``--prompts FILE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import Family, Setup, parser_for, run_example  # noqa: E402

TEXT_TOKENS = 8


def tiny_sd3(seed: int = 0) -> torch.nn.Module:
    """An SD3-architecture transformer (6 joint blocks, width 32) with seeded random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=16, num_attention_heads=2,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
    ).eval()


def sd3_batches(model: torch.nn.Module, count: int, seed: int, batch_size: int = 2) -> list[dict[str, Any]]:
    """Synthetic SD3 forward inputs: noise latents, text states, pooled text, timesteps in [0, 1000)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    side = config.sample_size
    return [
        {
            "hidden_states": torch.randn(batch_size, config.in_channels, side, side, generator=generator),
            "encoder_hidden_states": torch.randn(batch_size, TEXT_TOKENS, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=generator),
            "timestep": torch.rand(batch_size, generator=generator) * 1000,
        }
        for _ in range(count)
    ]


def build_tiny(args: argparse.Namespace) -> Setup:
    """The tiny SD3 transformer with synthetic calibration and held-out inputs."""
    model = tiny_sd3(args.seed)
    return Setup(model, sd3_batches(model, args.calibration_batches, args.seed), sd3_batches(model, 1, args.seed + 1),
                 "the tiny SD3 transformer")


SD3 = Family(
    title="Stable Diffusion 3 / 3.5",
    adapter="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    repo="stabilityai/stable-diffusion-3-medium-diffusers",
    build_tiny=build_tiny,
    describe_tiny="a tiny SD3-architecture transformer (6 blocks, width 32) with random weights",
)


def main(argv: list[str] | None = None) -> int:
    """Run the example."""
    return run_example(SD3, parser_for(SD3), argv)


if __name__ == "__main__":
    sys.exit(main())
