"""The FLUX.1-dev configuration (METHOD.md §1) with random weights, and synthetic inputs of its real shapes.

A thin layer over :mod:`blockprune.toy.flux_dev` for the benchmark scripts.
"""

from __future__ import annotations

import torch

from blockprune.toy.flux_dev import FLUX_DEV_CONFIG, build_flux, flux_inputs

FLUX_DEV = {"patch_size": 1, **FLUX_DEV_CONFIG}


def build(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, double: int = 19, single: int = 38,
          seed: int = 0) -> torch.nn.Module:
    """A FLUX.1-dev-shaped transformer with random weights, built directly on ``device`` in ``dtype``."""
    return build_flux({**FLUX_DEV, "num_layers": double, "num_single_layers": single}, device, dtype, seed)


def inputs(count: int, resolution: int = 1024, text_tokens: int = 512, batch: int = 1, device="cpu",
           dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[dict]:
    """Forward inputs at ``resolution`` (VAE /8, patch 2: 4096 image tokens at 1024²) and 512 text tokens; the
    position ids stay float32."""
    shapes = build_flux(FLUX_DEV, device="meta")  # the configuration, without weights
    batches = flux_inputs(shapes, resolution, text_tokens, count=count, batch_size=batch, seed=seed)
    return [{k: v.to(device) if k.endswith("_ids") else v.to(device, dtype) for k, v in b.items()} for b in batches]
