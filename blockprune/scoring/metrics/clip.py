"""The ``clip`` metric: image-text alignment of the ablated model's images."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...discovery.spec import Block
from ...errors import BlockpruneError
from ...hookspecs import hookimpl
from ...runtime.fingerprint import value_fingerprint
from ..base import Metric, ScoringContext
from .generation import generated_images, generation_settings, prompts_per_image

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


class TransformersCLIPScorer:
    """CLIP score ``100 · max(cos(image, text), 0)`` with a transformers CLIP model from a local folder."""

    def __init__(self, path: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.path = path

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, do_rescale=False)
        with torch.no_grad():
            output = self.model(**inputs)
        image, text = output.image_embeds, output.text_embeds
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return 100 * cosine.clamp(min=0)

    def __repr__(self) -> str:
        return f"TransformersCLIPScorer({self.path!r})"


class CLIPScore(Metric):
    """Mean alignment score between each generated image and its prompt (higher is better)."""

    name = "clip"
    higher_is_better = True
    cost = "generation"

    def _scorer(self, context: ScoringContext) -> Scorer:
        scorer = context.options.get("clip_scorer")
        if scorer is None:
            path = context.options.get("clip_model_path")
            if path is None:
                raise BlockpruneError(
                    "the clip metric needs a scorer: pass metric_options={'clip_model_path': '<local CLIP folder>'} "
                    "(a transformers CLIPModel), or {'clip_scorer': fn} with fn(images, prompts) -> scores"
                )
            scorer = context.options["clip_scorer"] = TransformersCLIPScorer(path)
        if not callable(scorer):
            raise BlockpruneError(f"clip_scorer must be callable as scorer(images, prompts), got {type(scorer).__name__}")
        return scorer

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        prompts = prompts_per_image(context)
        scores = torch.as_tensor(self._scorer(context)(generated_images(context), prompts))
        if scores.shape != (len(prompts),):
            raise BlockpruneError(f"the clip scorer returned shape {tuple(scores.shape)}; expected one score per image ({len(prompts)})")
        return float(scores.double().mean())

    def settings(self, context: ScoringContext) -> dict[str, Any]:
        return {**generation_settings(context), "scorer": value_fingerprint(self._scorer(context))}


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(CLIPScore())
