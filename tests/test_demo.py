"""The README's main job: the embedded default compressed, saved and reloaded."""

import pytest
from PIL import Image

from blockprune import plan
from blockprune.cli import build_parser, main
from blockprune.errors import BlockpruneError
from blockprune.serialization import from_pretrained
from blockprune.toy.demo import demo, flux_batches, tiny_flux
from blockprune.toy.grid import LABEL_WIDTH


def test_demo_compresses_the_trained_model_and_writes_a_grid(tmp_path, capsys):
    # healing and the sandwich's default length: tests of their own
    result = demo(ratio=0.1, output=tmp_path / "out", num_prompts=8, heal_steps=0, sandwich_steps=100)
    out = capsys.readouterr().out
    assert "blockprune plan: 2 of 20 blocks replaced (flux)" in out
    assert "attribute accuracy" in out and "PSNR" in out
    assert result["accuracy_before"] >= 0.8 and 0 <= result["accuracy_after"] <= 1
    assert 10 < result["psnr"] < 60 and 0 < result["ssim"] < 1  # changed, not destroyed
    assert 0.85 < result["flops_ratio"] < 0.95
    assert "generating images (original): done, 8/8" in out  # progress, logged as lines off a terminal
    assert "median ± half the interquartile range of 15 runs in turns after 3 warm-up" in out  # honest latency
    low, high = result["latency_range"]
    assert low <= result["latency_ratio"] <= high and result["latency_within_noise"] == (low <= 1 <= high)
    with Image.open(tmp_path / "out" / "grid.png") as grid:  # labelled: prompts above, rows on the left
        assert grid.size[0] == LABEL_WIDTH + 8 * (32 * 4 + 2)  # eight 32-pixel images upscaled 4×
        assert grid.size[1] > 2 * (32 * 4 + 2)  # two rows below a header of prompts
    loaded = from_pretrained(tmp_path / "out" / "transformer")
    assert len(plan(loaded).replaced) == 2 and not plan(loaded).heal  # heal_steps=0 reached compress
    assert plan(loaded).config["sandwich"]["steps"] == 100  # and sandwich_steps


def test_demo_command_line_takes_the_healing_and_sandwich_steps():
    parser = build_parser(["demo"])
    assert parser.parse_args(["demo"]).heal_steps == 0  # compress's default: no healing
    assert parser.parse_args(["demo", "--heal-steps", "0"]).heal_steps == 0
    assert parser.parse_args(["demo"]).sandwich_steps is None  # compress's default
    assert parser.parse_args(["demo", "--sandwich-steps", "100"]).sandwich_steps == 100


def test_demo_command_line_refuses_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert main(["demo", "--output", str(tmp_path / "used")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_demo_model_shape():
    model = tiny_flux()
    assert len(model.transformer_blocks) == 6 and len(model.single_transformer_blocks) == 14
    batch = flux_batches(model, 1)[0]
    assert model(**batch).sample.shape == batch["hidden_states"].shape


def test_demo_needs_at_least_one_prompt(tmp_path):
    with pytest.raises(BlockpruneError, match="num_prompts must be a positive integer"):
        demo(output=tmp_path / "none", num_prompts=0)
