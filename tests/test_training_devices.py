"""Sandwich training with gradient checkpointing, and training on a CUDA GPU in bf16, where the attention kernels
that training may use are restricted (cuDNN's backward failed at FLUX.1-dev scale on an H200)."""

import pytest
import torch
from conftest import flux_batches
from test_offload_prefetch import OPTIONS, wide_flux

import blockprune

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def batches(count: int) -> list[dict]:
    return flux_batches(count, seed=3, side=8, text=8)


def model_for(device: str) -> torch.nn.Module:
    return wide_flux().to(torch.bfloat16 if device == "cuda" else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_trains_the_same_spans(device, offload):
    """The backward's recompute must run under the forward's kernel choice again; on the H200 it once picked cuDNN
    attention the second time and failed with a CheckpointError."""
    results = {}
    for checkpointing in (False, True):
        model = model_for(device)
        blockprune.compress(model, calibration=batches(6), device=device, offload=offload,
                            sandwich_gradient_checkpointing=checkpointing, **OPTIONS)
        stages = blockprune.plan(model).stages
        assert stages and all(s.relative_error_after <= s.relative_error_before for s in stages)
        with torch.no_grad():
            model.to(device)
            results[checkpointing] = model(**{k: v.to(device) for k, v in batches(1)[0].items()}).sample.float().cpu()
    tolerance = 0.05 if device == "cuda" else 1e-4
    assert torch.allclose(results[True], results[False], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_healing_trains_in_bf16_on_cuda_and_never_ends_worse(device):
    model = model_for(device)
    blockprune.compress(model, calibration=batches(8), device=device, heal_steps=4, **OPTIONS)
    heal = blockprune.plan(model).heal
    assert heal["steps_run"] >= 1 and heal["relative_error_after"] <= heal["relative_error_before"]
