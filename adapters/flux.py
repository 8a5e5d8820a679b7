"""FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks, then 38 single-stream blocks."""

from __future__ import annotations

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

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "FluxTransformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks", "single_transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        return TEXT_AND_IMAGE


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(FluxAdapter())
