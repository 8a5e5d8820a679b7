"""FLOP accounting: blockprune's counts against torch's FLOP counter, and FLUX.1-dev counted on the meta device."""

import pytest
import torch
from conftest import flux_batches, make_flux
from torch.utils.flop_counter import FlopCounterMode

import blockprune
from blockprune.discovery.flops import count_flops
from blockprune.errors import BlockpruneError
from blockprune.toy.demo import TINY_FLUX_CONFIG
from blockprune.toy.flux_dev import (
    FLUX_DEV_CONFIG,
    build_flux,
    flux_flops,
    flux_inputs,
    replace_with_surrogates,
)


def _torch_counts(model, batch):
    """Total and per-module FLOPs straight from torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    root = type(model).__name__
    per_module = {name.removeprefix(f"{root}."): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def test_inspect_and_plan_match_torchs_flop_counter():
    model, calibration = make_flux(double=2, single=3), flux_batches(3)
    total, per_module = _torch_counts(model, calibration[0])
    infos = blockprune.inspect(model, "flux", calibration[0])
    assert {i.name: i.flops for i in infos} == {i.name: per_module[i.name] for i in infos}
    assert all(i.flops > 0 for i in infos)

    order = ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.2"]
    blockprune.compress(model, "flux", ratio=0.6, calibration=calibration, sandwich=False, progress=False, order=order)
    plan = blockprune.plan(model)
    compressed_total, compressed_per_module = _torch_counts(model, calibration[0])
    assert (plan.flops_before, plan.flops_after) == (total, compressed_total)
    for replaced in plan.replaced:
        assert replaced.flops == per_module[replaced.name]
        for stream, report in replaced.streams.items():
            assert report.flops == compressed_per_module[f"{replaced.name}.linears.{stream}"] > 0
    saved = sum(r.flops - sum(s.flops for s in r.streams.values()) for r in plan.replaced)
    assert plan.flops_before - plan.flops_after == saved


def test_meta_device_counts_what_the_cpu_counts():
    replaced = ["transformer_blocks.2", "single_transformer_blocks.7"]
    counts = []
    for device in ("cpu", "meta"):
        model = build_flux(TINY_FLUX_CONFIG, device=device)
        batch = flux_inputs(model, resolution=128, text_tokens=8)[0]
        before = count_flops(model, batch)
        replace_with_surrogates(model, replaced)
        counts.append((before, count_flops(model, batch)))
    assert counts[0] == counts[1]
    assert counts[0][1] < counts[0][0]


def _analytic_flux_flops(d=3072, image=4096, text=512, double=19, single=38):
    """FLUX.1-dev FLOPs by hand: 2 per multiply-accumulate, matmuls and attention only (what torch counts)."""
    n = image + text
    attention_and_mlp = 2 * n * 12 * d * d + 4 * n * n * d  # qkv 3d², out d², MLP 8d² per token; QKᵀ and AV
    double_block = attention_and_mlp + 2 * (2 * d * 6 * d)  # two AdaLayerNormZero modulations
    single_block = attention_and_mlp + 2 * d * 3 * d  # one AdaLayerNormZeroSingle modulation
    outside = (
        2 * image * 64 * d  # x_embedder
        + 2 * text * 4096 * d  # context_embedder
        + 2 * (2 * 256 * d + 2 * d * d)  # timestep and guidance embedders
        + 2 * 768 * d + 2 * d * d  # pooled text embedder
        + 2 * d * 2 * d  # norm_out modulation
        + 2 * image * d * 64  # proj_out
    )
    return double * double_block + single * single_block + outside, double_block, single_block


def test_flux_dev_flops_on_the_meta_device():
    expected, double_block, single_block = _analytic_flux_flops()
    total = flux_flops()
    assert total == expected
    assert abs(total / 74.38e12 - 1) < 0.005  # METHOD.md §5: 74.38 T FLOPs = 37.19 T MACs

    replaced = ["transformer_blocks.0", "transformer_blocks.18", "single_transformer_blocks.0",
                "single_transformer_blocks.37"]
    surrogate = 2 * 4608 * 3072 * 3072  # one affine map per stream: 2·(4096 + 512)·d²
    dropped = 2 * (double_block - surrogate) + 2 * (single_block - surrogate)
    assert total - flux_flops(replaced=replaced) == dropped
    # a replaced block saves ~93% of its FLOPs: 1.218 T of 1.305 T
    assert 0.93 < (double_block - surrogate) / double_block < 0.94


def test_flux_inputs_reject_a_resolution_that_is_not_whole_tokens():
    with pytest.raises(BlockpruneError, match="resolution must be a positive multiple of 16 pixels, got 1000"):
        flux_inputs(build_flux(FLUX_DEV_CONFIG), resolution=1000)


def test_flux_dev_inputs_have_the_real_shapes():
    model = build_flux(FLUX_DEV_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320  # 11.90 B (METHOD.md §1)
    batch = flux_inputs(model)[0]
    assert batch["hidden_states"].shape == (1, 4096, 64)
    assert batch["encoder_hidden_states"].shape == (1, 512, 4096)
    assert batch["img_ids"].shape == (4096, 3) and batch["txt_ids"].shape == (512, 3)
    assert batch["guidance"].shape == (1,)
