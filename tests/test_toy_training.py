"""The training script's CPU smoke mode: the loss drops, and the written weights load back."""

from pathlib import Path

import pytest
from conftest import benchmark_script
from test_toy_pipeline import tiny_toy_pipeline

from blockprune.errors import BlockpruneError
from blockprune.toy import ToyPipeline
from blockprune.toy.training import TrainingSettings, train


def _script():
    return benchmark_script("train_small_models")


def test_smoke_training_lowers_the_loss_and_writes_loadable_weights(tmp_path, capsys):
    rows = _script().main(["--smoke", "--models", "flux-small", "--max-steps", "30", "--output", str(tmp_path)])
    row = rows[0]
    losses = [loss for _, loss in row["losses"]]
    assert row["steps"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert 0 <= row["accuracy"]["accuracy"] <= 1 and row["guidance_scale"] in (1.0, 2.0)
    assert capsys.readouterr().out.strip().splitlines()[-2].split()[:2] == ["model", "params"]  # the table comes last
    loaded = ToyPipeline.from_pretrained("flux-small", tmp_path)
    assert loaded.config.guidance_scale == row["guidance_scale"] and loaded.metadata["steps"] == 30
    assert all(Path(f).stat().st_size < 1_000_000 for f in row["files"])


def test_training_needs_a_budget():
    with pytest.raises(BlockpruneError, match="give a training budget"):
        train(tiny_toy_pipeline(), TrainingSettings(minutes=0, max_steps=None))
