"""The embedded default: a small FLUX-architecture transformer and synthetic calibration inputs.

Its weights are random (seeded); the project's trained small models replace it once they exist.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

TEXT_TOKENS = 8
IMAGE_SIDE = 8  # 8 × 8 = 64 image tokens


TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 6,
    "num_single_layers": 14,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    """A FLUX-architecture transformer (6 double + 14 single blocks, width 64) with seeded random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def flux_batches(
    model: torch.nn.Module,
    count: int,
    seed: int = 0,
    batch_size: int = 2,
    side: int = IMAGE_SIDE,
    text_tokens: int = TEXT_TOKENS,
) -> list[dict[str, Any]]:
    """Synthetic FLUX forward inputs of the right shapes: noise latents, text states, positions, timesteps.

    ``side`` × ``side`` image tokens (a packed latent: 1024² pixels are 64 × 64 tokens) and ``text_tokens``
    text tokens; models with ``guidance_embeds`` also get a guidance scale.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    batches = []
    for _ in range(count):
        batch = {
            "hidden_states": torch.randn(batch_size, side * side, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(
                batch_size, text_tokens, config.joint_attention_dim, generator=generator
            ),
            "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=generator),
            "timestep": torch.rand(batch_size, generator=generator),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
        }
        if config.guidance_embeds:
            batch["guidance"] = torch.full((batch_size,), 3.5)
        batches.append(batch)
    return batches


def run_demo(ratio: float = 0.2, output: str | Path = "blockprune-demo", seed: int = 0) -> dict[str, float]:
    """Compress the embedded default, save it, reload it and report what changed."""
    import blockprune
    from blockprune.calibration import output_tensor

    torch.set_num_threads(1)  # a width-64 model: thread start-up costs more than it saves
    console = Console()
    console.print("[bold]blockprune demo[/]: a FLUX-architecture transformer with random weights (20 blocks)")
    model = tiny_flux(seed)
    calibration = flux_batches(model, 16, seed=seed)
    held_out = flux_batches(model, 4, seed=seed + 1)
    with torch.no_grad():
        reference = [output_tensor(model(**b)) for b in held_out]
    started = time.perf_counter()
    blockprune.compress(model, adapter="flux", ratio=ratio, calibration=calibration, seed=seed, cache_dir=False)
    elapsed = time.perf_counter() - started
    blockprune.save_pretrained(model, output)
    loaded = blockprune.from_pretrained(output)
    with torch.no_grad():
        outputs = [output_tensor(loaded(**b)) for b in held_out]
    error = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs, reference))
    error /= sum(float((r**2).sum()) for r in reference)
    console.print(f"compressed in {elapsed:.1f} s; saved to {output}/ and reloaded")
    console.print(f"relative output error on held-out inputs: {error:.4f}")
    return {"seconds": elapsed, "relative_error": error}
