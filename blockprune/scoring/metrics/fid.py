"""The ``fid`` metric: Fréchet distance between image features of the ablated and the intact model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...discovery.spec import Block
from ...errors import BlockpruneError
from ...hookspecs import hookimpl
from ...runtime.fingerprint import value_fingerprint
from ..base import Metric, ScoringContext
from .generation import generated_images, generation_settings

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`` in float64.

    The square root is taken of a symmetric positive semi-definite matrix through its eigenvalues
    (negative rounding noise clipped to zero), so singular covariances (fewer images than features) are safe.
    """
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = ((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_root
    return max(float(value), 0.0)


def feature_statistics(extractor: nn.Module, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of ``extractor``'s features of ``images``; the features must be 2-D."""
    parameter = next(extractor.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            output = extractor(images[start : start + batch_size].to(device))
            if not isinstance(output, torch.Tensor) or output.ndim != 2:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise BlockpruneError(
                    f"the feature extractor returned {shape}; it must return a 2-D batch of vectors "
                    f"(images, features), e.g. end it with nn.Flatten()"
                )
            features.append(output.to(torch.float64).cpu())
    stacked = torch.cat(features)
    centred = stacked - stacked.mean(0)
    covariance = centred.T @ centred / max(len(stacked) - 1, 1)
    return stacked.mean(0), covariance


class _TorchvisionInception(nn.Module):
    """torchvision's Inception-v3 pool features (2048-d) from [0, 1] images of any size."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.fc = nn.Identity()
        self.net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((images - self.mean) / self.std)


def default_feature_extractor() -> nn.Module:
    """torchvision's Inception-v3 with weights from the local torch hub cache; never downloads."""
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    try:
        import torchvision  # noqa: F401
    except ImportError:
        weights = None
    if weights is None or not weights.is_file():
        raise BlockpruneError(
            f"the fid metric needs a feature extractor: pass metric_options={{'feature_extractor': module}} (any "
            f"nn.Module from images to vectors), or install torchvision and put {INCEPTION_FILE} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}"
        )
    return _TorchvisionInception(weights)


class FID(Metric):
    """Fréchet distance between features of the ablated model's images and the intact model's (same prompts and seeds)."""

    name = "fid"
    higher_is_better = False
    cost = "generation"

    def _extractor(self, context: ScoringContext) -> nn.Module:
        extractor = context.options.get("feature_extractor")
        if extractor is None:
            extractor = context.options["feature_extractor"] = default_feature_extractor()
        if not isinstance(extractor, nn.Module):
            raise BlockpruneError(f"feature_extractor must be a torch.nn.Module, got {type(extractor).__name__}")
        return extractor

    def prepare(self, context: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature statistics of the intact model's images."""
        return feature_statistics(self._extractor(context), generated_images(context))

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        mu, sigma = feature_statistics(self._extractor(context), generated_images(context))
        return frechet_distance(state[0], state[1], mu, sigma)

    def settings(self, context: ScoringContext) -> dict[str, Any]:
        return {**generation_settings(context), "extractor": value_fingerprint(self._extractor(context))}


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(FID())
