"""fid and clip on a tiny DiT pipeline, with the project's own pluggable extractor and scorer."""

import pytest
import torch
from test_pipeline import tiny_dit_pipeline
from torch import nn

import blockprune
from blockprune.errors import BlockpruneError


class TinyExtractor(nn.Module):
    def __init__(self, flatten=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.flatten = flatten

    def forward(self, images):
        features = self.conv(images)
        return features.flatten(1) if self.flatten else features


def brightness_scorer(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 100


OPTIONS = {"generation_prompts": ["a red fox", "a lighthouse"], "generation_seeds": [0, 1], "generation_steps": 2}


def _pipe():
    pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _skip(hidden_states, *args, **kwargs):
    return hidden_states


def _frechet_by_gram(reference, features):
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½, the last term as the nuclear norm of A₁ A₂ᵀ / (n − 1)."""
    reference, features = reference.double(), features.double()
    n = len(reference)
    a1, a2 = reference - reference.mean(0), features - features.mean(0)
    cross = torch.linalg.matrix_norm(a1 @ a2.T, ord="nuc")
    return float(((reference.mean(0) - features.mean(0)) ** 2).sum()
                 + ((a1**2).sum() + (a2**2).sum() - 2 * cross) / (n - 1))


def test_fid_and_clip_score_every_block_from_generated_images():
    pipe = _pipe()
    table = blockprune.importance(pipe, adapter="dit", importance={"fid": 0.5, "clip": 0.5}, progress=False,
                                  calibration_prompts=["a red fox"], calibration_steps=2, cache_dir=False,
                                  metric_options={**OPTIONS, "feature_extractor": TinyExtractor(),
                                                  "clip_scorer": brightness_scorer})
    names = [f"transformer_blocks.{i}" for i in range(4)]
    assert list(table.values["fid"]) == list(table.values["clip"]) == names

    from blockprune import plugins

    generate = plugins.adapters()["dit"].generate
    prompts, seeds, steps = OPTIONS["generation_prompts"], OPTIONS["generation_seeds"], OPTIONS["generation_steps"]
    extractor = TinyExtractor()
    with torch.no_grad():
        intact = extractor(generate(pipe, prompts, seeds, steps))
    fid, clip = {}, {}
    for index, name in enumerate(names):
        block = pipe.transformer.transformer_blocks[index]
        block.forward = _skip
        try:
            images = generate(pipe, prompts, seeds, steps)
        finally:
            del block.forward
        with torch.no_grad():
            fid[name] = _frechet_by_gram(intact, extractor(images))
        clip[name] = float(images.double().mean() * 100)
    assert table.values["fid"] == pytest.approx(fid, rel=1e-4)
    assert table.values["clip"] == pytest.approx(clip, rel=1e-5)
    assert min(fid.values()) > 0

    def quality(column, higher_is_better):
        low, high = min(column.values()), max(column.values())
        return {b: (v - low) / (high - low) if higher_is_better else (high - v) / (high - low) for b, v in column.items()}

    fid_quality, clip_quality = quality(fid, False), quality(clip, True)
    expected = {b: -(0.5 * fid_quality[b] + 0.5 * clip_quality[b]) for b in names}
    assert table.scores == pytest.approx(expected, abs=1e-4)
    assert table.order == sorted(names, key=expected.get)


def test_feature_extractor_must_return_vectors():
    with pytest.raises(BlockpruneError, match=r"feature extractor returned \(4, 4, 8, 8\); it must return a 2-D batch"):
        blockprune.importance(_pipe(), adapter="dit", importance="fid", progress=False, calibration_prompts=["a"],
                              calibration_steps=2, cache_dir=False,
                              metric_options={**OPTIONS, "feature_extractor": TinyExtractor(flatten=False)})


def test_clip_scorer_must_return_one_score_per_image():
    with pytest.raises(BlockpruneError, match=r"clip scorer returned shape \(1,\); expected one score per image \(4\)"):
        blockprune.importance(_pipe(), adapter="dit", importance="clip", progress=False, calibration_prompts=["a"],
                              calibration_steps=2, cache_dir=False,
                              metric_options={**OPTIONS, "clip_scorer": lambda images, prompts: torch.ones(1)})


@pytest.mark.parametrize("adapter, make", [("dit", _pipe), ("flux", None)])
def test_batched_generation_gives_the_images_of_one_call_per_image(adapter, make):
    from test_toy_pipeline import tiny_toy_pipeline

    from blockprune import plugins

    pipe = make() if make else tiny_toy_pipeline("flux")
    generate = plugins.adapters()[adapter].generate
    one_by_one = generate(pipe, ["a red fox", "a lighthouse"], [0, 1, 2], 2)
    batched = generate(pipe, ["a red fox", "a lighthouse"], [0, 1, 2], 2, batch_size=4)  # chunks of 4 and 2
    assert one_by_one.shape[0] == 6
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    with pytest.raises(BlockpruneError, match="generation_batch_size must be a positive integer, got 0"):
        generate(pipe, ["a red fox"], [0], 2, batch_size=0)
