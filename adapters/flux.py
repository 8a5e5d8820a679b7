"""FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks, then 38 single-stream blocks."""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline
from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl

TEXT_AND_IMAGE = BlockSpec(outputs=("encoder_hidden_states", "hidden_states"))


class FluxAdapter(Adapter):
    """Both block kinds take and return the text (output 0) and image (output 1) streams.

    Single blocks concatenate the two streams (text first) internally; their surrogate keeps one
    affine map per stream.
    """

    name = "flux"
    chains_streams_by_name = True
    flow_time_scale = 1.0
    text_inputs = ("encoder_hidden_states", "pooled_projections")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "FluxTransformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks", "single_transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        return TEXT_AND_IMAGE

    def guidance_argument(self, pipeline: Any) -> str | None:
        """None for diffusers' FLUX pipelines: they feed ``guidance_scale`` into the model (FLUX.1-dev's distilled
        guidance), and apply classifier-free guidance (``true_cfg_scale``, where they have it) only against a
        negative prompt; pass ``guidance_scale=`` to compress to check guided against the empty prompt. Other
        pipelines' ``guidance_scale`` (the project's toy models) is classifier-free."""
        return None if isinstance(pipeline, DiffusionPipeline) else "guidance_scale"

    def describe_batch(self) -> dict[str, str]:
        return {
            "hidden_states": "(B, image tokens, in_channels) the noisy latents in patches (FLUX.1: 2 × 2 × 16 = 64 "
            "channels, 4096 tokens at 1024²)",
            "encoder_hidden_states": "(B, text tokens, joint_attention_dim) the T5 text states",
            "pooled_projections": "(B, pooled_projection_dim) the pooled CLIP embedding",
            "timestep": "(B,) the noise level in [0, 1] (the scheduler's timestep / 1000)",
            "img_ids": "(image tokens, 3) each image token's position (0, row, column) for the rotary embedding",
            "txt_ids": "(text tokens, 3) zeros: the text tokens' positions",
            "guidance": "(B,) the guidance scale of guidance-distilled models (FLUX.1-dev), else None",
            "joint_attention_kwargs": "extra attention arguments (None)",
            "return_dict": "False: the pipeline takes a tuple back",
        }


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(FluxAdapter())
