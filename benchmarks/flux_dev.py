"""The FLUX.1-dev configuration (METHOD.md §1) with random weights, and synthetic inputs of its real shapes."""

from __future__ import annotations

import torch

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def build(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, double: int = 19, single: int = 38,
          seed: int = 0) -> torch.nn.Module:
    """A FLUX.1-dev-shaped transformer with random weights, built directly on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: 12 B parameters in float32 need 48 GB
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single})
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


def inputs(count: int, resolution: int = 1024, text_tokens: int = 512, batch: int = 1, device="cpu",
           dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[dict]:
    """Forward inputs at ``resolution`` (VAE /8, patch 2: 4096 image tokens at 1024²) and 512 text tokens."""
    side = resolution // 16
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    kw = {"dtype": dtype}
    return [
        {
            "hidden_states": torch.randn(batch, side * side, 64, generator=generator).to(device, **kw),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 4096, generator=generator).to(device, **kw),
            "pooled_projections": torch.randn(batch, 768, generator=generator).to(device, **kw),
            "timestep": torch.rand(batch, generator=generator).to(device, **kw),
            "guidance": torch.full((batch,), 3.5).to(device, **kw),
            "img_ids": ids.reshape(-1, 3).to(device),
            "txt_ids": torch.zeros(text_tokens, 3).to(device),
        }
        for _ in range(count)
    ]
