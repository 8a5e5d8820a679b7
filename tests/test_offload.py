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


def test_offload_moves_blocks_only_while_they_run_and_keeps_pinned_ones():
    model = make_flux()
    blocks = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    moves = []
    original_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moves.append(type(self).__name__)
        return original_to(self, *args, **kwargs)

    with Offload(model, blocks, "cpu") as offload:
        torch.nn.Module.to = spy
        try:
            with torch.no_grad():
                model(**flux_batches(1)[0])
            assert moves.count("FluxTransformerBlock") == 4 and moves.count("FluxSingleTransformerBlock") == 4
            moves.clear()
            with offload.pinned(["transformer_blocks.0"]), torch.no_grad():
                moves.clear()
                model(**flux_batches(1)[0])
                assert moves.count("FluxTransformerBlock") == 2  # the pinned block stayed
        finally:
            torch.nn.Module.to = original_to


def test_offload_needs_a_device():
    with pytest.raises(BlockpruneError, match="offload=True needs device="):
        blockprune.compress(make_flux(), calibration=flux_batches(6), offload=True, **OPTIONS)
