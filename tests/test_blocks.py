"""Block discovery through the built-in adapters and the generic one; inspect()."""

import pytest
import torch
from conftest import (
    MODELS,
    SwapNet,
    TinyResidualNet,
    dit_batches,
    flux_batches,
    make_dit,
    make_flux,
    make_sd3,
    residual_net_batches,
    sd3_batches,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import blockprune
from blockprune import plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError, NotResidualError


def test_flux_blocks_are_double_then_single_with_text_and_image_streams():
    blocks = resolve_blocks(make_flux(), plugins.get_adapter(make_flux()), flux_batches(1)[0])
    assert [b.name for b in blocks] == ["transformer_blocks.0", "transformer_blocks.1",
                                        "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert all(b.spec.outputs == ("encoder_hidden_states", "hidden_states") for b in blocks)
    assert blocks[2].stream_shapes == {"encoder_hidden_states": (2, 6, 16), "hidden_states": (2, 16, 16)}


def test_sd3_last_block_has_only_the_image_stream():
    model = make_sd3()
    blocks = resolve_blocks(model, plugins.get_adapter(model, "sd3"), sd3_batches(1)[0])
    assert [b.spec.outputs for b in blocks] == [("encoder_hidden_states", "hidden_states")] * 3 + [(None, "hidden_states")]
    assert blocks[-1].stream_dims == {"hidden_states": 16}


def test_dit_keeps_the_embedding_its_forward_reads_from_block_zero():
    model = make_dit()
    blocks = resolve_blocks(model, plugins.get_adapter(model, "dit"), dit_batches(1)[0])
    assert [b.spec.outputs for b in blocks] == ["hidden_states"] * 4
    assert blocks[0].spec.kept_submodules == ("norm1.emb",) and blocks[1].spec.kept_submodules == ()


def test_auto_picks_the_adapter_by_class():
    assert plugins.get_adapter(make_flux(), "auto").name == "flux"
    assert plugins.get_adapter(make_sd3(), "auto").name == "sd3"
    assert plugins.get_adapter(make_dit(), "auto").name == "dit"


def test_generic_adapter_on_plain_torch_residual_model():
    model = TinyResidualNet(depth=3)
    blocks = resolve_blocks(model, plugins.get_adapter(model, "generic"), residual_net_batches(1)[0])
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(b.spec.outputs == "x" for b in blocks)  # `ctx` is context, not a stream


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generic_adapter_finds_what_the_declared_adapters_declare(name):
    make, batches = MODELS[name]
    model = make()
    declared = resolve_blocks(model, plugins.get_adapter(model, name), batches(1)[0])
    generic = resolve_blocks(model, plugins.get_adapter(model, "generic"), batches(1)[0])
    assert [(b.name, b.spec.outputs) for b in generic] == [(b.name, b.spec.outputs) for b in declared]


def test_generic_adapter_tells_same_shaped_streams_apart_by_similarity():
    model = SwapNet()
    batch = {"x": torch.randn(2, 5, 8), "y": torch.randn(2, 5, 8)}
    blocks = resolve_blocks(model, plugins.get_adapter(model, "generic"), batch)
    assert all(b.spec.outputs == ("second", "first") for b in blocks)


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim // 2)

    def forward(self, x):
        return self.proj(x)


def test_generic_adapter_explains_when_nothing_is_residual():
    model = nn.Sequential()
    model.layers = nn.ModuleList([Downsample(16), Downsample(8)])
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    with pytest.raises(BlockpruneError, match="no residual block list"):
        resolve_blocks(model, plugins.get_adapter(model, "generic"), {"x": torch.randn(2, 16)})


def test_declared_block_that_is_not_residual_is_named():
    class Bad(blockprune.Adapter):
        name = "bad"

        def matches(self, model):
            return True

        def block_lists(self, model):
            return ["layers"]

        def block_spec(self, name, block):
            return blockprune.BlockSpec(outputs="x")

    model = nn.Module()
    model.layers = nn.ModuleList([Downsample(16), Downsample(8)])
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    with pytest.raises(NotResidualError, match=r"block layers.0 is not residual in stream 'x'"):
        resolve_blocks(model, Bad(), {"x": torch.randn(2, 16)})


def test_inspect_reports_streams_parameters_and_flops():
    model = make_flux()
    batch = flux_batches(1)[0]
    infos = blockprune.inspect(model, adapter="flux", example_inputs=batch)
    assert [i.name for i in infos][:1] == ["transformer_blocks.0"]
    first = infos[0]
    assert first.streams["hidden_states"] == (2, 16, 16)
    assert first.parameters == sum(p.numel() for p in model.transformer_blocks[0].parameters())
    inputs = _block_inputs(model, batch)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.transformer_blocks[0](**inputs)
    assert first.flops == counter.get_total_flops() > 0
    # attention is counted (on CPU too): 4 · batch · heads · tokens² · head_dim for QKᵀ and AV
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert any("attention" in op for op in ops)
    total = FlopCounterMode(display=False)
    with total, torch.no_grad():
        model(**batch)
    assert 0.5 * total.get_total_flops() < sum(i.flops for i in infos) < total.get_total_flops()


def _block_inputs(model, batch):
    captured = {}
    handle = model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return captured
