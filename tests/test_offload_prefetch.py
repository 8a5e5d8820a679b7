"""Offload's prefetch (blocks copied on a side CUDA stream while others run) and the max_gpu_memory budget."""

import pytest
import torch
from conftest import flux_batches, make_flux
from diffusers import FluxTransformer2DModel

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.option_checks import memory_size
from blockprune.runtime import prefetch
from blockprune.runtime.offload import Offload

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="prefetch runs on a CUDA GPU")
OPTIONS = {"ratio": 0.5, "sandwich_steps": 5, "sandwich_lr": 1e-3, "progress": False, "cache_dir": False,
           "importance": "fit_residual"}


def test_memory_sizes_read_as_bytes():
    assert memory_size("m", "8GiB") == 8 * 2**30
    assert memory_size("m", "24 GB") == 24 * 10**9
    assert memory_size("m", "1.5gib") == 3 * 2**29
    assert memory_size("m", 1024) == 1024
    for bad in ("eight GiB", "8 parsecs", 0, -5, True, "0GiB"):
        with pytest.raises(BlockpruneError, match="must be a number of bytes or a size such as '8GiB'"):
            memory_size("max_gpu_memory", bad)


def test_max_gpu_memory_needs_offload_and_a_cuda_device():
    with pytest.raises(BlockpruneError, match="max_gpu_memory bounds what offload=True keeps on the GPU"):
        blockprune.compress(make_flux(), calibration=flux_batches(6), max_gpu_memory="8GiB", **OPTIONS)
    with pytest.raises(BlockpruneError, match="bounds the memory of a CUDA GPU, but offload's device is cpu"):
        blockprune.compress(make_flux(), calibration=flux_batches(6), device="cpu", offload=True,
                            max_gpu_memory="8GiB", **OPTIONS)


def test_offload_counts_block_visits_per_phase():
    model = make_flux()
    blockprune.compress(model, calibration=flux_batches(6), device="cpu", offload=True, **OPTIONS)
    visits = blockprune.plan(model).offload_visits
    assert visits["scoring.waited"] > 0 and visits["least_squares.waited"] > 0
    assert not any(key.endswith(".ahead") for key in visits)  # nothing is prefetched on the CPU


def wide_flux() -> FluxTransformer2DModel:
    """Blocks of a few MiB each, so that the budget decides how many are prefetched."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=8,
                                  attention_head_dim=64, num_attention_heads=4, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(16, 24, 24)).eval()


BLOCKS = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(8)]


def outputs_under(model, batches, **offload_options):
    with Offload(model, BLOCKS, "cuda", **offload_options) as offload, torch.no_grad():
        results = [model(**{k: v.cuda() for k, v in b.items()}).sample.cpu() for b in batches]
        return results, dict(offload.visits)


@cuda
def test_prefetched_forwards_are_bit_identical_to_copying_each_block_when_it_starts():
    model, batches = wide_flux(), flux_batches(4, side=16)
    plain, plain_visits = outputs_under(model, batches, prefetch=False)
    fetched, visits = outputs_under(model, batches)
    assert all(torch.equal(a, b) for a, b in zip(plain, fetched))
    assert plain_visits == {("other", "waited"): 40}
    # the first forward learns the order; later ones find every block but the first copied ahead
    assert visits == {("other", "waited"): 10 + 3, ("other", "ahead"): 27}


@cuda
def test_offloaded_compress_with_prefetch_equals_it_without(monkeypatch):
    results = []
    for ahead in (prefetch.MAX_AHEAD, 0):
        monkeypatch.setattr(prefetch, "MAX_AHEAD", ahead)
        model = make_flux()
        blockprune.compress(model, calibration=flux_batches(6), device="cuda", offload=True, **OPTIONS)
        results.append((model, blockprune.plan(model).offload_visits))
    (fetched, visits), (plain, plain_visits) = results
    assert visits["scoring.ahead"] > 0 and visits["least_squares.ahead"] > 0
    assert not any(key.endswith(".ahead") for key in plain_visits)
    for (name, a), (_, b) in zip(plain.state_dict().items(), fetched.state_dict().items()):
        assert torch.equal(a, b), name


@cuda
def test_max_gpu_memory_is_honoured_and_sets_how_far_ahead_blocks_are_copied():
    model, batches = wide_flux(), flux_batches(4, side=16)
    block = prefetch.module_bytes(model.single_transformer_blocks[0])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with Offload(model, BLOCKS, "cuda", max_gpu_memory=2**34) as offload, torch.no_grad():
        model(**{k: v.cuda() for k, v in batches[0].items()})
        model(**{k: v.cuda() for k, v in batches[0].items()})
        start, need = torch.cuda.memory_allocated(), offload.prefetcher.forward_need
    budget = start + need + int(2.5 * block)  # room for two blocks ahead beyond what one forward needs
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    depths = []
    with Offload(model, BLOCKS, "cuda", max_gpu_memory=budget) as offload, torch.no_grad():
        original = offload.prefetcher.prefetch_after

        def watched(*args):
            original(*args)
            depths.append(len(offload.prefetcher.ahead))

        offload.prefetcher.prefetch_after = watched
        for batch in batches:
            model(**{k: v.cuda() for k, v in batch.items()})
        peak = torch.cuda.max_memory_allocated()
    assert peak <= budget
    assert max(depths) == 2
    refusal = r"max_gpu_memory=0.00 GiB cannot hold .* raise max_gpu_memory above"
    with pytest.raises(BlockpruneError, match=refusal), Offload(model, BLOCKS, "cuda", max_gpu_memory=block // 2):
        pass
