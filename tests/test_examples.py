"""The FLUX and SD3 examples, run as scripts in --tiny mode (CPU, no downloads)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blockprune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script, *argv, cwd):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    ("script", "extra", "blocks", "replaced"),
    [("flux/compress_flux.py", ["--model", "flux-random"], 20, 2), ("sd3/compress_sd3.py", [], 6, 1)],
    ids=["flux", "sd3"],
)
def test_tiny_mode_compresses_saves_and_reports(tmp_path, script, extra, blocks, replaced):
    result = run_example(script, "--tiny", *extra, "--output", tmp_path / "out", "--calibration-batches", 5, "--ratio", 0.1,
                         "--latency-repeats", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"blockprune plan: {replaced} of {blocks} blocks replaced" in out
    assert "latency ratio" in out and "transformer forward (cpu, torch.float32)" in out
    assert "image grid skipped:" in out and "cannot generate images" in out
    error = float(out.split("relative output error on a held-out transformer input: ")[1].split()[0])
    assert 0 < error < 0.1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blockprune.json", "config.json", "model.safetensors"]
    assert len(blockprune.plan(blockprune.from_pretrained(tmp_path / "out")).replaced) == replaced


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
