"""Generic discovery's mechanisms, each on a plain-torch model built to fool the simpler rule it replaced.

The diffusers families these patterns come from are in the coverage matrix (tests/test_coverage.py).
"""

import pytest
import torch
from blockprune_adapters.dit import DiTAdapter
from blockprune_adapters.flux import FluxAdapter
from conftest import dit_batches, flux_batches, make_dit, make_flux
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.prior_transformer import PriorTransformerOutput
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

import blockprune
from blockprune import LinearSurrogate, plugins
from blockprune.discovery.flops import count_flops
from blockprune.discovery.resolve import resolve_blocks
from blockprune.discovery.trace import trace_model
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import output_tensor


class Residual(nn.Module):
    """``x + W x``; ``scale`` multiplies the update (0 makes the block an identity)."""

    def __init__(self, dim: int = 8, scale: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.proj(x)


def generic_blocks(model: nn.Module, batch: dict) -> list:
    return resolve_blocks(model, plugins.get_adapter(model, "generic"), batch)


class CallerAddsNet(nn.Module):
    """Chroma's guidance approximator: ``x = x + layer(norm(x))``, the residual taken by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(3))
        self.blocks = nn.ModuleList(Residual() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        for block in self.blocks:
            x = block(x)
        return x


def test_lists_whose_outputs_the_caller_adds_are_not_block_lists():
    blocks = generic_blocks(CallerAddsNet(), {"x": torch.randn(2, 5, 8)})
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]


class SkipBlock(nn.Module):
    """HunyuanDiT's second-half block: mixes in a skip connection that dominates its output."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = x + 0.1 * self.proj(x)
        return out if skip is None else 0.1 * out + skip


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SkipBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.blocks[0](x)
        return self.blocks[2](self.blocks[1](first), skip=first)


def test_a_skip_from_an_earlier_block_is_context_even_when_more_similar_than_the_stream():
    model, batch = SkipNet(), {"x": torch.randn(2, 5, 8)}
    record = trace_model(model, ["blocks.2"], batch).records["blocks.2"]
    assert record.similarity[(0, "skip")] > record.similarity[(0, "x")]  # similarity alone would pick the skip
    assert [b.spec.outputs for b in generic_blocks(model, batch)] == ["x", "x", "x"]


class ContextBlock(nn.Module):
    """A block whose output is closer to a same-shaped context input than to its own stream."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.proj(x) + 3 * base


class HintBlock(nn.Module):
    """Wan VACE's hint block: returns a hint made from ``control`` and the updated ``control``."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, base: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        control = control + 0.1 * self.mix(control + base)
        return self.out(control), control


class ContextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hints = nn.ModuleList(HintBlock() for _ in range(2))
        self.blocks = nn.ModuleList(ContextBlock() for _ in range(3))

    def forward(self, x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        base = torch.tanh(x)
        hints = []
        for block in self.hints:
            hint, control = block(base, control)
            hints.append(hint)
        for block in self.blocks:
            x = block(x, base)
        return x + sum(hints)


def test_an_input_every_block_receives_unchanged_is_context():
    model, batch = ContextNet(), {"x": torch.randn(2, 5, 8), "control": torch.randn(2, 5, 8)}
    record = trace_model(model, ["blocks.0"], batch).records["blocks.0"]
    assert record.similarity[(0, "base")] > record.similarity[(0, "x")]
    blocks = generic_blocks(model, batch)
    # the hint list is skipped: with `base` as context its hint output has no stream
    assert [(b.name, b.spec.outputs) for b in blocks] == [(f"blocks.{i}", "x") for i in range(3)]


def test_blocks_that_are_still_identities_form_a_chain():
    model = nn.Module()
    model.blocks = nn.ModuleList(Residual(scale=0.0) for _ in range(3))
    model.forward = lambda x: model.blocks[2](model.blocks[1](model.blocks[0](x)))
    blocks = generic_blocks(model, {"x": torch.randn(2, 5, 8)})
    assert [b.spec.outputs for b in blocks] == ["x", "x", "x"]


class InterleavedNet(nn.Module):
    """Latte: spatial blocks over frames' tokens alternate with temporal blocks over each token's frames."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.spatial = nn.ModuleList(Residual() for _ in range(depth))
        self.temporal = nn.ModuleList(Residual() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (frames, tokens, dim)
        for spatial, temporal in zip(self.spatial, self.temporal):
            x = temporal(spatial(x).permute(1, 0, 2).contiguous()).permute(1, 0, 2).contiguous()
        return x


def test_interleaved_lists_with_reshapes_between_them_are_found_in_the_order_they_run():
    blocks = generic_blocks(InterleavedNet(), {"x": torch.randn(3, 5, 8)})
    assert [b.name for b in blocks] == ["spatial.0", "temporal.0", "spatial.1", "temporal.1", "spatial.2",
                                        "temporal.2"]


def test_blocks_are_ordered_as_they_run_whatever_order_an_adapter_lists_them_in():
    class SinglesFirst(FluxAdapter):
        def block_lists(self, model):
            return ["single_transformer_blocks", "transformer_blocks"]

    blocks = resolve_blocks(make_flux(), SinglesFirst(), flux_batches(1)[0])
    assert [b.name for b in blocks][:2] == ["transformer_blocks.0", "transformer_blocks.1"]


def test_generic_keeps_the_submodule_dit_calls_from_outside_block_zero(tmp_path):
    model = make_dit()
    blocks = generic_blocks(model, dit_batches(1)[0])
    assert [b.spec.kept_submodules for b in blocks] == [("norm1.emb",), (), (), ()]
    blockprune.compress(model, adapter="generic", ratio=0.25, calibration=dit_batches(2), sandwich=False,
                        progress=False, order=["transformer_blocks.0"])
    blockprune.save_pretrained(model, tmp_path)
    batch = dit_batches(1, seed=1)[0]
    with torch.no_grad():
        assert torch.equal(blockprune.from_pretrained(tmp_path)(**batch).sample, model(**batch).sample)


def test_a_declared_adapter_that_forgets_an_outside_call_is_told_which_submodule_to_keep():
    class Forgetful(DiTAdapter):
        def block_spec(self, name, block):
            return blockprune.BlockSpec(outputs="hidden_states")

    with pytest.raises(BlockpruneError, match=r"calls transformer_blocks\.0\.norm1\.emb outside block .*"
                                              r"kept_submodules=\('norm1\.emb',\)"):
        resolve_blocks(make_dit(), Forgetful(), dit_batches(1)[0])


def test_reading_a_replaced_blocks_submodule_names_the_fix():
    block = make_dit().transformer_blocks[1]
    surrogate = LinearSurrogate.for_block(block, blockprune.BlockSpec(outputs="hidden_states"), {"hidden_states": 16})
    with pytest.raises(AttributeError, match=r"reads 'norm1' of a replaced BasicTransformerBlock .*kept_submodules"):
        surrogate.norm1


class FlexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x).view(1, 1, -1, 8)
        return flex_attention(q, q, q).view(x.shape)


def test_flops_are_left_out_where_torchs_counter_cannot_run_the_model_and_the_model_still_runs():
    model, batch = FlexNet(), {"x": torch.randn(4, 8)}
    assert count_flops(model, batch) is None
    with torch.no_grad():
        assert model(**batch).shape == (4, 8)


def test_a_forward_that_fails_without_the_counter_too_still_raises():
    model = FlexNet()
    with pytest.raises(BlockpruneError, match="rejected calibration batch"):
        count_flops(model, {"x": torch.randn(3, 5)})


def test_output_tensor_reads_outputs_without_sample_and_per_sample_lists():
    embedding = torch.randn(2, 8)
    assert output_tensor(PriorTransformerOutput(predicted_image_embedding=embedding)) is embedding
    first, second = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    flat = output_tensor(Transformer2DModelOutput(sample=[first, second]))
    assert torch.equal(flat, torch.cat([first.flatten(), second.flatten()]))
