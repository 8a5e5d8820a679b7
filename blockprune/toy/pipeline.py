"""``ToyPipeline``: text → image with a toy model, an Euler sampler for rectified flow, saving and loading.

It is called like a diffusers text-to-image pipeline (``prompt``, ``num_inference_steps``,
``generator``, ``output_type``), so the FLUX and SD3 adapters' ``generate()`` and ``call_pipeline()``
work on it, and ``blockprune.compress(pipe)`` can record calibration through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import BlockpruneError
from ..plan import PLAN_ATTRIBUTE
from ..runtime.atomic import save_safetensors
from ..runtime.forward import model_device
from .dataset import sample_batch
from .models import (
    ToyConfig,
    ToyTextEncoder,
    build_text_encoder,
    build_transformer,
    transformer_inputs,
    velocity,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"
OUTPUT_TYPES = ("pt", "latent")


@dataclass
class ToyPipelineOutput:
    """Images ``(N, 3, H, W)``: in [0, 1] for ``output_type="pt"``, the raw sample in [−1, 1] for ``"latent"``."""

    images: torch.Tensor


def weight_files(name: str, directory: str | Path = WEIGHTS_DIR) -> dict[str, Path]:
    """Paths of a saved toy model's files: ``config`` (JSON), ``transformer`` and ``text_encoder`` (safetensors)."""
    directory = Path(directory)
    return {
        "config": directory / f"{name}.json",
        "transformer": directory / f"{name}.transformer.safetensors",
        "text_encoder": directory / f"{name}.text_encoder.safetensors",
    }


def _noise(shape: tuple[int, ...], generator: Any) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise BlockpruneError(f"got {len(generator)} generators for {shape[0]} images; pass one per image or a single one")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device).cpu()


