"""The width-pruning baseline (benchmarks/width_pruning.py) on tiny random FLUX and SD3 transformers."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script, flux_batches, make_flux, sd3_batches
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from blockprune.discovery.flops import count_flops, count_parameters
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import output_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from width_pruning import finetune, keep_for_flops, l1_prune  # noqa: E402


def tiny(seed: int = 0):
    # 4 heads of 8 so that halving the heads is exact; 2 double + 2 single blocks, width 32
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()


def outputs(model, batches):
    with torch.no_grad():
        return [output_tensor(model(**b)) for b in batches]


def widths(model):
    """(MLP hidden sizes, head counts) of every block."""
    hidden, heads = [], []
    for block in model.transformer_blocks:
        hidden += [block.ff.net[0].proj.out_features, block.ff_context.net[0].proj.out_features]
        heads.append(block.attn.heads)
    for block in model.single_transformer_blocks:
        hidden.append(block.proj_mlp.out_features)
        heads.append(block.attn.heads)
    return hidden, heads


def test_keep_one_leaves_outputs_unchanged():
    model, batches = tiny(), flux_batches(2)
    before = outputs(model, batches)
    l1_prune(model, 1.0)
    for got, expected in zip(outputs(model, batches), before):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_half_width_shrinks_layers_params_and_flops():
    model, batch = tiny(), flux_batches(1)[0]
    params, flops = count_parameters(model), count_flops(model, batch)
    hidden, heads = widths(model)
    pruned = l1_prune(copy.deepcopy(model), 0.5)
    new_hidden, new_heads = widths(pruned)
    assert all(abs(n - h / 2) <= 1 for n, h in zip(new_hidden, hidden))
    assert all(abs(n - h / 2) <= 1 for n, h in zip(new_heads, heads))
    assert count_parameters(pruned) < params
    assert count_flops(pruned, batch) < flops
    assert output_tensor(pruned(**batch)).shape == output_tensor(model(**batch)).shape
    single = pruned.single_transformer_blocks[0]
    assert single.proj_out.in_features == single.attn.inner_dim + single.mlp_hidden_dim


def test_largest_l1_heads_and_channels_are_kept():
    model = tiny()
    block = model.single_transformer_blocks[0]
    with torch.no_grad():
        block.attn.to_q.weight[8:16] *= 100  # head 1
        block.proj_mlp.weight[5] *= 100
    head, channel = block.attn.to_q.weight[8:16].clone(), block.proj_mlp.weight[5].clone()
    l1_prune(model, 0.25)  # one head, 32 of 128 channels
    assert block.attn.heads == 1 and block.mlp_hidden_dim == 32
    assert torch.equal(block.attn.to_q.weight, head)
    assert any(torch.equal(row, channel) for row in block.proj_mlp.weight)


def test_keep_for_flops_lands_near_target():
    model, batch = tiny(), flux_batches(1)[0]
    full = count_flops(model, batch)
    for share in (0.8, 0.6):
        keep = keep_for_flops(model, batch, share * full)
        assert 0 < keep < 1
        got = count_flops(l1_prune(copy.deepcopy(model), keep), batch)
        assert abs(got / (share * full) - 1) < 0.03
    assert keep_for_flops(model, batch, 2 * full) == 1.0
    assert widths(model)[1] == [4] * 4  # the model itself is not pruned


def test_finetune_lowers_distillation_loss():
    teacher = tiny()
    student = l1_prune(copy.deepcopy(teacher), 0.5)
    losses = finetune(student, teacher, flux_batches(2), steps=20, lr=1e-3)
    assert len(losses) == 20
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert not student.training and not teacher.training


@pytest.mark.parametrize("keep", [0, 1.5, -0.2])
def test_bad_keep_names_the_range(keep):
    with pytest.raises(BlockpruneError, match=r"\(0, 1\]"):
        l1_prune(make_flux(), keep)


def tiny_sd3(dual: tuple[int, ...] = ()):
    # 4 heads of 8, 3 joint blocks (the last one context_pre_only: no to_add_out, no ff_context)
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=dual,
    ).eval()


def test_sd3_keep_one_unchanged_and_half_width_shrinks_every_joint_block():
    model, batches = tiny_sd3(), sd3_batches(2)
    before = outputs(model, batches)
    for got, expected in zip(outputs(l1_prune(copy.deepcopy(model), 1.0), batches), before):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    pruned = l1_prune(copy.deepcopy(model), 0.5)
    for block in pruned.transformer_blocks:
        assert block.attn.heads == 2 and block.attn.to_q.out_features == 16 == block.attn.to_out[0].in_features
        assert block.ff.net[0].proj.out_features == 64 == block.ff.net[2].in_features
    first, last = pruned.transformer_blocks[0], pruned.transformer_blocks[-1]
    assert first.attn.to_add_out.in_features == 16 and first.ff_context.net[2].in_features == 64
    assert last.attn.to_add_out is None and last.ff_context is None
    assert count_flops(pruned, batches[0]) < 0.7 * count_flops(model, batches[0])
    got = outputs(pruned, batches)
    assert got[0].shape == before[0].shape and all(torch.isfinite(g).all() for g in got)
    target = 0.8 * count_flops(model, batches[0])
    keep = keep_for_flops(model, batches[0], target)
    assert count_flops(l1_prune(copy.deepcopy(model), keep), batches[0]) == pytest.approx(target, rel=0.03)


def test_sd3_dual_attention_is_refused_by_name():
    with pytest.raises(BlockpruneError, match=r"transformer_blocks\.0 has a second attention"):
        l1_prune(tiny_sd3(dual=(0,)), 0.5)


def test_not_a_flux_model():
    with pytest.raises(BlockpruneError, match="FLUX or SD3"):
        l1_prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)


def test_width_baseline_matches_the_flops_of_the_auto_plan_it_reads(tmp_path, capsys):
    match = tmp_path / "selection-sd3-small-seed0.json"
    auto = {"model": "sd3-small", "seed": 0, "ratio": 0.2, "label": "auto", "sandwich": True, "psnr": 19.5,
            "ssim": 0.7, "accuracy": 0.8, "frechet": 0.2, "compress_s": 60.0,
            "blocks": ["transformer_blocks.7", "transformer_blocks.6"]}
    settings = {"model": "sd3-small", "seed": 0, "calibration": 32, "batch_size": 8, "prompts": 64, "steps": 20}
    match.write_text(json.dumps({**settings, "rows": [auto, {**auto, "sandwich": False}]}))
    rows = benchmark_script("width_baseline").main(["--quick", "--match", str(match), "--output", str(tmp_path)])
    assert [r["label"] for r in rows] == ["width + FT 1e-04", "width + FT 1e-03"]
    assert rows[0]["brll_flops"] < 0.85 and rows[0]["flops"] == pytest.approx(rows[0]["brll_flops"], rel=0.03)
    assert 0.5 < rows[0]["keep"] < 1 and rows[0]["finetune_steps"] == 3 and len(rows[0]["losses"]) == 3
    written = json.loads((tmp_path / "width-baseline-sd3-small-seed0.json").read_text())["rows"]
    assert [(r["label"], r["psnr"], r["keep"]) for r in written] == [(r["label"], r["psnr"], r["keep"]) for r in rows]
    assert "BRLL + ST (auto)" in capsys.readouterr().out.splitlines()[-3]  # the table comes last
    with pytest.raises(BlockpruneError, match="no auto row with sandwich training at ratios"):
        benchmark_script("width_baseline").main(["--quick", "--match", str(match), "--ratios", "0.3"])
