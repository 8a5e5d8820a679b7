"""The toy quality suite as importance metrics through the metrics hook."""

import math

import pytest
from test_toy_pipeline import tiny_toy_pipeline

import blockprune
from blockprune import plugins
from blockprune.errors import BlockpruneError
from blockprune.toy import evaluation_prompts

TOY_METRICS = {"toy_fidelity", "toy_accuracy", "toy_frechet"}


def test_toy_metrics_are_registered_by_their_entry_point_plugin():
    assert TOY_METRICS <= set(plugins.metrics())
    assert set(plugins.plugin_contents()["blockprune.toy.metrics"]["metrics"]) == TOY_METRICS


def test_toy_metrics_score_every_block_from_generated_images():
    pipe = tiny_toy_pipeline("flux")
    options = {"generation_prompts": evaluation_prompts(4, seed=1), "generation_seeds": [0], "generation_steps": 2}
    table = blockprune.importance(pipe, importance=sorted(TOY_METRICS), progress=False, cache_dir=False,
                                  calibration_prompts=evaluation_prompts(2), calibration_steps=2, metric_options=options)
    blocks = {f"transformer_blocks.{i}" for i in range(2)} | {f"single_transformer_blocks.{i}" for i in range(2)}
    for name in TOY_METRICS:
        assert set(table.values[name]) == blocks
    assert all(0 < v < 100 for v in table.values["toy_fidelity"].values())  # every ablation changes the images
    assert all(0 <= v <= 1 for v in table.values["toy_accuracy"].values())
    assert all(v > 0 and math.isfinite(v) for v in table.values["toy_frechet"].values())


def test_toy_accuracy_needs_toy_captions_as_prompts():
    with pytest.raises(BlockpruneError, match="reads prompts as toy shapes captions, but .* is not one; pass metric_options"):
        blockprune.importance(tiny_toy_pipeline("sd3"), importance="toy_accuracy", progress=False, cache_dir=False,
                              calibration_prompts=["a red circle"], calibration_steps=2)
