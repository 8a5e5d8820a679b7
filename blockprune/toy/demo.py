"""The README's main job (``blockprune demo``) on a trained small model, and a random-weight FLUX stand-in for tests.

``tiny_flux`` / ``flux_batches``: a 20-block FLUX-architecture transformer with seeded random weights and
synthetic inputs of the right shapes (the ``flux-random`` small model).
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


def demo(
    ratio: float = 0.2, output: str | Path = "blockprune-demo", seed: int = 0, model: str = "flux-small", prompts: int = 16
) -> dict[str, Any]:
    """Compress a trained small model, save and reload it, and report quality against the original.

    Prints the plan, teacher fidelity (PSNR, SSIM of the compressed model's images against the original's from
    the same noise and prompts), attribute accuracy of both, FLOPs and CPU latency, and writes
    ``{output}/grid.png`` (original above, compressed below) next to the saved transformer.
    """
    import blockprune

    from ..errors import BlockpruneError
    from . import (
        ToyPipeline,
        attribute_accuracy,
        calibration_batches,
        evaluation_prompts,
        generate,
        save_image_grid,
        teacher_fidelity,
    )

    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise BlockpruneError(f"prompts must be a positive integer (images to compare on), got {prompts!r}")
    torch.set_num_threads(min(2, torch.get_num_threads()))  # a width-128 model: more threads cost more than they save
    console = Console()
    pipe = ToyPipeline.from_pretrained(model)
    blocks = " + ".join(str(b) for b in pipe.config.blocks)
    console.print(f"[bold]blockprune demo[/]: {model}, a {pipe.config.family.upper()}-architecture text-to-image "
                  f"model ({blocks} blocks, width {pipe.config.width}) trained on toy shapes; compressing {ratio:.0%}")
    texts = evaluation_prompts(prompts, seed=seed + 1)
    seeds = list(range(seed, seed + prompts))
    original_images = generate(pipe, texts, seeds)
    timing = calibration_batches(pipe, 1, seed=seed + 2, batch_size=prompts)[0]
    original_seconds = _latency(pipe.transformer, timing)
    started = time.perf_counter()
    calibration = calibration_batches(pipe, 32, seed=seed, batch_size=8)  # 256 samples at random noise levels
    blockprune.compress(pipe, adapter=pipe.config.family, ratio=ratio, calibration=calibration, seed=seed,
                        score_batches=8, cache_dir=False)
    elapsed = time.perf_counter() - started
    output = Path(output)
    blockprune.save_pretrained(pipe.transformer, output / "transformer")
    pipe.transformer = blockprune.from_pretrained(output / "transformer")
    images = generate(pipe, texts, seeds)
    grid = save_image_grid({"original": original_images[:8], f"{ratio:.0%} replaced": images[:8]}, output / "grid.png")
    plan = blockprune.plan(pipe.transformer)
    result = {
        "seconds": elapsed,
        **teacher_fidelity(images, original_images),
        "accuracy_before": attribute_accuracy(original_images, texts)["accuracy"],
        "accuracy_after": attribute_accuracy(images, texts)["accuracy"],
        "flops_ratio": plan.flops_after / plan.flops_before,
        "latency_ratio": _latency(pipe.transformer, timing) / original_seconds,
    }
    console.print(f"compressed in {elapsed:.1f} s; saved to {output / 'transformer'}/ and reloaded")
    console.print(f"on {prompts} prompts, the same noise: PSNR {result['psnr']:.1f} dB, SSIM {result['ssim']:.3f} against "
                  f"the original; attribute accuracy {result['accuracy_before']:.2f} → {result['accuracy_after']:.2f}")
    console.print(f"FLOPs × {result['flops_ratio']:.3f}, CPU latency × {result['latency_ratio']:.3f} (batch {prompts})")
    console.print(f"image grid (original above, compressed below): {grid}")
    return result


def _latency(transformer: torch.nn.Module, batch: dict[str, Any], repeats: int = 7) -> float:
    """Median seconds of one forward pass."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            transformer(**batch)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]
