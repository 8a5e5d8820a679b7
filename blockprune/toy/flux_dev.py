"""The FLUX.1-dev configuration with random weights: size, FLOPs and speed work without downloading it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import plugins
from ..brll.surrogate import LinearSurrogate
from ..discovery.flops import count_flops
from ..errors import BlockpruneError
from .demo import flux_batches

# METHOD.md §1: 19 double + 38 single blocks, width 3072, 11.90 B parameters.
FLUX_DEV_CONFIG: dict[str, Any] = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "in_channels": 64,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
PIXELS_PER_TOKEN = 16  # the VAE downsamples 8×, then 2 × 2 latent patches are packed into one token


def build_flux(
    config: Mapping[str, Any] = FLUX_DEV_CONFIG,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> nn.Module:
    """A ``FluxTransformer2DModel`` of ``config`` with seeded random weights, created directly on ``device``
    in ``dtype`` (no float32 copy on the CPU first). ``"meta"`` gives shapes alone, with no memory."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def flux_inputs(
    model: nn.Module,
    resolution: int = 1024,
    text_tokens: int = 512,
    count: int = 1,
    batch_size: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``count`` synthetic forward inputs for ``resolution``² images (1024²: 4096 image tokens), on the CPU."""
    if resolution <= 0 or resolution % PIXELS_PER_TOKEN:
        raise BlockpruneError(f"resolution must be a positive multiple of {PIXELS_PER_TOKEN} pixels, got {resolution}")
    return flux_batches(model, count, seed=seed, batch_size=batch_size, side=resolution // PIXELS_PER_TOKEN,
                        text_tokens=text_tokens)


def replace_with_surrogates(model: nn.Module, names: Iterable[str]) -> None:
    """Put an untrained linear surrogate (``Y = X``) in place of each named block, as ``compress`` would."""
    adapter = plugins.get_adapter(model, "flux")
    for name in names:
        block = model.get_submodule(name)
        spec = adapter.block_spec(name, block)
        surrogate = LinearSurrogate.for_block(block, spec, dict.fromkeys(spec.streams, model.inner_dim))
        model.set_submodule(name, surrogate)


def flux_flops(
    config: Mapping[str, Any] = FLUX_DEV_CONFIG,
    resolution: int = 1024,
    text_tokens: int = 512,
    replaced: Iterable[str] = (),
) -> int:
    """FLOPs of one forward at batch size 1, counted by torch's FLOP counter on the meta device: no weight is
    materialised. Blocks named in ``replaced`` count as linear surrogates. FLUX.1-dev at 1024² with 512 text
    tokens: 74.38 T (37.19 T multiply-accumulates)."""
    model = build_flux(config, device="meta")
    replace_with_surrogates(model, replaced)
    return count_flops(model, flux_inputs(model, resolution, text_tokens)[0])
