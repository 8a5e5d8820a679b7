"""ACE-Step (``AceStepTransformer1DModel``): one stream; the forward reads block 0's attention processor."""

from __future__ import annotations

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl


class AceStepAdapter(Adapter):
    """``AceStepTransformerBlock`` maps ``hidden_states`` to itself.

    The model's forward looks at ``layers[0].self_attn.processor`` to choose its attention-mask format,
    an attribute read the generic adapter cannot see, so a surrogate replacing block 0 keeps ``self_attn``.
    """

    name = "ace_step"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "AceStepTransformer1DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["layers"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        return BlockSpec(outputs="hidden_states", kept_submodules=("self_attn",) if name == "layers.0" else ())


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(AceStepAdapter())
