"""DiT (``DiTTransformer2DModel``): one image stream; class-conditional."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from blockprune import Adapter, BlockSpec, hookimpl
from blockprune.adapter import prompt_seed_chunks


class DiTAdapter(Adapter):
    """``BasicTransformerBlock`` maps ``hidden_states`` to itself.

    DiT's forward reads ``transformer_blocks[0].norm1.emb`` for its final modulation, so a surrogate
    replacing block 0 keeps that embedding.
    """

    name = "dit"
    chains_streams_by_name = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "DiTTransformer2DModel"

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        kept = ("norm1.emb",) if name == "transformer_blocks.0" else ()
        return BlockSpec(outputs="hidden_states", kept_submodules=kept)

    def describe_batch(self) -> dict[str, str]:
        return {
            "hidden_states": "(B, C, H/8, W/8) the noisy VAE latents (B doubled by classifier-free guidance)",
            "timestep": "(B,) the scheduler's timestep",
            "class_labels": "(B,) the ImageNet class ids (the prompt's label, or a hash of it; 1000 unconditional)",
        }

    def call_pipeline(self, pipe, prompt, generator, num_inference_steps) -> None:
        pipe(class_labels=[class_label(pipe, prompt)], num_inference_steps=num_inference_steps, generator=generator,
             output_type="np")

    def generate(self, source, prompts, seeds, num_inference_steps, batch_size: int = 1) -> torch.Tensor:
        if isinstance(source, nn.Module):
            return super().generate(source, prompts, seeds, num_inference_steps)  # explains what is missing
        images = []
        for chunk in prompt_seed_chunks(prompts, seeds, batch_size):
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
            output = source(class_labels=[class_label(source, prompt) for prompt, _ in chunk],
                            num_inference_steps=num_inference_steps, generator=generators, output_type="np")
            images.append(torch.from_numpy(output.images).permute(0, 3, 1, 2))
        return torch.cat(images)


def class_label(pipe, prompt: str) -> int:
    """DiT is conditioned on a class, not text: the prompt's label if the pipeline knows it, else a stable hash."""
    labels = getattr(pipe, "labels", None) or {}
    if prompt in labels:
        return labels[prompt]
    return zlib.crc32(prompt.encode()) % pipe.transformer.config.num_embeds_ada_norm


@hookimpl
def blockprune_register_adapters(register) -> None:
    register(DiTAdapter())