class ToyPipeline:
    """A toy text-to-image pipeline: ``.transformer`` (a diffusers model), ``.text_encoder`` and ``.config``."""

    def __init__(self, transformer: nn.Module, text_encoder: ToyTextEncoder, config: ToyConfig) -> None:
        self.transformer, self.text_encoder, self.config = transformer, text_encoder, config
        self.metadata: dict[str, Any] = {}  # what the weights' JSON says about training, when loaded

    @classmethod
    def from_config(cls, config: ToyConfig, seed: int = 0) -> ToyPipeline:
        """A pipeline with freshly initialised (seeded random) weights."""
        torch.manual_seed(seed)
        return cls(build_transformer(config).eval(), build_text_encoder(config).eval(), config)

    @property
    def device(self) -> torch.device:
        """Where the transformer's weights are."""
        return model_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's floating-point type."""
        return next(self.transformer.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ToyPipeline:
        """Move both models (in place); returns the pipeline."""
        if dtype == self.dtype:  # diffusers warns on every dtype cast, even to the dtype it already has
            dtype = None
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.transformer.to(**moves)
        self.text_encoder.to(**moves)
        return self

    def encode_tokens(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states ``(B, words, width)`` and pooled vectors ``(B, width)`` in the transformer's dtype."""
        states, pooled = self.text_encoder(token_ids.to(self.device))
        return states.to(self.dtype), pooled.to(self.dtype)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_tokens` of the prompts' word ids."""
        return self.encode_tokens(self.text_encoder.tokenize(prompts))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
    ) -> ToyPipelineOutput:
        """Sample images for ``prompt`` with ``num_inference_steps`` Euler steps from t = 1 (noise) to 0.

        ``guidance_scale`` > 1 applies classifier-free guidance against the empty prompt (both halves in one
        transformer call). Defaults come from the model's config. Noise is drawn on the generator's device
        (one generator per image is accepted, as in diffusers), so results do not depend on batching.
        ``height`` and ``width`` are accepted as in diffusers, but a toy model draws only its own image size.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if output_type not in OUTPUT_TYPES:
            raise BlockpruneError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(steps, int) or steps < 1:
            raise BlockpruneError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if not prompts:
            raise BlockpruneError("prompt is empty: pass a string or a non-empty list of strings")
        size = self.config.image_size
        if any(side not in (None, size) for side in (height, width)):
            raise BlockpruneError(f"this toy model draws {size} × {size} images only, got height={height!r}, "
                                  f"width={width!r}; leave them out or pass {size}")
        noise = _noise((len(prompts), 3, size, size), generator).to(self.device, self.dtype)
        x = self.sample(noise, prompts, steps, scale)
        images = x if output_type == "latent" else ((x.float().clamp(-1, 1) + 1) / 2)
        return ToyPipelineOutput(images=images)

    def sample(self, noise: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float) -> torch.Tensor:
        """The images (unclamped; a call clamps them to [-1, 1]) that ``steps`` Euler steps from t = 1 reach from
        ``noise``, one prompt per image, guided against the empty prompt when ``guidance_scale`` is not 1. Unlike a
        call, it keeps the autograd graph when gradients are enabled, so a loss on the images trains the transformer
        through every step."""
        x = noise
        states, pooled = self.encode_prompt(prompts)
        guided = guidance_scale != 1.0
        if guided:
            empty_states, empty_pooled = self.encode_tokens(self.text_encoder.empty_tokens(len(prompts)))
            states, pooled = torch.cat([states, empty_states]), torch.cat([pooled, empty_pooled])
        times = torch.linspace(1.0, 0.0, steps + 1)
        for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
            model_input = torch.cat([x, x]) if guided else x
            t_batch = torch.full((len(model_input),), t, device=self.device, dtype=self.dtype)
            v = velocity(self.transformer, self.config, model_input, t_batch, states, pooled)
            if guided:
                conditional, unconditional = v.chunk(2)
                v = unconditional + guidance_scale * (conditional - unconditional)
            x = x + (t_next - t) * v
        return x

    def save_pretrained(self, directory: str | Path, name: str, metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
        """Write ``{name}.json`` (config and ``metadata``) and both models as safetensors in ``dtype``."""
        if hasattr(self.transformer, PLAN_ATTRIBUTE):
            raise BlockpruneError(
                "this pipeline's transformer is compressed; save it with blockprune.save_pretrained(pipe, folder) and "
                "load it back with pipe.transformer = blockprune.from_pretrained(folder)"
            )
        files = weight_files(name, directory)
        files["config"].parent.mkdir(parents=True, exist_ok=True)
        for part in ("transformer", "text_encoder"):
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in getattr(self, part).state_dict().items()}
            save_safetensors(state, files[part])
        data = {"config": self.config.to_dict(), "dtype": str(dtype).removeprefix("torch."), "metadata": metadata or {}}
        files["config"].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        return files

    @classmethod
    def from_pretrained(cls, name: str, directory: str | Path = WEIGHTS_DIR, dtype: torch.dtype = torch.float32) -> ToyPipeline:
        """Load the toy model ``name`` (e.g. ``"flux-small"``) from ``directory`` (default: the bundled weights)."""
        files = weight_files(name, directory)
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise BlockpruneError(
                f"toy model {name!r} is missing {', '.join(missing)}; train it with "
                f"`python benchmarks/train_small_models.py` or pass the folder that holds its files"
            )
        data = json.loads(files["config"].read_text(encoding="utf-8"))
        config = ToyConfig.from_dict(data["config"])
        pipe = cls(build_transformer(config), build_text_encoder(config), config)
        for part in ("transformer", "text_encoder"):
            getattr(pipe, part).load_state_dict(load_file(files[part]))
        pipe.metadata = data.get("metadata", {})
        pipe.transformer.eval()
        pipe.text_encoder.eval()
        return pipe.to(dtype=dtype)


def calibration_batches(pipe: ToyPipeline, count: int, seed: int = 0, batch_size: int = 4,
                        unconditional: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """``count`` transformer input batches (on CPU) at uniform random times: noised training images with their captions.

    ``unconditional`` is the share of samples whose caption is replaced by the empty prompt, as the unconditional
    half of classifier-free guidance feeds the transformer when calibration is recorded from a sampler using it.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            batch = sample_batch(batch_size, "train", generator=generator)
            noise = torch.randn(batch.images.shape, generator=generator)
            t = torch.rand(batch_size, generator=generator)
            x_t = (1 - t.view(-1, 1, 1, 1)) * (batch.images * 2 - 1) + t.view(-1, 1, 1, 1) * noise
            tokens = batch.tokens
            if unconditional > 0:  # drawn only then, so that calibration without it stays as it was
                dropped = torch.rand(batch_size, generator=generator) < unconditional
                empty = pipe.text_encoder.empty_tokens(batch_size).to(tokens.device)
                tokens = torch.where(dropped[:, None], empty, tokens)
            states, pooled = pipe.encode_tokens(tokens)
            inputs = transformer_inputs(pipe.transformer, pipe.config, x_t.to(pipe.device, pipe.dtype), t.to(pipe.device, pipe.dtype), states, pooled)
            batches.append({k: v.cpu() for k, v in inputs.items()})
    return batches
