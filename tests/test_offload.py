"""offload=True: the same model as without it; blocks rest on the CPU; a device is required."""

import pytest
import torch
from conftest import flux_batches, make_flux

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.offload import Offload

OPTIONS = {"ratio": 0.5, "sandwich_steps": 5, "sandwich_lr": 1e-3, "progress": False, "cache_dir": False}


def test_offloaded_compress_equals_the_plain_one():
    plain, offloaded = make_flux(), make_flux()
    blockprune.compress(plain, calibration=flux_batches(6), device="cpu", **OPTIONS)
    blockprune.compress(offloaded, calibration=flux_batches(6), device="cpu", offload=True, **OPTIONS)
    assert blockprune.plan(offloaded).replaced_names == blockprune.plan(plain).replaced_names
    for (name, a), (_, b) in zip(plain.state_dict().items(), offloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert {p.device.type for p in offloaded.parameters()} == {"cpu"}


class CountingOffload(Offload):
    """Counts the blocks it moves to the device (on CPU the move itself is invisible)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.moved = []

    def _pre(self, module, args):
        if module is not self.model and id(module) in self.moving:
            self.moved.append(type(module).__name__)
        super()._pre(module, args)


def test_offload_moves_each_block_for_its_forward_and_keeps_pinned_ones():
    model = make_flux()
    blocks = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    with CountingOffload(model, blocks, "cpu") as offload, torch.no_grad():
        model(**flux_batches(1)[0])
        assert offload.moved == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
        assert not offload.stash  # every block was put back
        offload.moved.clear()
        with offload.pinned(["transformer_blocks.0"]):
            model(**flux_batches(1)[0])
        assert offload.moved == ["FluxTransformerBlock"] + ["FluxSingleTransformerBlock"] * 2


def test_offload_needs_a_device():
    with pytest.raises(BlockpruneError, match="offload=True needs device="):
        blockprune.compress(make_flux(), calibration=flux_batches(6), offload=True, **OPTIONS)


def test_offloaded_importance_equals_the_plain_one():
    options = {"calibration": flux_batches(4), "device": "cpu", "progress": False, "cache_dir": False}
    plain = blockprune.importance(make_flux(), **options)
    offloaded_model = make_flux()
    offloaded = blockprune.importance(offloaded_model, offload=True, **options)
    assert offloaded.values == plain.values
    assert {p.device.type for p in offloaded_model.parameters()} == {"cpu"}
