"""BRLL's least-squares fit: exactness, agreement with numpy, ill-conditioned systems."""

import numpy as np
import pytest
import torch
from conftest import flux_batches, make_flux

from blockprune import IllConditionedWarning
from blockprune.brll.fit import fit_affine
from blockprune.brll.recording import StreamAccumulator, record_block
from blockprune.discovery.spec import Block, BlockSpec


def test_accumulator_matches_direct_normal_equations():
    torch.manual_seed(0)
    acc = StreamAccumulator(5)
    xs, ys = [torch.randn(3, 7, 5) for _ in range(4)], [torch.randn(3, 7, 5) for _ in range(4)]
    for x, y in zip(xs, ys):
        acc.update(x, y)
    x = torch.cat([t.reshape(-1, 5) for t in xs]).double()
    r = torch.cat([t.reshape(-1, 5) for t in ys]).double() - x
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    ztz, ztr, rr = acc.normal_equations()
    torch.testing.assert_close(ztz, z.T @ z)
    torch.testing.assert_close(ztr, z.T @ r)
    assert rr == pytest.approx(float((r * r).sum()))
    assert acc.tokens == 84


def test_exactly_affine_residual_is_recovered():
    torch.manual_seed(0)
    d = 12
    weight, bias = torch.randn(d, d, dtype=torch.float64) * 0.3, torch.randn(d, dtype=torch.float64)
    acc = StreamAccumulator(d)
    for _ in range(5):
        x = torch.randn(64, d, dtype=torch.float64)
        acc.update(x, x + x @ weight.T + bias)
    fit = fit_affine(acc, ridge=1e-12)
    assert float((fit.weight - weight).norm() / weight.norm()) < 1e-6
    assert float((fit.bias - bias).norm() / bias.norm()) < 1e-6
    assert fit.relative_error < 1e-10


def test_fit_on_flux_block_matches_numpy_lstsq():
    model = make_flux(double=1, single=1)
    block = Block("single_transformer_blocks.0", "FluxSingleTransformerBlock",
                  BlockSpec(outputs=("encoder_hidden_states", "hidden_states")),
                  {"encoder_hidden_states": (2, 6, 16), "hidden_states": (2, 16, 16)})
    batches = flux_batches(12)
    accumulators = record_block(model, block, batches)
    xs, ys = [], []

    def keep(module, args, kwargs, output):
        xs.append(kwargs["hidden_states"])
        ys.append(output[1])

    hook = model.single_transformer_blocks[0].register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    x = torch.cat(xs).reshape(-1, 16).double().numpy()
    r = torch.cat(ys).reshape(-1, 16).double().numpy() - x
    assert len(x) > 17 * 10  # well over d + 1 tokens
    z = np.concatenate([x, np.ones((len(x), 1))], 1)
    theta, *_ = np.linalg.lstsq(z, r, rcond=None)
    numpy_error = float(((r - z @ theta) ** 2).sum() / (r**2).sum())
    fit = fit_affine(accumulators["hidden_states"])
    ours = np.concatenate([fit.weight.T.numpy(), fit.bias[None].numpy()])
    our_error = float(((r - z @ ours) ** 2).sum() / (r**2).sum())
    assert our_error == pytest.approx(numpy_error, rel=0.01)
    assert fit.relative_error == pytest.approx(our_error, rel=1e-6)


@pytest.mark.parametrize("case", ["few_tokens", "dead_channels"])
def test_ill_conditioned_systems_give_finite_answer_and_warning(case):
    torch.manual_seed(0)
    d = 16
    acc = StreamAccumulator(d)
    x = torch.randn(5 if case == "few_tokens" else 100, d)
    if case == "dead_channels":
        x[:, :6] = 0
    acc.update(x, x + torch.randn_like(x))
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        fit = fit_affine(acc, name="block.0/hidden_states")
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()
    assert 0 <= fit.relative_error <= 1


def test_no_tokens_and_negative_ridge_are_refused():
    with pytest.raises(ValueError, match="no tokens"):
        fit_affine(StreamAccumulator(4))
    acc = StreamAccumulator(4)
    acc.update(torch.randn(10, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="ridge"):
        fit_affine(acc, ridge=-1)


def test_blocks_fitted_in_one_pass_equal_their_fits_one_by_one_with_fewer_block_runs(monkeypatch):
    from blockprune.brll.replacement import fit_surrogate, fit_surrogates
    from blockprune.discovery.resolve import resolve_blocks
    from blockprune.plugins import get_adapter
    from blockprune.runtime.hooks import attached
    from blockprune.scoring import ScoringContext, base

    model, batches = make_flux(double=2, single=4), flux_batches(3)
    blocks = resolve_blocks(model, get_adapter(model), batches[0])
    runs = {"n": 0}

    def count(module, args, kwargs, output):
        runs["n"] += 1

    with attached(model, {blocks[0].name: count}):
        together = fit_surrogates(model, blocks, batches)
        assert runs["n"] == len(batches)  # the first block ran once per batch for all six
        for block in blocks:
            alone, reports = fit_surrogate(model, block, batches)
            assert together[block.name][1] == reports
            for (key, a), b in zip(alone.state_dict().items(), together[block.name][0].state_dict().values()):
                assert torch.equal(a, b), key
        assert runs["n"] == len(batches) * (1 + len(blocks))
    # a scoring context fits the blocks after the one asked for in the same pass, within FIT_GROUP_BYTES
    context = ScoringContext(model, get_adapter(model), blocks, batches)
    context.fitted(blocks[1])
    assert set(context.surrogates) == {b.name for b in blocks[1:]}
    monkeypatch.setattr(base, "FIT_GROUP_BYTES", 2 * base._equations_bytes(blocks[0]))
    context = ScoringContext(model, get_adapter(model), blocks, batches)
    context.fitted(blocks[0])
    assert set(context.surrogates) == {blocks[0].name, blocks[1].name}
