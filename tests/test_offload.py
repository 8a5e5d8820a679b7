"""offload=True: the same model as without it; blocks rest on the CPU; a device is required."""

import pytest
import torch
from conftest import flux_batches, make_flux

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.runtime.offload import HostBuffer, Offload

OPTIONS = {"ratio": 0.5, "sandwich_steps": 5, "sandwich_lr": 1e-3, "heal_steps": 0, "progress": False, "cache_dir": False}


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


def test_a_block_whose_forward_raises_is_put_back_all_the_same():
    model = make_flux()
    blocks = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]

    def fail(module, args):
        raise RuntimeError("planted failure")

    with Offload(model, blocks, "cpu") as offload, torch.no_grad():
        with model.get_submodule("single_transformer_blocks.0.attn").register_forward_pre_hook(fail):
            with pytest.raises(RuntimeError, match="planted failure"):
                model(**flux_batches(1)[0])
        assert not offload.stash  # its weights point at their host memory again, not at the copies made for the run


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


def test_host_buffer_holds_exact_copies_in_one_aligned_storage():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(2, 3).t(), torch.zeros(0, 4)]
    buffer = HostBuffer(tensors, page_lock=False)
    assert not buffer.locked
    for tensor, view in zip(tensors, buffer.views):
        assert torch.equal(view, tensor) and view.dtype == tensor.dtype and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == buffer.storage.untyped_storage().data_ptr()
        assert view.numel() == 0 or (view.data_ptr() - buffer.storage.data_ptr()) % 256 == 0
    assert buffer.storage.numel() == 256 * 3  # three copies rounded up to 256 bytes; the empty one takes none


def test_offload_keeps_each_block_in_its_own_buffer_while_it_is_swapped_out_and_back():
    model = make_flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = ["transformer_blocks.0", "single_transformer_blocks.0"]
    with Offload(model, blocks, "cpu") as offload:
        for name in blocks:
            storages = {p.untyped_storage().data_ptr() for p in model.get_submodule(name).parameters()}
            assert storages == {offload.homes[name].buffer.storage.data_ptr()}
        block = model.single_transformer_blocks[0]
        model.single_transformer_blocks[0] = torch.nn.Identity()  # as importance scoring does
        offload.refresh()
        model.single_transformer_blocks[0] = block
        with offload.pinned(["single_transformer_blocks.0"]):  # to the device and back into its buffer
            pass
        assert block.proj_out.weight.untyped_storage().data_ptr() == offload.homes[blocks[1]].buffer.storage.data_ptr()
    assert not offload.homes
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a CUDA GPU")
def test_host_buffer_page_locks_in_place_and_unlocks():
    buffer = HostBuffer([torch.randn(1000, 1000)])
    assert buffer.locked and buffer.views[0].is_pinned()
    assert torch.equal(buffer.views[0].to("cuda", non_blocking=True).cpu(), buffer.views[0])
    buffer.release()
    assert not buffer.views[0].is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to a GPU needs one")
def test_offloaded_compress_on_a_gpu_matches_the_cpu_and_leaves_nothing_locked():
    plain, offloaded = make_flux(), make_flux()
    options = {**OPTIONS, "sandwich": False}
    blockprune.compress(plain, calibration=flux_batches(6), device="cpu", **options)
    blockprune.compress(offloaded, calibration=flux_batches(6), device="cuda", offload=True, **options)
    assert blockprune.plan(offloaded).replaced_names == blockprune.plan(plain).replaced_names
    for (name, a), (_, b) in zip(plain.state_dict().items(), offloaded.state_dict().items()):
        assert b.device.type == "cpu" and not b.is_pinned(), name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_a_second_offload_houses_blocks_again_but_not_tied_weights():
    model = make_flux()
    with Offload(model, ["transformer_blocks.0"], "cpu"):
        pass
    with Offload(model, ["transformer_blocks.0"], "cpu") as offload:  # its tensors are now views of one buffer
        assert "transformer_blocks.0" in offload.homes
    block = model.transformer_blocks[0]
    block.ff.net[2].weight = block.ff_context.net[2].weight  # one parameter under two names
    with Offload(model, ["transformer_blocks.0"], "cpu") as offload:
        assert "transformer_blocks.0" in offload.homes and block.ff.net[2].weight is block.ff_context.net[2].weight
    block.attn.to_v.weight.data = block.attn.to_k.weight.data  # two parameters over the same memory
    with Offload(model, ["transformer_blocks.0"], "cpu") as offload:
        assert "transformer_blocks.0" not in offload.homes
    assert block.attn.to_v.weight.data_ptr() == block.attn.to_k.weight.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a CUDA GPU")
def test_a_span_trained_on_the_gpu_comes_back_into_its_page_locked_buffer():
    model = make_flux()
    name = "transformer_blocks.0"
    weight = model.transformer_blocks[0].attn.to_q.weight
    with Offload(model, [name], "cuda") as offload:
        assert weight.is_pinned()
        with offload.pinned([name]):
            assert weight.device.type == "cuda"
            weight.data.add_(1.0)
        assert weight.is_pinned() and weight.untyped_storage().data_ptr() == offload.homes[name].buffer.storage.data_ptr()
        changed = weight.detach().clone()
    assert not weight.is_pinned() and torch.equal(weight, changed)
