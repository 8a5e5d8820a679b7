"""The FLUX and SD3 examples, run as scripts in --tiny mode (CPU, no downloads)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockprune
from blockprune.toy import vocabulary
from blockprune.toy.grid import LABEL_WIDTH

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script, *argv, cwd):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    ("script", "extra", "blocks", "replaced"),
    [("flux/compress_flux.py", ["--model", "flux-random", "--no-sandwich", "--importance", "fit_residual"], 20, 2),
     ("sd3/compress_sd3.py", ["--sandwich-steps", 3, "--heal-steps", 0], 6, 1)],
    ids=["flux-least-squares", "sd3-sandwich"],
)  # fit_residual: this checks the example's own work; importance="auto" (compress's default) runs in test_demo
def test_tiny_mode_compresses_saves_and_reports(tmp_path, script, extra, blocks, replaced):
    result = run_example(script, "--tiny", *extra, "--output", tmp_path / "out", "--calibration-batches", 5, "--ratio", 0.1,
                         "--latency-repeats", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"blockprune plan: {replaced} of {blocks} blocks replaced" in out
    assert "latency ratio ×" in out and "transformer forward (cpu, torch.float32, on " in out
    assert "median ± half the interquartile range of 2 runs after 2 warm-up" in out  # honest: spread and warm-up
    assert "image grid skipped:" in out and "cannot generate images" in out
    error = float(out.split("relative output error on a held-out transformer input: ")[1].split()[0])
    assert 0 < error < 0.1
    sandwich = "--no-sandwich" not in extra
    assert ("sandwich training (held-out batches)" in out) == sandwich
    files = ["blockprune.json", "config.json", "model.safetensors", *(["stages.safetensors"] if sandwich else [])]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files
    plan = blockprune.plan(blockprune.from_pretrained(tmp_path / "out"))
    assert len(plan.replaced) == replaced and len(plan.stages) == (replaced if sandwich else 0)
    assert not plan.heal  # --heal-steps 0 (sd3) or --no-sandwich (flux)


def test_tiny_flux_draws_the_trained_toy_model_on_prompts_it_can_draw(tmp_path):
    result = run_example("flux/compress_flux.py", "--tiny", "--no-sandwich", "--importance", "fit_residual",
                         "--output", tmp_path / "out",
                         "--calibration-batches", 4, "--ratio", 0.1, "--grid-prompts", 2, "--seeds", 0, "--steps", 4,
                         "--latency-repeats", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "blockprune plan: 2 of 20 blocks replaced (flux)" in out and "image grid:" in out
    prompts = out.split("grid prompts: ")[1].splitlines()[0].split(" | ")
    assert len(prompts) == 2 and all(word in vocabulary() for prompt in prompts for word in prompt.split())
    assert (tmp_path / "out" / "grid.png").is_file()


def test_full_mode_without_local_weights_says_how_to_get_them(tmp_path):
    result = run_example("sd3/compress_sd3.py", "--model-path", tmp_path / "absent", "--output", tmp_path / "out",
                         cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load StableDiffusion3Pipeline") and "or use --tiny" in last
    assert not (tmp_path / "out").exists()


def test_tiny_flux_with_an_unknown_small_model(tmp_path):
    result = run_example("flux/compress_flux.py", "--tiny", "--model", "flux-huge", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown small model 'flux-huge'" in result.stderr


def test_with_a_pipeline_the_example_draws_the_grid_and_times_generations(tmp_path, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import shared
    finally:
        sys.path.remove(str(EXAMPLES))
    from PIL import Image
    from test_pipeline import tiny_dit_pipeline

    def build(args):
        pipe = tiny_dit_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return shared.Setup(pipe, None, None, "a tiny DiT pipeline")

    family = shared.Family("DiT", "dit", "DiTPipeline", "facebook/DiT-XL-2-256", build, "a tiny DiT pipeline")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue car\na green tree\n")
    argv = ["--tiny", "--output", str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.txt"), "--ratio", "0.25",
            "--no-sandwich",
            "--seeds", "0", "1", "--grid-prompts", "2", "--steps", "2", "--calibration-steps", "2", "--latency-repeats", "1"]
    threads = torch.get_num_threads()
    try:
        assert shared.run_example(family, shared.parser_for(family), argv) == 0
    finally:
        torch.set_num_threads(threads)  # --tiny sets one thread for the process
    out = capsys.readouterr().out
    assert "blockprune plan: 1 of 4 blocks replaced (dit)" in out
    assert "image grid:" in out and "2 prompts × 2 seeds" in out
    assert "generation:" in out and "ratio" in out
    grid = Image.open(tmp_path / "out" / "grid.png")
    # 2 prompts × 2 seeds across, original and compressed rows, 8×8 images upscaled 16×, labels left and above
    assert grid.size[0] == LABEL_WIDTH + 4 * (8 * 16 + 2) and grid.size[1] > 2 * (8 * 16 + 2)
    assert len(blockprune.plan(blockprune.from_pretrained(tmp_path / "out")).replaced) == 1
