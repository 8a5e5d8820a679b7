"""fuse(): runs of replaced blocks collapse into one affine map per stream, equal to the chain up to rounding."""

import copy
import json

import pytest
import torch
from conftest import (
    TinyResidualNet,
    dit_batches,
    flux_batches,
    make_dit,
    make_flux,
    make_sd3,
    residual_net_batches,
    sd3_batches,
)
from safetensors.torch import load_file

import blockprune
from blockprune import LinearSurrogate
from blockprune.brll.fusion import compose_affine
from blockprune.discovery.flops import count_flops, count_parameters
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import output_tensor

# fp32 on CPU: the fused map is composed in float64 and rounded once to float32, the chain rounds after
# every map, so the outputs (of size ~1) differ by a few float32 ulps; measured ≤ 5e-7.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _compressed(make, batches, name, order):
    model = make()
    ratio = len(order) / len(_all_blocks(model, name))
    blockprune.compress(model, adapter=name, ratio=ratio, calibration=batches(4), sandwich=False, progress=False,
                        order=order)
    return model


def _all_blocks(model, name):
    lists = {"flux": ["transformer_blocks", "single_transformer_blocks"]}.get(name, ["transformer_blocks"])
    return [f"{path}.{i}" for path in lists for i in range(len(model.get_submodule(path)))]


def _assert_fused_equals_chain(model, held_out):
    fused = blockprune.fuse(copy.deepcopy(model))
    with torch.no_grad():
        for batch in held_out:
            torch.testing.assert_close(output_tensor(fused(**batch)), output_tensor(model(**batch)), **TOLERANCE)
    return fused


def test_compose_affine_is_the_chain_in_float64():
    g = torch.Generator().manual_seed(0)
    maps = [
        (torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.3, torch.randn(6, generator=g, dtype=torch.float64))
        for _ in range(3)
    ]
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    chained = x
    for weight, bias in maps:
        chained = chained + chained @ weight.T + bias
    weight, bias = compose_affine(maps)
    torch.testing.assert_close(x + x @ weight.T + bias, chained, rtol=1e-12, atol=1e-12)
    w1, b1 = maps[0]
    w2, b2 = maps[1]
    weight, bias = compose_affine(maps[:2])
    torch.testing.assert_close(weight, w1 + w2 + w2 @ w1)
    torch.testing.assert_close(bias, b1 + w2 @ b1 + b2)


def test_flux_run_across_the_double_single_boundary():
    order = ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    model = _compressed(lambda: make_flux(double=2, single=3), flux_batches, "flux", order)
    fused = _assert_fused_equals_chain(model, flux_batches(2, seed=5))
    runs = blockprune.plan(fused).fused
    assert [(r.stream, r.blocks) for r in runs] == [("encoder_hidden_states", order), ("hidden_states", order)]
    first, *others = (fused.get_submodule(name) for name in order)
    assert set(first.linears) == {"encoder_hidden_states", "hidden_states"}
    assert all(isinstance(m, LinearSurrogate) and len(m.linears) == 0 for m in others)
    assert "passes through=['encoder_hidden_states', 'hidden_states']" in repr(others[0])
    # pass-through modules return their inputs themselves: no matmul
    x, text = torch.randn(1, 3, 16), torch.randn(1, 2, 16)
    out_text, out_x = others[0](hidden_states=x, encoder_hidden_states=text, temb=None, image_rotary_emb=None)
    assert out_text is text and out_x is x


def test_flux_fused_plan_counts_parameters_and_flops_exactly():
    order = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.1"]
    model = _compressed(make_flux, flux_batches, "flux", order)
    fused = _assert_fused_equals_chain(model, flux_batches(1, seed=5))
    before, after = blockprune.plan(model), blockprune.plan(fused)
    assert [r.blocks for r in after.fused] == [order[:2], order[:2]]  # single.0 is kept: two runs would need it
    assert after.params_after == count_parameters(fused) == before.params_after - 2 * (16 * 16 + 16)
    assert after.flops_after == count_flops(fused, flux_batches(4)[0]) < before.flops_after


def test_sd3_last_block_ends_the_text_stream():
    order = ["transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.3"]  # 3 is context_pre_only
    model = _compressed(make_sd3, sd3_batches, "sd3", order)
    fused = _assert_fused_equals_chain(model, sd3_batches(2, seed=5))
    runs = {r.stream: r.blocks for r in blockprune.plan(fused).fused}
    assert runs == {"encoder_hidden_states": order[:2], "hidden_states": order}
    last = fused.transformer_blocks[3]
    assert len(last.linears) == 0
    x = torch.randn(1, 4, 16)
    out_text, out_x = last(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, 16), temb=None)
    assert out_text is None and out_x is x


