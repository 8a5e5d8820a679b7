"""benchmarks/flux_speed.py end to end on a tiny FLUX configuration on the CPU."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARKS, benchmark_script

SCRIPT = BENCHMARKS / "flux_speed.py"


def _benchmark_module():
    return benchmark_script("flux_speed")


def test_tiny_run_prints_the_table_last_and_writes_json(tmp_path):
    # one thread: the timings are not the point here, and a loaded 2-core machine makes two threads crawl.
    # Compiling is asked for (full model and 30 %) but a zero time budget skips it, and says so.
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--tiny", "--ratios", "0.1,0.3", "--compile-ratios", "0.3",
               "--time-budget", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    header, columns, *rows = lines[-5:]
    assert header.startswith("FLUX tiny configuration, random float32 weights, CPU, 128² (64 image + 8 text tokens)")
    assert columns.split() == ["model", "replaced", "FLOPs", "eager", "ms", "x", "full", "floor", "ms", "eager/floor",
                               "fused", "ms", "compiled", "ms", "x", "full"]
    assert [row.split()[:2] for row in rows] == [["full", "0"], ["10%", "2"], ["30%", "6"]]

    report = json.loads((tmp_path / "flux_speed.json").read_text())
    full_ms = statistics.median(report["variants"][0]["eager_ms_all"])
    for row, variant in zip(rows, report["variants"]):
        eager_ms = statistics.median(variant["eager_ms_all"])
        fused = f"{variant['fused_eager_ms']:.2f}" if "fused_eager_ms" in variant else "-"
        assert row.split()[-7:] == [f"{eager_ms:.2f}", f"{eager_ms / full_ms:.3f}", f"{variant['floor_ms']:.2f}",
                                   f"{eager_ms / variant['floor_ms']:.3f}", fused, "-", "-"]
    assert report["config"] == "tiny" and report["image_tokens"] == 64 and report["text_tokens"] == 8
    full, ten, thirty = report["variants"]
    assert len(report["importance_order"]) == 20 == len(full["block_ms"])
    assert ten["replaced"] == report["importance_order"][:2] and thirty["replaced"] == report["importance_order"][:6]
    for variant in report["variants"]:
        assert len(variant["eager_ms_all"]) == report["iterations"] == 3  # tiny: 3 iterations after 1 warm-up
        assert variant["floor_ms"] == sum(variant["block_ms"].values()) > 0
        assert variant["compiled_ms"] is None
    assert full["compile_skipped"] == thirty["compile_skipped"] == "time budget of 0 s" and "compile_skipped" not in ten
    assert "full: eager" in done.stdout and "compile skipped (time budget of 0 s)" in done.stdout
    assert full["flops"] > ten["flops"] > thirty["flops"] > 0
    assert "fused_eager_ms" not in full and ten["fused_eager_ms"] > 0 and thirty["fused_eager_ms"] > 0
    for variant in (ten, thirty):  # fused runs are made of the variant's replaced blocks
        assert all(set(run["blocks"]) <= set(variant["replaced"]) for run in variant["fused_runs"])


def test_quick_and_tiny_defaults():
    parse = _benchmark_module().parse_args
    quick = parse(["--quick", "--device", "cpu"])
    assert (quick.iterations, quick.warmup, quick.calibration_batches, quick.compile) == (5, 1, 1, False)
    assert (quick.resolution, quick.text_tokens) == (1024, 512)
    full = parse(["--device", "cpu", "--ratios", "0.2,0.3", "--compile-all"])
    assert (full.iterations, full.warmup, full.compile, full.compile_ratios) == (10, 3, True, [0.2, 0.3])
    tiny = parse(["--tiny", "--no-compile", "--resolution", "256"])
    assert (tiny.resolution, tiny.device.type, tiny.compile) == (256, "cpu", False)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # says to use --tiny or --device cpu
            parse([])
