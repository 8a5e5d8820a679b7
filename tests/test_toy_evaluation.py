"""The quality suite on known cases: PSNR, SSIM, attribute accuracy and the checker Fréchet distance."""

import math

import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.toy import (
    attribute_accuracy,
    checker_frechet_distance,
    dataset_images,
    evaluation_prompts,
    psnr,
    sample_batch,
    ssim,
    teacher_fidelity,
)
from blockprune.toy.evaluation import MAX_PSNR, SSIM_C1


def test_psnr_known_values():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.allclose(psnr(images, images + 0.1), torch.full((3,), 20.0))  # MSE 0.01 → 20 dB
    assert torch.allclose(psnr(images, images + 0.01), torch.full((3,), 40.0))
    assert torch.equal(psnr(images, images), torch.full((3,), MAX_PSNR))


def test_ssim_known_values():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(images, images), torch.ones(2))
    a, b = 0.3, 0.7  # constant images: no structure, only the luminance term (2ab + C1) / (a² + b² + C1)
    expected = (2 * a * b + SSIM_C1) / (a * a + b * b + SSIM_C1)
    assert ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)).item() == pytest.approx(expected, rel=1e-5)
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(ssim(images, noisy), ssim(noisy, images)) and (ssim(images, noisy) < 0.9).all()
    assert ssim(images, 1 - images).mean() < 0  # inverted structure correlates negatively
    fidelity = teacher_fidelity(noisy, images)
    assert fidelity["ssim"] == pytest.approx(float(ssim(noisy, images).mean())) and 10 < fidelity["psnr"] < 20


def test_comparisons_need_equal_shapes():
    with pytest.raises(BlockpruneError, match=r"got \(1, 3, 16, 16\) and \(2, 3, 16, 16\)"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(2, 3, 16, 16))
    with pytest.raises(BlockpruneError, match="ssim needs images of at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_attribute_accuracy_of_dataset_images_and_of_wrong_prompts():
    prompts = evaluation_prompts(64, seed=3)
    images = dataset_images(prompts, seed=1)
    scores = attribute_accuracy(images, prompts)
    assert scores == {"accuracy": 1.0, "count": 1.0, "colour": 1.0, "kind": 1.0, "relation": 1.0}
    shuffled = prompts[1:] + prompts[:1]
    assert attribute_accuracy(images, shuffled)["accuracy"] < 0.2
    singles = ["a red circle", "a blue square"]
    assert math.isnan(attribute_accuracy(dataset_images(singles), singles)["relation"])  # no pair prompts
    with pytest.raises(BlockpruneError, match="'a red fox' is not a caption"):
        attribute_accuracy(images[:1], ["a red fox"])
    with pytest.raises(BlockpruneError, match="got 64 images for 1 prompts"):
        attribute_accuracy(images, ["a red circle"])


def test_checker_frechet_distance_is_small_between_dataset_draws_and_large_for_blank_images():
    first, second = sample_batch(256, seed=1).images, sample_batch(256, seed=2).images
    same = checker_frechet_distance(first, first)
    between = checker_frechet_distance(first, second)
    blank = checker_frechet_distance(first, torch.full_like(first, 0.95))
    assert same == pytest.approx(0.0, abs=1e-6) and between < 0.2 * blank
