"""PixArt-α / PixArt-Σ (diffusers ``PixArtTransformer2DModel``) for blockprune, as an installable plugin.

PixArt stacks ``BasicTransformerBlock`` s in ``transformer_blocks``. Each block updates one residual
stream, ``hidden_states`` (the image tokens), and returns it as a single tensor; everything else it
receives is context, passed through unchanged: ``encoder_hidden_states`` (the projected T5 caption),
``timestep`` (the adaLN-single modulation computed from the timestep and ``added_cond_kwargs``),
attention masks and ``cross_attention_kwargs``.
"""

from __future__ import annotations

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl

__version__ = "0.1.0"


class PixArtAdapter(Adapter):
    """One stream, ``hidden_states``, in every block of ``transformer_blocks``.

    The model's forward reads nothing from inside its blocks (its final modulation uses its own
    ``scale_shift_table``), so a surrogate keeps no submodules. It hands ``hidden_states`` from one block
    to the next unchanged, so runs of replaced blocks may be fused. PixArt pipelines take ``prompt=`` and
    ``output_type=``, so the default :meth:`Adapter.call_pipeline` and :meth:`Adapter.generate` apply, and
    sandwich training puts LoRA on the default :meth:`Adapter.lora_targets` (the attention and
    feed-forward projections).
    """

    name = "pixart"
    chains_streams_by_name = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "PixArtTransformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        return BlockSpec(outputs="hidden_states")


@hookimpl
def blockprune_register_adapters(register) -> None:
    """Register the PixArt adapter."""
    register(PixArtAdapter())
