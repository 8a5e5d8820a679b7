"""benchmarks/ablation.py in its CPU smoke mode: the configurations it promises, on the blocks it promises."""

import pytest
from conftest import benchmark_script


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
    script.main([*common, "--latency"])
    summary = {e["label"]: e for e in script.main([*common, "--summarize"])}
    assert summary["full"]["cpu_latency"] == 1.0 and summary["deletion 20%"]["flops"] == pytest.approx(0.816, abs=0.01)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("width pruning+FT")  # the table comes last


def test_unknown_configuration_is_named():
    with pytest.raises(SystemExit, match="unknown configuration 'fastest'"):
        _script().main(["--quick", "--only", "fastest"])
