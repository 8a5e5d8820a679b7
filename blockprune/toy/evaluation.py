"""The toy models' quality suite: teacher fidelity, attribute accuracy and a Fréchet distance on checker features.

- teacher fidelity: PSNR and SSIM of a (pruned) model's images against the unpruned model's from the
  same noise and prompts;
- attribute accuracy (a small GenEval): the checker reads each image and judges shape count, colours,
  kinds and, for pairs, the spatial relation against the prompt;
- Fréchet distance between the checker's feature vectors of generated images and of dataset images
  of the same prompts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BlockpruneError
from ..scoring.metrics.fid import feature_statistics, frechet_distance
from .captions import all_captions, parse_caption, require_caption_id
from .checker import detect, image_features, judge
from .dataset import batch_for_captions, sample_caption_ids

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # for data range 1
MAX_PSNR = 100.0  # dB, for identical images


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (dB) for images in [0, 1]; identical images give ``MAX_PSNR``."""
    _check_pair(images, reference)
    mse = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=10 ** (-MAX_PSNR / 10)))).float()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: 11 × 11 Gaussian window, σ 1.5, valid region,
    mean over channels) for images in [0, 1]."""
    _check_pair(images, reference)
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise BlockpruneError(f"ssim needs images of at least {SSIM_WINDOW} × {SSIM_WINDOW} pixels, got {tuple(images.shape[-2:])}")
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    line = torch.exp(-((torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2) ** 2) / (2 * SSIM_SIGMA**2))
    window = (line[:, None] * line[None, :] / line.sum() ** 2).expand(channels, 1, -1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return value.flatten(1).mean(1).float()


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape or images.ndim != 4:
        raise BlockpruneError(
            f"compare two image batches of one shape (N, C, H, W); got {tuple(images.shape)} and {tuple(reference.shape)}"
        )


def teacher_fidelity(images: torch.Tensor, teacher_images: torch.Tensor) -> dict[str, float]:
    """Mean PSNR and SSIM of ``images`` against the teacher's images of the same noise and prompts."""
    return {"psnr": float(psnr(images, teacher_images).mean()), "ssim": float(ssim(images, teacher_images).mean())}


def generate(pipe: Any, prompts: list[str], seeds: list[int], num_inference_steps: int | None = None,
             guidance_scale: float | None = None, batch_size: int = 256) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] on CPU, image ``i`` from ``prompts[i]`` and noise seeded ``seeds[i]``.

    The same prompt and seed give the same noise whatever the batching (one generator per image), so two
    pipelines called with the same lists can be compared image by image.
    """
    if len(prompts) != len(seeds):
        raise BlockpruneError(f"generate pairs prompts with seeds: got {len(prompts)} prompts and {len(seeds)} seeds")
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        output = pipe(prompt=prompts[chunk], num_inference_steps=num_inference_steps, generator=generators,
                      output_type="pt", guidance_scale=guidance_scale)
        images.append(output.images.float().cpu())
    return torch.cat(images)


def evaluation_prompts(count: int, split: str = "train", seed: int = 0) -> list[str]:
    """``count`` captions drawn as the dataset draws them (layout mix included) from ``split``."""
    ids = sample_caption_ids(count, split, torch.Generator().manual_seed(seed))
    captions = all_captions()
    return [captions[i].text for i in ids.tolist()]


def attribute_accuracy(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Share of images that show their prompt entirely (``accuracy``), and per attribute: ``count``, ``colour``,
    ``kind`` and ``relation`` (over pair prompts only; NaN when there are none)."""
    if len(images) != len(prompts):
        raise BlockpruneError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")
    captions = [parse_caption(p) for p in prompts]
    judgements = [judge(shapes, caption) for shapes, caption in zip(detect(images), captions)]
    relations = [j.relation for j in judgements if j.relation is not None]
    share = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {
        "accuracy": share([j.correct for j in judgements]),
        "count": share([j.count for j in judgements]),
        "colour": share([j.colours for j in judgements]),
        "kind": share([j.kinds for j in judgements]),
        "relation": share(relations),
    }


class CheckerFeatures(nn.Module):
    """The checker's per-image feature vector as a feature extractor (for ``fid``'s ``feature_extractor`` too)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return image_features(images)


def dataset_images(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Dataset images of the given captions (fresh layouts, seeded), ``(N, 3, H, W)``."""
    ids = torch.tensor([require_caption_id(p) for p in prompts], dtype=torch.long)
    return batch_for_captions(ids, torch.Generator().manual_seed(seed)).images


def checker_frechet_distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the checker features of ``images`` and of ``reference`` images."""
    extractor = CheckerFeatures()
    mu1, sigma1 = feature_statistics(extractor, images, batch_size=1024)
    mu2, sigma2 = feature_statistics(extractor, reference, batch_size=1024)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def evaluate(pipe: Any, prompts: list[str], seeds: list[int], teacher_images: torch.Tensor | None = None,
             num_inference_steps: int | None = None, guidance_scale: float | None = None) -> dict[str, float]:
    """Attribute accuracy, Fréchet distance against dataset images of the same prompts and, given the
    teacher's images of the same prompts and seeds, teacher fidelity. Returns ``{name: value}``."""
    images = generate(pipe, prompts, seeds, num_inference_steps, guidance_scale)
    results = attribute_accuracy(images, prompts)
    results["frechet"] = checker_frechet_distance(images, dataset_images(prompts, seed=seeds[0] if seeds else 0))
    if teacher_images is not None:
        results.update(teacher_fidelity(images, teacher_images))
    return results
