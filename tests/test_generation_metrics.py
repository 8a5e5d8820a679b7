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


def test_fid_and_clip_score_every_block_from_generated_images():
    pipe = _pipe()
    table = blockprune.importance(pipe, adapter="dit", importance={"fid": 0.5, "clip": 0.5}, progress=False,
                                  calibration_prompts=["a red fox"], calibration_steps=2, cache_dir=False,
                                  metric_options={**OPTIONS, "feature_extractor": TinyExtractor(),
                                                  "clip_scorer": brightness_scorer})
    fid, clip = table.values["fid"], table.values["clip"]
    assert set(fid) == set(clip) == {f"transformer_blocks.{i}" for i in range(4)}
    assert all(v > 0 for v in fid.values())  # every ablation changes the images
    assert all(0 <= v <= 100 for v in clip.values())
    assert sorted(table.scores.values())[0] >= -1.0


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
