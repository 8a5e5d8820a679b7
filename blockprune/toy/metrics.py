"""The toy quality suite as importance metrics: ``toy_fidelity``, ``toy_accuracy`` and ``toy_frechet``.

All three score the images the model makes with a block ablated (generation metrics, sharing one set of
images per block with ``fid`` and ``clip``). ``toy_accuracy`` and ``toy_frechet`` read the prompts as
toy shapes captions, so pass them, e.g.
``metric_options={"generation_prompts": blockprune.toy.evaluation_prompts(16)}``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..discovery.spec import Block
from ..errors import BlockpruneError
from ..hookspecs import hookimpl
from ..scoring.base import Metric, ScoringContext
from ..scoring.metrics.fid import feature_statistics, frechet_distance
from ..scoring.metrics.generation import (
    generated_images,
    generation_settings,
    prompts_per_image,
)
from .captions import caption_id
from .evaluation import CheckerFeatures, attribute_accuracy, dataset_images, psnr


def _toy_prompts(context: ScoringContext, metric: str) -> list[str]:
    prompts = prompts_per_image(context)
    unknown = sorted({p for p in prompts if caption_id(p) is None})
    if unknown:
        raise BlockpruneError(
            f"the {metric} metric reads prompts as toy shapes captions, but {unknown[0]!r} is not one; pass "
            f"metric_options={{'generation_prompts': blockprune.toy.evaluation_prompts(16)}}"
        )
    return prompts


class _GenerationMetric(Metric):
    """A metric of generated images, whose value depends on the generation settings."""

    cost = "generation"

    def settings(self, context: ScoringContext) -> dict[str, Any]:
        return generation_settings(context)


class ToyFidelity(_GenerationMetric):
    """Mean PSNR (dB) of the ablated model's images against the intact model's, same prompts and noise."""

    name = "toy_fidelity"
    higher_is_better = True

    def prepare(self, context: ScoringContext) -> torch.Tensor:
        """The intact model's images."""
        return generated_images(context)

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        return float(psnr(generated_images(context), state).mean())


class ToyAccuracy(_GenerationMetric):
    """Attribute accuracy of the ablated model's images: the share that show their caption entirely."""

    name = "toy_accuracy"
    higher_is_better = True

    def prepare(self, context: ScoringContext) -> None:
        _toy_prompts(context, self.name)  # fail before any generation

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        return attribute_accuracy(generated_images(context), _toy_prompts(context, self.name))["accuracy"]


class ToyFrechet(_GenerationMetric):
    """Fréchet distance between checker features of the ablated model's images and of dataset images of the same captions."""

    name = "toy_frechet"
    higher_is_better = False

    def prepare(self, context: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature statistics of dataset images of the prompts (layouts seeded 0)."""
        return feature_statistics(CheckerFeatures(), dataset_images(_toy_prompts(context, self.name)))

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        mu, sigma = feature_statistics(CheckerFeatures(), generated_images(context))
        return frechet_distance(state[0], state[1], mu, sigma)


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(ToyFidelity())
    register(ToyAccuracy())
    register(ToyFrechet())
