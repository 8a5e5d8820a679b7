"""Adapters: how an architecture's residual blocks and their streams are laid out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .discovery.spec import BlockSpec
from .errors import BlockpruneError

if TYPE_CHECKING:
    from .discovery.trace import Trace


class Adapter:
    """Maps one architecture's block layout onto the core.

    Subclasses set ``name`` and implement :meth:`matches`, :meth:`block_lists` and
    :meth:`block_spec`. Adapters that discover blocks themselves override
    :meth:`trace_targets` and :meth:`blocks` instead (see the ``generic`` adapter).

    Set ``chains_streams_by_name`` when the host model hands every output stream of a block, unchanged,
    to the next block's input of the same name; :func:`blockprune.fuse` relies on it.

    Set ``flow_time_scale`` for rectified-flow models whose forward takes noisy latents as ``hidden_states``,
    a ``timestep`` equal to the noise level times this scale, and returns a velocity shaped like the latents
    (FLUX: 1, SD3: 1000): ``importance="auto"`` then checks plans over a short latent trajectory when no
    pipeline is at hand.

    Set ``text_inputs`` to the forward arguments that carry the prompt: with a pipeline that samples with
    classifier-free guidance, those trajectories are guided, the empty prompt's inputs swapped in for them
    (:mod:`blockprune.scoring.guidance`).
    """

    name: str = ""
    chains_streams_by_name: bool = False
    flow_time_scale: float | None = None
    text_inputs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run_pipeline" in cls.__dict__:  # renamed: an override under the old name would be silently ignored
            raise BlockpruneError(
                f"{cls.__name__} defines run_pipeline(), which blockprune 0.1 renamed call_pipeline(); rename the "
                f"method (same arguments: pipe, prompt, generator, num_inference_steps)"
            )

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""
        raise NotImplementedError

    def block_lists(self, model: nn.Module) -> list[str]:
        """Module paths of the block lists (``nn.ModuleList``); blocks are ordered as they run in the forward pass."""
        raise NotImplementedError

    def block_spec(self, name: str, block: nn.Module) -> BlockSpec:
        """The streams of the block at module path ``name``."""
        raise NotImplementedError

    def trace_targets(self, model: nn.Module) -> list[str]:
        """Module paths to watch during the tracing forward pass."""
        names = []
        for path in self.block_lists(model):
            blocks = model.get_submodule(path)
            names += [f"{path}.{i}" for i in range(len(blocks))]
        return names

    def blocks(self, model: nn.Module, trace: Trace) -> list[tuple[str, BlockSpec]]:
        """The model's residual blocks in data-flow order, each with its spec."""
        return [(name, self.block_spec(name, model.get_submodule(name))) for name in self.trace_targets(model)]

    def call_pipeline(
        self, pipe: Any, prompt: str, generator: torch.Generator, num_inference_steps: int, **options: Any
    ) -> None:
        """Run ``pipe`` once on ``prompt``; used to record calibration inputs from a pipeline. ``options``
        (``height``, ``width``, when the caller gives them) are passed on to the pipeline."""
        pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="latent",
             **options)

    def guidance_argument(self, pipeline: Any) -> str | None:
        """The argument of ``pipeline``'s call that sets its classifier-free guidance scale (``None``: it has none)."""
        return "guidance_scale"

    def describe_batch(self) -> dict[str, str]:
        """What each key of a calibration batch (the transformer's forward keyword arguments) holds, with its
        shape; ``blockprune calibrate`` prints it beside the recorded shapes. Empty where unknown."""
        return {}

    def lora_targets(self, block: nn.Module) -> list[str]:
        """Module names inside ``block`` that sandwich training puts LoRA on: by default the attention and MLP
        projections, i.e. every ``nn.Linear`` outside norms (adaLN modulation) and embeddings."""
        return [
            name
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and not any(part in name for part in ("norm", "emb"))
        ]

    def generate(
        self, source: Any, prompts: list[str], seeds: list[int], num_inference_steps: int, batch_size: int = 1
    ) -> torch.Tensor:
        """Images for each prompt and seed (prompt-major), ``(N, 3, H, W)`` in [0, 1], for generation metrics.

        ``source`` is the pipeline holding the model, or the bare model when there is none. This default
        calls a diffusers text-to-image pipeline, ``batch_size`` images per call (one seeded generator each);
        adapters of models that sample otherwise override it.
        """
        if isinstance(source, nn.Module):
            raise BlockpruneError(
                f"the {self.name!r} adapter cannot generate images from a bare {type(source).__name__}: pass the "
                f"pipeline that holds it (its .transformer), or use a forward metric such as output_mse"
            )
        images = []
        for chunk in prompt_seed_chunks(prompts, seeds, batch_size):
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
            output = source(prompt=[prompt for prompt, _ in chunk], num_inference_steps=num_inference_steps,
                            generator=generators, output_type="pt")
            images.append(output.images)
        return torch.cat(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def prompt_seed_chunks(prompts: list[str], seeds: list[int], batch_size: int) -> list[list[tuple[str, int]]]:
    """Every (prompt, seed) pair, prompt-major, in chunks of ``batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BlockpruneError(f"generation_batch_size must be a positive integer, got {batch_size!r}")
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    return [pairs[start:start + batch_size] for start in range(0, len(pairs), batch_size)]
