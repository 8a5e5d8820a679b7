"""DiT (``DiTTransformer2DModel``): one image stream; class-conditional."""

from __future__ import annotations

import zlib

from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl


class DiTAdapter(Adapter):
    """``BasicTransformerBlock`` maps ``hidden_states`` to itself.

    DiT's forward reads ``transformer_blocks[0].norm1.emb`` for its final modulation, so a surrogate
    replacing block 0 keeps that embedding.
    """

    name = "dit"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "DiTTransformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        kept = ("norm1.emb",) if name == "transformer_blocks.0" else ()
        return BlockSpec(outputs="hidden_states", kept_submodules=kept)

    def run_pipeline(self, pipe, prompt, generator, num_inference_steps) -> None:
        # DiT is conditioned on a class label, not text: use the prompt's label when the pipeline knows
        # it, else derive a stable label from the prompt.
        labels = getattr(pipe, "labels", None) or {}
        if prompt in labels:
            label = labels[prompt]
        else:
            label = zlib.crc32(prompt.encode()) % pipe.transformer.config.num_embeds_ada_norm
        pipe(class_labels=[label], num_inference_steps=num_inference_steps, generator=generator, output_type="np")


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(DiTAdapter())
