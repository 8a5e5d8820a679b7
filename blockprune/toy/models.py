"""The toy models: a diffusers transformer on patchified pixels (no VAE) and a small word-level text encoder.

``ToyConfig`` says everything needed to rebuild both; it is what the weights' JSON file holds.
The transformer predicts the rectified-flow velocity ``noise − image`` at time ``t`` in [0, 1]
(``x_t = (1 − t) image + t noise``, images scaled to [−1, 1]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BlockpruneError
from .captions import MAX_WORDS, PAD, tokenize, vocabulary
from .dataset import IMAGE_SIZE

FAMILIES = ("flux", "sd3")


@dataclass
class ToyConfig:
    """Architecture and sampling defaults of a toy model.

    ``blocks`` is ``(double, single)`` for the FLUX family and ``(joint,)`` for SD3; ``width`` is the
    transformer's and ``text_width`` the text encoder's channel width.
    """

    family: str = "flux"
    width: int = 128
    heads: int = 4
    blocks: tuple[int, ...] = (6, 14)
    patch_size: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocabulary: tuple[str, ...] = field(default_factory=vocabulary)
    max_words: int = MAX_WORDS
    image_size: int = IMAGE_SIZE
    guidance_scale: float = 1.0
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        self.blocks, self.vocabulary = tuple(self.blocks), tuple(self.vocabulary)
        if self.family not in FAMILIES:
            raise BlockpruneError(f"unknown toy model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if len(self.blocks) != (2 if self.family == "flux" else 1):
            raise BlockpruneError(
                f"blocks={self.blocks} does not fit the {self.family} family; give (double, single) for flux, (joint,) for sd3"
            )
        if self.width % self.heads or (self.width // self.heads) % 8:
            raise BlockpruneError(f"width {self.width} must split into {self.heads} heads of a multiple of 8 channels")
        if self.image_size % self.patch_size:
            raise BlockpruneError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        data = asdict(self)
        data["blocks"], data["vocabulary"] = list(self.blocks), list(self.vocabulary)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise BlockpruneError(f"unknown toy model setting {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rotary split of a head over (text index, row, column); every part even."""
    first = 2 * (head_dim // 8)
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


def build_transformer(config: ToyConfig) -> nn.Module:
    """A fresh diffusers transformer for ``config``, with diffusers' default (random) initialisation."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    head_dim = config.width // config.heads
    channels = 3 * config.patch_size**2
    if config.family == "flux":
        return FluxTransformer2DModel(
            patch_size=1,  # the pipeline packs patches into channels itself, as FLUX's pipeline does
            in_channels=channels,
            num_layers=config.blocks[0],
            num_single_layers=config.blocks[1],
            attention_head_dim=head_dim,
            num_attention_heads=config.heads,
            joint_attention_dim=config.text_width,
            pooled_projection_dim=config.text_width,
            axes_dims_rope=_rope_axes(head_dim),
        )
    return SD3Transformer2DModel(
        sample_size=config.image_size,
        patch_size=config.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=config.blocks[0],
        attention_head_dim=head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=config.text_width,
        caption_projection_dim=config.width,
        pooled_projection_dim=config.text_width,
        pos_embed_max_size=config.image_size // config.patch_size,
        qk_norm="rms_norm",
    )


class ToyTextEncoder(nn.Module):
    """Word embeddings plus learned positions, a small pre-norm transformer encoder and a final norm.

    Returns the sequence states ``(B, max_words, width)`` and a pooled vector (their mean) ``(B, width)``.
    """

    def __init__(self, vocabulary: tuple[str, ...], width: int = 128, layers: int = 2, heads: int = 4, max_words: int = MAX_WORDS) -> None:
        super().__init__()
        self.vocabulary, self.max_words = tuple(vocabulary), max_words
        self.token_embedding = nn.Embedding(len(vocabulary), width)
        self.position_embedding = nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Word ids ``(len(prompts), max_words)`` on the encoder's device."""
        return tokenize(prompts, self.vocabulary, self.max_words).to(self.token_embedding.weight.device)

    def empty_tokens(self, count: int) -> torch.Tensor:
        """Word ids of ``count`` empty prompts (all padding): the unconditional input."""
        return torch.full((count, self.max_words), self.vocabulary.index(PAD), dtype=torch.long, device=self.token_embedding.weight.device)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.norm(self.encoder(self.token_embedding(token_ids) + self.position_embedding))
        return states, states.mean(1)


def build_text_encoder(config: ToyConfig) -> ToyTextEncoder:
    """A fresh text encoder for ``config``."""
    return ToyTextEncoder(config.vocabulary, config.text_width, config.text_layers, config.text_heads, config.max_words)


def family_of(transformer: nn.Module) -> str:
    """``"flux"`` or ``"sd3"`` by the transformer's class; any other class is an error."""
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise BlockpruneError(f"toy pipelines hold a FluxTransformer2DModel or SD3Transformer2DModel, got {name}")


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` → patch tokens ``(B, H/p · W/p, C · p²)``, row-major."""
    b, c, h, w = images.shape
    return images.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    """The inverse of :func:`pack` for square images of side ``size``."""
    b, side = tokens.shape[0], size // patch
    return tokens.view(b, side, side, -1, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, size, size)


def transformer_inputs(
    transformer: nn.Module, config: ToyConfig, images: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The keyword arguments of the transformer's forward for noisy images ``x_t`` at times ``t`` in [0, 1]."""
    if family_of(transformer) == "sd3":
        return {"hidden_states": images, "encoder_hidden_states": states, "pooled_projections": pooled, "timestep": t * 1000}
    side = config.image_size // config.patch_size
    index = torch.arange(side, device=images.device, dtype=images.dtype)  # made on the device: no copy, no stall
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return {
        "hidden_states": pack(images, config.patch_size),
        "encoder_hidden_states": states,
        "pooled_projections": pooled,
        "timestep": t,
        "img_ids": img_ids,
        "txt_ids": torch.zeros(states.shape[1], 3, device=images.device, dtype=images.dtype),
    }


def velocity(transformer: nn.Module, config: ToyConfig, images: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity prediction ``(B, 3, H, W)`` for noisy images ``x_t`` at times ``t``."""
    output = transformer(**transformer_inputs(transformer, config, images, t, states, pooled)).sample
    if family_of(transformer) == "sd3":
        return output
    return unpack(output, config.patch_size, config.image_size)
