"""Images for generation metrics: made through the adapter, shared between metrics, checked."""

from __future__ import annotations

from typing import Any

import torch

from ...calibration import bundled_prompts
from ...errors import BlockpruneError
from ..base import ScoringContext

DEFAULT_PROMPTS = 8
DEFAULT_SEEDS = (0,)
DEFAULT_STEPS = 20


def generation_settings(context: ScoringContext) -> dict[str, Any]:
    """Prompts, seeds and steps for generation metrics, from the options or the defaults."""
    options = context.options
    return {
        "prompts": list(options.get("generation_prompts") or bundled_prompts()[:DEFAULT_PROMPTS]),
        "seeds": list(options.get("generation_seeds") or DEFAULT_SEEDS),
        "steps": int(options.get("generation_steps") or DEFAULT_STEPS),
        "batch_size": options.get("generation_batch_size") or 1,
    }


def prompts_per_image(context: ScoringContext) -> list[str]:
    """The prompt of every generated image, in generation order (each prompt once per seed)."""
    settings = generation_settings(context)
    return [prompt for prompt in settings["prompts"] for _ in settings["seeds"]]


def generated_images(context: ScoringContext) -> torch.Tensor:
    """Images of the model as it is now (``context.current`` ablated, or intact), ``(N, 3, H, W)`` in [0, 1].

    Generated once per state and kept in ``context.images`` so that every generation metric uses the
    same images.
    """
    key = None if context.current is None else context.current.name
    if key not in context.images:
        settings = generation_settings(context)
        batching = {"batch_size": settings["batch_size"]} if settings["batch_size"] != 1 else {}  # adapters of old keep working
        images = context.adapter.generate(context.generator, settings["prompts"], settings["seeds"], settings["steps"], **batching)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise BlockpruneError(
                f"the {context.adapter.name!r} adapter's generate() returned {shape}; it must return a tensor "
                f"of images (N, 3, H, W) in [0, 1]"
            )
        expected = len(settings["prompts"]) * len(settings["seeds"])
        if images.shape[0] != expected:
            raise BlockpruneError(
                f"the {context.adapter.name!r} adapter's generate() returned {images.shape[0]} images for "
                f"{expected} prompt-seed pairs"
            )
        context.images[key] = images.float().cpu()
    return context.images[key]
