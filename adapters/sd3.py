"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint blocks; the last one returns no text stream."""

from __future__ import annotations

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl


class SD3Adapter(Adapter):
    """Joint blocks return ``(text, image)``; a ``context_pre_only`` block returns ``(None, image)``."""

    name = "sd3"
    chains_streams_by_name = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "SD3Transformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        if getattr(block, "context_pre_only", False):
            return BlockSpec(outputs=(None, "hidden_states"))
        return BlockSpec(outputs=("encoder_hidden_states", "hidden_states"))

    def call_pipeline(self, pipe, prompt, generator, num_inference_steps) -> None:
        pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="latent")


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(SD3Adapter())
