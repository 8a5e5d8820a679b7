"""The width-pruning baseline (benchmarks/width_pruning.py) on a tiny random FLUX transformer."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import flux_batches, make_flux
from diffusers import FluxTransformer2DModel

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


def test_not_a_flux_model():
    with pytest.raises(BlockpruneError, match="FLUX"):
        l1_prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)
