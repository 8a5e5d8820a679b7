"""Sandwich training with gradient checkpointing, and training on a CUDA GPU in bf16, where the attention kernels
that training may use are restricted (cuDNN's backward failed at FLUX.1-dev scale on an H200)."""

import contextlib
import weakref

import pytest
import torch
from conftest import cast_batch, flux_batches
from test_offload_prefetch import OPTIONS, wide_flux
from torch.nn.modules.module import register_module_forward_pre_hook

import blockprune
from blockprune import progressive
from blockprune.errors import BlockpruneError
from blockprune.runtime.offload import Offload
from blockprune.sandwich.blockwise import blockwise_backward
from blockprune.sandwich.heal import heal
from blockprune.sandwich.training import training_attention

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
BLOCKS = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(8)]  # wide_flux's


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def batches(count: int, device: str) -> list[dict]:
    return [cast_batch(batch, dtype_for(device)) for batch in flux_batches(count, seed=3, side=8, text=8)]


def model_for(device: str) -> torch.nn.Module:
    return wide_flux().to(dtype_for(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_trains_the_same_spans(device, offload):
    """The backward's recompute must run under the forward's kernel choice again; on the H200 it once picked cuDNN
    attention the second time and failed with a CheckpointError."""
    results = {}
    for checkpointing in (False, True):
        model = model_for(device)
        blockprune.compress(model, calibration=batches(6, device), device=device, offload=offload,
                            sandwich_gradient_checkpointing=checkpointing, heal_steps=0, **OPTIONS)
        stages = blockprune.plan(model).stages
        assert stages and all(s.relative_error_after <= s.relative_error_before for s in stages)
        with torch.no_grad():
            model.to(device)
            results[checkpointing] = model(**{k: v.to(device) for k, v in batches(1, device)[0].items()}).sample.float().cpu()
    tolerance = 0.05 if device == "cuda" else 1e-4
    assert torch.allclose(results[True], results[False], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_healing_trains_in_bf16_on_cuda_and_never_ends_worse(device):
    model = model_for(device)
    blockprune.compress(model, calibration=batches(8, device), device=device, heal_steps=4, **OPTIONS)
    heal = blockprune.plan(model).heal
    assert heal["steps_run"] >= 1 and heal["relative_error_after"] <= heal["relative_error_before"]


def test_a_batch_of_another_dtype_is_rejected_with_the_cast_to_make():
    model = wide_flux().to(torch.bfloat16)
    with pytest.raises(BlockpruneError, match=r"float32 and the model's weights torch.bfloat16.*cast them"):
        blockprune.compress(model, calibration=batches(6, "cpu"), device="cpu", **OPTIONS)


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_backward_under_offload_gives_the_in_memory_gradients(device):
    trainable_blocks = ["transformer_blocks.0", "single_transformer_blocks.5"]
    batch = batches(1, device)[0]
    gradients = {}
    for offloaded in (False, True):
        model = model_for(device).requires_grad_(False)
        trainable = [p for name in trainable_blocks for p in model.get_submodule(name).parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
        with contextlib.ExitStack() as stack:
            if offloaded:
                offload = stack.enter_context(Offload(model, BLOCKS, device))
                stack.enter_context(blockwise_backward(offload, trainable))
            else:
                model.to(device)
            calls = []
            stack.enter_context(model.get_submodule("single_transformer_blocks.3.attn").register_forward_hook(
                lambda *_: calls.append(1)))
            with training_attention(torch.device(device)):  # as healing trains (cuDNN's backward gave NaN)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).sample.float().pow(2).mean()
                loss.backward()
            gradients[offloaded] = [p.grad.float().cpu() for p in trainable]
        assert len(calls) == (2 if offloaded else 1)  # offloaded, each block ran again in the backward
    tolerance = 0.05 if device == "cuda" else 1e-6
    for offloaded, plain in zip(gradients[True], gradients[False]):
        assert plain.abs().sum() > 0
        assert torch.allclose(offloaded, plain, rtol=tolerance, atol=tolerance * plain.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_healing_under_offload_or_checkpointing_trains_as_in_memory(device, monkeypatch):
    """Under offload, healing backpropagates one resident block at a time (sandwich.blockwise); in memory with
    sandwich_gradient_checkpointing each block recomputes its activations in the backward. Either way the rate
    probes of sandwich_lr="auto" must reach the held-out errors they reach keeping the whole graph."""
    heals, block_runs = {}, {}
    runs = []  # linear layers run while healing (every block's recompute runs its layers again)

    def counted_heal(*args, **kwargs):
        handle = register_module_forward_pre_hook(lambda m, _: runs.append(1) if isinstance(m, torch.nn.Linear) else None)
        try:
            return heal(*args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(progressive, "heal", counted_heal)
    for way, options in {"graph": {}, "offload": {"offload": True},
                         "checkpointing": {"sandwich_gradient_checkpointing": True}}.items():
        model = model_for(device)
        runs.clear()
        blockprune.compress(model, calibration=batches(8, device), device=device, heal_steps=6,  # the same items
                            sandwich_eval_every=2, heal_states="calibration",  # (offload would not take own states)
                            **{**OPTIONS, "sandwich_lr": "auto", **options})
        heals[way], block_runs[way] = blockprune.plan(model).heal, len(runs)
    in_memory = heals["graph"]
    assert any(error != in_memory["relative_error_before"] for error in in_memory["lr_errors"].values())  # trained
    tolerance = 0.05 if device == "cuda" else 1e-4
    for way in ("offload", "checkpointing"):
        assert heals[way]["relative_error_before"] == pytest.approx(in_memory["relative_error_before"], rel=tolerance)
        assert heals[way]["lr_errors"] == pytest.approx(in_memory["lr_errors"], rel=tolerance)
        assert heals[way]["best_step"] == in_memory["best_step"]
    assert block_runs["checkpointing"] > block_runs["graph"]  # healing's backward ran the blocks again


def test_blockwise_backward_lets_the_saved_block_inputs_go_after_the_backward():
    model = model_for("cpu").requires_grad_(False)
    trainable = list(model.get_submodule("single_transformer_blocks.2").parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    seen = []
    with Offload(model, BLOCKS, "cpu") as offload, blockwise_backward(offload, trainable), \
            model.get_submodule("single_transformer_blocks.4").register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(weakref.ref(kwargs["hidden_states"])), with_kwargs=True):
        loss = model(**batches(1, "cpu")[0]).sample.pow(2).mean()
        assert seen[0]() is not None  # kept for the backward's recompute
        loss.backward()
        assert seen[0]() is None  # the autograd node, still held through `loss`, keeps no copy of it
