"""Ablation scoring that skips the blocks before the ablated one (blockprune.scoring.prefix): the same values as
whole forwards, fewer block runs, and whole forwards for a model whose blocks are not a chain."""

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

from blockprune.discovery.resolve import resolve_blocks
from blockprune.plugins import get_adapter
from blockprune.runtime.forward import forward_batch, output_tensor
from blockprune.runtime.hooks import attached
from blockprune.scoring import ScoringContext, ablated, resolve_metrics, score_blocks

RUNS = {"n": 0}  # block forwards run


def _count(module, args, kwargs, output):
    RUNS["n"] += 1


def _whole_forward_errors(model, blocks, batches, ablation, context):
    """output_mse by its definition: every batch through the whole model with the block ablated."""
    with attached(model, {b.name: _count for b in blocks}), torch.no_grad():
        expected = [output_tensor(forward_batch(model, b, i)).float() for i, b in enumerate(batches)]
        errors = {}
        for block in blocks:
            surrogate = context.fitted(block)[0] if ablation == "replace" else None
            with ablated(model, block, ablation, surrogate=surrogate):
                got = [output_tensor(forward_batch(model, b, i)).float() for i, b in enumerate(batches)]
            errors[block.name] = float(sum(((g - e) ** 2).sum() for g, e in zip(got, expected))
                                       / sum((e**2).sum() for e in expected))
    return errors


def _adapter(model):
    return get_adapter(model, "generic" if isinstance(model, TinyResidualNet) else "auto")


def _score(model, batches, ablation):
    blocks = resolve_blocks(model, _adapter(model), batches[0])
    context = ScoringContext(model, _adapter(model), blocks, batches, options={"ridge": 1e-6})
    _, metrics = resolve_metrics("output_mse")
    if ablation == "replace":
        for block in blocks:  # fitted first, so that the block runs counted are the scoring's
            context.fitted(block)
    RUNS["n"] = 0
    with attached(model, {b.name: _count for b in blocks}), torch.no_grad():
        values = score_blocks(context, metrics, ablation=ablation)["output_mse"]
    runs, RUNS["n"] = RUNS["n"], 0
    return values, _whole_forward_errors(model, blocks, batches, ablation, context), runs, RUNS["n"]


@pytest.mark.parametrize("ablation", ["remove", "replace"])
@pytest.mark.parametrize("make,batches", [(lambda: make_flux(double=2, single=10), lambda: flux_batches(3)),
                                          (lambda: make_sd3(layers=12), lambda: sd3_batches(3)),
                                          (lambda: make_dit(layers=12), lambda: dit_batches(3))],
                         ids=["flux", "sd3", "dit"])
def test_output_mse_skips_the_blocks_before_the_ablated_one_and_scores_as_whole_forwards(make, batches, ablation):
    model, data = make(), batches()
    values, whole, runs, whole_runs = _score(model, data, ablation)
    assert values.keys() == whole.keys() and len(values) == 12
    for name in values:
        assert values[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-12)
    # with 12 blocks: 66 of the 132 block runs per batch the ablations take, 11 to keep the inputs, 2 x 12 to check
    assert runs < 0.7 * whole_runs


class SkipNet(TinyResidualNet):
    """A long skip: the last block's input adds the first block's output, which is not read through the chain."""

    def forward(self, inputs, scale):
        x = self.embed(inputs)
        first = None
        for index, layer in enumerate(self.layers):
            if index == len(self.layers) - 1:
                x = x + first
            x = layer(x, scale)
            first = x if index == 0 else first
        return self.head(x)


def test_a_model_with_a_long_skip_is_scored_by_whole_forwards():
    from blockprune.scoring.prefix import Prefix

    torch.manual_seed(0)
    model, data = SkipNet(dim=16, depth=4).eval(), residual_net_batches(3)
    blocks = resolve_blocks(model, _adapter(model), data[0])
    with torch.no_grad():
        assert not Prefix(model, blocks, data).exact
        assert Prefix(TinyResidualNet(dim=16, depth=4).eval(), blocks, data).exact  # the same blocks in a chain
    values, whole, runs, whole_runs = _score(model, data, "remove")
    assert values == pytest.approx(whole, rel=1e-6) and runs > whole_runs  # the check's forwards on top
