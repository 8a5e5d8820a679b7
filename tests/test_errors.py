"""Bad input to compress(): each a clear error naming the problem and the fix."""

import math

import pytest
import torch
from conftest import SwapNet, flux_batches, make_flux, make_sd3

import blockprune
from blockprune import plugins
from blockprune.errors import BlockpruneError, NonFiniteActivationError
from blockprune.runtime.forward import forward_batch


def _compress(model=None, **kwargs):
    options = {"calibration": flux_batches(2), "sandwich": False, "progress": False, **kwargs}
    return blockprune.compress(make_flux() if model is None else model, **options)


@pytest.mark.parametrize("ratio", [0, -0.1, 1, 1.5, math.nan, "0.2", True])
def test_ratio_outside_zero_one(ratio):
    with pytest.raises(BlockpruneError, match="ratio must be a number strictly between 0 and 1"):
        _compress(ratio=ratio)


def test_ratio_that_rounds_to_zero_blocks():
    with pytest.raises(BlockpruneError, match=r"ratio 0.1 of 4 blocks rounds to 0 blocks; use ratio ≥ 0.125"):
        _compress(ratio=0.1)


def test_unknown_adapter_lists_known_ones():
    known = ", ".join(sorted(plugins.adapters()))  # the built-ins, plus any installed adapter plugin
    assert {"dit", "flux", "generic", "sd3"} <= set(plugins.adapters())
    with pytest.raises(BlockpruneError, match=rf"unknown adapter 'fluxx'; known adapters: {known}$"):
        _compress(adapter="fluxx")


def test_adapter_that_does_not_match_the_model():
    with pytest.raises(BlockpruneError, match=r"the 'sd3' adapter does not handle FluxTransformer2DModel"):
        _compress(adapter="sd3")


def test_auto_without_matching_adapter_points_to_generic():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    known = ", ".join(sorted(set(plugins.adapters()) - {"generic"}))
    with pytest.raises(BlockpruneError, match=rf"no adapter matches Sequential; known adapters: {known}\. Pass adapter='generic'"):
        _compress(model)


def test_calibration_missing_for_a_bare_transformer():
    with pytest.raises(BlockpruneError, match="no calibration data: pass calibration="):
        _compress(calibration=None)


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([], "calibration is empty"),
        ([[1, 2]], "calibration item 0 is a list, not a dict"),
        ({"hidden_states": 1}, "calibration must be a list .* got dict; wrap a single batch as \\[batch\\]"),
        (3, "calibration must be a list .* got int"),
    ],
)
def test_calibration_empty_or_not_dicts(calibration, message):
    with pytest.raises(BlockpruneError, match=message):
        _compress(calibration=calibration)


def test_calibration_key_the_forward_does_not_accept():
    batch = {**flux_batches(1)[0], "latents": torch.zeros(1)}
    with pytest.raises(BlockpruneError, match="calibration batch 0 has key 'latents', which FluxTransformer2DModel.forward does not accept"):
        _compress(calibration=[batch])


def test_calibration_rejected_by_the_forward_names_the_batch_and_keys():
    batch = flux_batches(1)[0]
    batch["hidden_states"] = torch.randn(2, 16, 5)  # wrong channel count
    with pytest.raises(BlockpruneError, match=r"FluxTransformer2DModel.forward rejected calibration batch 0 \(keys: hidden_states,"):
        _compress(calibration=[batch])


def test_missing_required_argument_is_named():
    with pytest.raises(BlockpruneError, match="calibration batch 0 lacks 'y', which SwapNet.forward requires"):
        _compress(SwapNet(), adapter="generic", calibration=[{"x": torch.randn(2, 5, 8)}])


def test_nan_in_activations_names_the_block():
    model = make_flux()
    with torch.no_grad():
        model.single_transformer_blocks[1].proj_out.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteActivationError, match="NaN or Inf in stream .* of block single_transformer_blocks.1"):
        _compress(model, order=["single_transformer_blocks.1"], ratio=0.25)


def test_order_with_unknown_block_and_too_few_names():
    with pytest.raises(BlockpruneError, match="order names block 'transformer_blocks.9', which does not exist; blocks: transformer_blocks.0"):
        _compress(order=["transformer_blocks.9"])
    with pytest.raises(BlockpruneError, match="order lists 1 blocks but ratio 0.5 replaces 2"):
        _compress(order=["transformer_blocks.0"], ratio=0.5)
    with pytest.raises(BlockpruneError, match="unknown order 'random'"):
        _compress(order="random")
    with pytest.raises(BlockpruneError, match="more than once"):
        _compress(order=["transformer_blocks.0", "transformer_blocks.0"], ratio=0.5)


def test_unknown_option_and_metric():
    with pytest.raises(BlockpruneError, match="unknown option 'ridg'; did you mean 'ridge'\\? options: ridge"):
        _compress(ridg=1)
    with pytest.raises(BlockpruneError, match="unknown importance metric 'fidd'; known metrics: block_influence, clip, fid, fit_residual, output_mse"):
        _compress(importance="fidd")


def test_compressing_twice_is_refused():
    model = _compress(ratio=0.25)
    with pytest.raises(BlockpruneError, match="already compressed"):
        _compress(model, ratio=0.25)


def test_not_a_model():
    with pytest.raises(BlockpruneError, match="expected a torch model or a diffusers pipeline with a .transformer, got str"):
        blockprune.compress("black-forest-labs/FLUX.1-dev", sandwich=False)


def test_sd3_model_with_flux_batches_is_rejected_clearly():
    with pytest.raises(BlockpruneError, match="SD3Transformer2DModel.forward"):
        _compress(make_sd3(), adapter="sd3")


class _OutOfMemory(torch.nn.Module):
    """A model whose forward runs out of memory, as FLUX.1-dev's healing did at batches of 4 on one H200."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, **inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.05 GiB")


def test_a_batch_of_another_dtype_gets_the_cast_to_make_but_running_out_of_memory_does_not():
    batch = flux_batches(1)[0]  # float32
    with pytest.raises(BlockpruneError, match=r"float32 and the model's weights torch.float64: .*cast them to torch.float64"):
        forward_batch(make_flux().double(), batch, 0)
    with pytest.raises(BlockpruneError, match="OutOfMemoryError: CUDA out of memory") as caught:
        forward_batch(_OutOfMemory(), batch, 0)
    assert "cast them" not in str(caught.value)  # the dtypes differ, but they are not the cause
