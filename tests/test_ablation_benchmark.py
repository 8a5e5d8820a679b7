"""benchmarks/ablation.py in its CPU smoke mode: the configurations it promises, on the blocks it promises."""

import math

import pytest
from conftest import benchmark_script

from blockprune import plugins
from blockprune.discovery.flops import block_flops, count_flops
from blockprune.discovery.resolve import resolve_blocks
from blockprune.toy import ToyPipeline, calibration_batches


def _script():
    return benchmark_script("ablation")


def test_quick_run_compares_methods_on_the_same_blocks_and_summarizes(tmp_path, capsys):
    script = _script()
    common = ["--quick", "--output", str(tmp_path)]
    result = script.main([*common, "--seed", "0", "--only", "deletion 20%", "width pruning+FT"])
    rows = {row["label"]: row for row in result["rows"]}
    assert list(rows) == ["full", "BRLL+ST 20%", "deletion 20%", "width pruning+FT"]
    assert rows["full"]["psnr"] > 60 and rows["full"]["ssim"] == pytest.approx(1.0)
    assert rows["deletion 20%"]["blocks"] == rows["BRLL+ST 20%"]["blocks"] and len(rows["deletion 20%"]["blocks"]) == 4
    assert rows["deletion 20%"]["stages"] == 0 and rows["BRLL+ST 20%"]["stages"] == 4
    assert rows["width pruning+FT"]["flops"] == pytest.approx(rows["BRLL+ST 20%"]["flops"], rel=0.03)  # matched
    assert rows["width pruning+FT"]["finetune_steps"] == 4 * 3
    assert (tmp_path / "flux-small-methods.png").stat().st_size > 1000
    timed = script.main([*common, "--latency"])["latency_s"]
    assert list(timed) == list(rows)
    summary = {e["label"]: e for e in script.main([*common, "--summarize"])}
    for label, seconds in timed.items():
        assert summary[label]["cpu_latency"] == pytest.approx(seconds["cpu_s"] / timed["full"]["cpu_s"], rel=1e-12)
    assert summary["deletion 20%"]["flops"] == pytest.approx(_deleted_flops_share(rows["deletion 20%"]["blocks"]), rel=1e-9)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("width pruning+FT")  # the table comes last


def _deleted_flops_share(deleted):
    """FLOPs of flux-small with ``deleted`` skipped, over the full model's, on a batch of --quick's shapes: each
    deleted block's own FLOPs go, its identity surrogate's per-stream affine maps (2 · tokens · d²) come in."""
    pipe = ToyPipeline.from_pretrained("flux-small")
    batch = calibration_batches(pipe, 1, seed=1000, batch_size=2)[0]
    transformer = pipe.transformer
    blocks = {b.name: b for b in resolve_blocks(transformer, plugins.get_adapter(transformer, "flux"), batch)}
    own = block_flops(transformer, list(blocks), batch)
    maps = {name: sum(2 * math.prod(shape[:-1]) * shape[-1] ** 2 for shape in blocks[name].stream_shapes.values())
            for name in deleted}
    total = count_flops(transformer, batch)
    return (total - sum(own[name] for name in deleted) + sum(maps.values())) / total


def test_unknown_configuration_is_named():
    with pytest.raises(SystemExit, match="unknown configuration 'fastest'"):
        _script().main(["--quick", "--only", "fastest"])