def test_sd3_last_block_alone_with_its_neighbour():
    order = ["transformer_blocks.2", "transformer_blocks.3"]
    model = _compressed(make_sd3, sd3_batches, "sd3", order)
    fused = _assert_fused_equals_chain(model, sd3_batches(2, seed=5))
    assert [(r.stream, r.blocks) for r in blockprune.plan(fused).fused] == [("hidden_states", order)]
    assert set(fused.transformer_blocks[2].linears) == {"encoder_hidden_states", "hidden_states"}


def test_dit_run_from_block_zero_keeps_the_embedding():
    order = ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    model = _compressed(make_dit, dit_batches, "dit", order)
    fused = _assert_fused_equals_chain(model, dit_batches(2, seed=5))
    assert hasattr(fused.transformer_blocks[0], "norm1")
    assert [r.blocks for r in blockprune.plan(fused).fused] == [order]


def test_fused_round_trip_is_bit_exact(tmp_path):
    order = ["transformer_blocks.1", "single_transformer_blocks.0"]
    model = _compressed(make_flux, flux_batches, "flux", order)
    blockprune.save_pretrained(model, tmp_path, fuse=True)  # fuses the model in place first
    assert blockprune.plan(model).fused
    manifest = json.loads((tmp_path / "blockprune.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["plan"]["fused"] == [{"stream": "encoder_hidden_states", "blocks": order},
                                         {"stream": "hidden_states", "blocks": order}]
    assert [e["streams"] for e in manifest["replaced"]] == [
        {"encoder_hidden_states": [16, 16], "hidden_states": [16, 16]}, {}]
    assert not any(k.startswith("single_transformer_blocks.0.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = blockprune.from_pretrained(tmp_path)
    assert blockprune.plan(loaded).fused == blockprune.plan(model).fused
    assert len(loaded.single_transformer_blocks[0].linears) == 0
    with torch.no_grad():
        for batch in flux_batches(2, seed=5):
            assert torch.equal(output_tensor(loaded(**batch)), output_tensor(model(**batch)))


def test_save_does_not_fuse_by_default(tmp_path):
    model = _compressed(make_flux, flux_batches, "flux", ["transformer_blocks.0", "transformer_blocks.1"])
    blockprune.save_pretrained(model, tmp_path)
    assert blockprune.plan(model).fused == []
    assert json.loads((tmp_path / "blockprune.json").read_text())["format_version"] == 1


def test_fusing_twice_is_a_no_op():
    model = _compressed(make_flux, flux_batches, "flux", ["transformer_blocks.0", "transformer_blocks.1"])
    blockprune.fuse(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = list(blockprune.plan(model).fused)
    assert blockprune.fuse(model) is model
    assert blockprune.plan(model).fused == runs
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_blocks_that_are_not_adjacent_are_left_alone():
    model = _compressed(make_flux, flux_batches, "flux", ["transformer_blocks.0", "single_transformer_blocks.0"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blockprune.fuse(model)
    assert blockprune.plan(model).fused == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_fuse_refuses_adapters_that_do_not_chain_streams_and_uncompressed_models():
    model = TinyResidualNet(depth=4)
    blockprune.compress(model, adapter="generic", ratio=0.5, calibration=residual_net_batches(4), sandwich=False,
                        progress=False, order="start2end")
    with pytest.raises(BlockpruneError, match=r"'generic' adapter does not declare .*Adapter.chains_streams_by_name"):
        blockprune.fuse(model)
    with pytest.raises(BlockpruneError, match="was not compressed by blockprune"):
        blockprune.fuse(make_flux())


def test_surrogate_rejects_a_map_for_a_stream_its_block_lacks():
    spec = blockprune.BlockSpec(outputs=(None, "hidden_states"))
    block = make_sd3().transformer_blocks[3]
    with pytest.raises(BlockpruneError, match="stream 'encoder_hidden_states' is not a stream of the replaced block"):
        LinearSurrogate.for_block(block, spec, {"hidden_states": 16, "encoder_hidden_states": 16})


@pytest.mark.parametrize("source", ["folder", "model"])
def test_reuse_from_a_fused_model_is_refused(source, tmp_path):
    higher = _compressed(make_flux, flux_batches, "flux", ["transformer_blocks.0", "transformer_blocks.1"])
    blockprune.save_pretrained(higher, tmp_path, fuse=True)
    with pytest.raises(BlockpruneError, match="reuse_from was fused .* its per-block linear maps are gone"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(2), progress=False,
                            reuse_from=tmp_path if source == "folder" else higher)
