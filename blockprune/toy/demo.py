"""The README's main job (``blockprune demo``) on a trained small model, and a random-weight FLUX stand-in for tests.

``tiny_flux`` / ``flux_batches``: a 20-block FLUX-architecture transformer with seeded random weights and
synthetic inputs of the right shapes (the ``flux-random`` small model).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from ..runtime.timing import (
    Latency,
    compare_text,
    machine,
    ratio_range,
    time_interleaved,
)
from .grid import save_image_grid

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


LATENCY_REPEATS, LATENCY_WARMUP = 15, 3


def demo(ratio: float = 0.2, output: str | Path = "blockprune-demo", seed: int = 0, model: str = "flux-small",
         num_prompts: int = 16, progress: bool = True, heal_steps: int | str = 0,
         sandwich_steps: int | None = None) -> dict[str, Any]:
    """Compress a trained small model, save and reload it, and report quality against the original.

    Prints the plan, teacher fidelity (PSNR, SSIM of the compressed model's images against the original's from
    the same noise and prompts), attribute accuracy of both, FLOPs, and CPU latency (median ± half the
    interquartile range of interleaved runs after a warm-up, and whether the difference is within noise); writes
    ``{output}/grid.png`` (labelled rows: original, compressed; columns: the prompts) next to the saved transformer.
    ``heal_steps`` and ``sandwich_steps`` are ``compress``'s (healing is off by default; fewer sandwich steps than
    its 1,000 per stage: a faster run; ``None``: its default).
    """
    import blockprune

    from ..errors import BlockpruneError
    from ..progress import progress_bars
    from ..report import output_console
    from . import (
        ToyPipeline,
        attribute_accuracy,
        calibration_batches,
        evaluation_prompts,
        teacher_fidelity,
    )

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise BlockpruneError(f"num_prompts must be a positive integer (images to compare on), got {num_prompts!r}")
    torch.set_num_threads(min(2, torch.get_num_threads()))  # a width-128 model: more threads cost more than they save
    console = output_console()
    pipe = ToyPipeline.from_pretrained(model)
    blocks = " + ".join(str(b) for b in pipe.config.blocks)
    console.print(f"[bold]blockprune demo[/]: {model}, a {pipe.config.family.upper()}-architecture text-to-image "
                  f"model ({blocks} blocks, width {pipe.config.width}) trained on toy shapes; compressing {ratio:.0%}",
                  soft_wrap=True)
    texts = evaluation_prompts(num_prompts, seed=seed + 1)
    seeds = list(range(seed, seed + num_prompts))
    with progress_bars(progress, console) as bars:
        original_images = _generate(pipe, texts, seeds, bars, "generating images (original)")
    original = copy.deepcopy(pipe.transformer)  # timed against the compressed one, in turns
    output = Path(output)
    elapsed = _compress_and_reload(pipe, ratio, seed, output, progress, heal_steps, sandwich_steps)
    plan = blockprune.plan(pipe.transformer)
    with progress_bars(progress, console) as bars:
        images = _generate(pipe, texts, seeds, bars, "generating images (compressed)")
    label = f"compressed: {len(plan.replaced)} of {len(plan.blocks)} blocks replaced ({ratio:.0%})"
    grid = save_image_grid({"original": original_images[:8], label: images[:8]}, output / "grid.png",
                           columns=texts[:8])
    timing = calibration_batches(pipe, 1, seed=seed + 2, batch_size=num_prompts)[0]
    before, after = _latency([original, pipe.transformer], timing)
    ratio_now, low, high = ratio_range(after, before)
    result = {
        "seconds": elapsed, **teacher_fidelity(images, original_images),
        "accuracy_before": attribute_accuracy(original_images, texts)["accuracy"],
        "accuracy_after": attribute_accuracy(images, texts)["accuracy"],
        "flops_ratio": plan.flops_after / plan.flops_before,
        "latency_ratio": ratio_now, "latency_range": (low, high), "latency_within_noise": low <= 1 <= high,
    }
    _report(console, result, num_prompts, (before, after), output, grid)
    return result


def _compress_and_reload(pipe: Any, ratio: float, seed: int, output: Path, progress: bool,
                         heal_steps: int | str, sandwich_steps: int | None) -> float:
    """Compress ``pipe`` on 256 calibration samples, save its transformer to ``output`` and load it back in its
    place; returns the seconds ``compress`` took."""
    import blockprune

    from .pipeline import calibration_batches

    started = time.perf_counter()
    calibration = calibration_batches(pipe, 32, seed=seed, batch_size=8)  # 256 samples at random noise levels
    steps = {} if sandwich_steps is None else {"sandwich_steps": sandwich_steps}
    blockprune.compress(pipe, adapter=pipe.config.family, ratio=ratio, calibration=calibration, seed=seed,
                        score_batches=8, heal_steps=heal_steps, cache_dir=False, progress=progress, **steps)
    elapsed = time.perf_counter() - started
    blockprune.save_pretrained(pipe.transformer, output / "transformer")
    pipe.transformer = blockprune.from_pretrained(output / "transformer")
    return elapsed


def _report(console: Any, result: dict[str, Any], num_prompts: int, latency: tuple[Latency, Latency], output: Path,
            grid: Path) -> None:
    """The demo's figures, one whole line each (soft-wrapped, so that a log keeps them on one line)."""
    before, after = latency
    lines = [
        f"compressed in {result['seconds']:.1f} s; saved to {output / 'transformer'}/ and reloaded",
        (f"on {num_prompts} prompts, the same noise: PSNR {result['psnr']:.1f} dB, SSIM {result['ssim']:.3f} against "
         f"the original; attribute accuracy {result['accuracy_before']:.2f} → {result['accuracy_after']:.2f}"),
        f"FLOPs × {result['flops_ratio']:.3f} (counted, the steady figure)",
        (f"CPU latency, batch {num_prompts} on {machine()}, median ± half the interquartile range of {LATENCY_REPEATS} "
         f"runs in turns after {LATENCY_WARMUP} warm-up: {before.text()} → {after.text()}, {compare_text(after, before)}"),
        f"image grid (rows: original, compressed; columns: the first {min(8, num_prompts)} prompts): {grid}",
    ]
    for line in lines:
        console.print(line, soft_wrap=True)


def _generate(pipe: Any, texts: list[str], seeds: list[int], bars: Any, description: str, chunk: int = 4) -> torch.Tensor:
    """:func:`blockprune.toy.generate` in chunks of ``chunk`` prompts, advancing a bar."""
    from . import generate

    task = bars.add_task(description, total=len(texts))
    images = []
    for start in range(0, len(texts), chunk):
        images.append(generate(pipe, texts[start:start + chunk], seeds[start:start + chunk]))
        bars.advance(task, len(images[-1]))
    return torch.cat(images)


def _latency(transformers: list[torch.nn.Module], batch: dict[str, Any]) -> list[Latency]:
    """Forward latency of each transformer on ``batch``, timed in turns (see :func:`time_interleaved`)."""
    with torch.no_grad():
        return time_interleaved([lambda model=model: model(**batch) for model in transformers], LATENCY_REPEATS,
                                LATENCY_WARMUP)
