"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint blocks; the last one returns no text stream."""

from __future__ import annotations

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl


class SD3Adapter(Adapter):
    """Joint blocks return ``(text, image)``; a ``context_pre_only`` block returns ``(None, image)``."""

    name = "sd3"
    chains_streams_by_name = True
    flow_time_scale = 1000.0
    text_inputs = ("encoder_hidden_states", "pooled_projections")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "SD3Transformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        if getattr(block, "context_pre_only", False):
            return BlockSpec(outputs=(None, "hidden_states"))
        return BlockSpec(outputs=("encoder_hidden_states", "hidden_states"))

    def describe_batch(self) -> dict[str, str]:
        return {
            "hidden_states": "(B, C, H/8, W/8) the noisy VAE latents (B doubled by classifier-free guidance)",
            "encoder_hidden_states": "(B, text tokens, joint_attention_dim) CLIP and T5 text states, concatenated",
            "pooled_projections": "(B, pooled_projection_dim) the pooled CLIP embeddings",
            "timestep": "(B,) the scheduler's timestep: the noise level × 1000",
            "joint_attention_kwargs": "extra attention arguments (None)",
            "return_dict": "False: the pipeline takes a tuple back",
        }


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(SD3Adapter())
