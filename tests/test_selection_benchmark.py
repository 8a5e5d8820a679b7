"""benchmarks/selection.py --auto-blocks-from: the auto rows take the blocks of an earlier least-squares auto row."""

import argparse
import json

import pytest
from conftest import benchmark_script

from blockprune.errors import BlockpruneError


def test_auto_blocks_from_reads_the_least_squares_auto_row_of_the_same_model_seed_and_ratio(tmp_path):
    chosen_before = benchmark_script("selection").chosen_before
    row = {"label": "auto", "sandwich": False, "ratio": 0.3, "blocks": ["single_transformer_blocks.37"]}
    saved = tmp_path / "selection.json"
    saved.write_text(json.dumps({"model": "flux-deep", "seed": 1, "rows": [
        {**row, "sandwich": True, "blocks": ["single_transformer_blocks.0"]}, row]}))
    args = argparse.Namespace(model="flux-deep", seed=1)
    assert chosen_before(saved, args, 0.3) == ["single_transformer_blocks.37"]  # not the sandwich row
    with pytest.raises(BlockpruneError, match="has no least-squares auto row at ratio 0.1"):
        chosen_before(saved, args, 0.1)
    with pytest.raises(BlockpruneError, match="is flux-deep seed 1, not flux-deep seed 2"):
        chosen_before(saved, argparse.Namespace(model="flux-deep", seed=2), 0.3)
