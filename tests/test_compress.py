"""compress(): counts, order, progressive fitting, pipelines, plan, output."""

import logging

import pytest
import torch
from conftest import (
    MODELS,
    TinyResidualNet,
    flux_batches,
    make_flux,
    residual_net_batches,
)

import blockprune
from blockprune import LinearSurrogate, plugins
from blockprune.brll.fit import fit_affine
from blockprune.brll.recording import record_block
from blockprune.discovery.resolve import resolve_blocks
from blockprune.runtime.forward import output_tensor


def _outputs(model, batches):
    with torch.no_grad():
        return [output_tensor(model(**b)) for b in batches]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compress_replaces_a_quarter_of_the_blocks(name):
    make, batches = MODELS[name]
    model = make()
    calibration, held_out = batches(6), batches(2, seed=1)
    before = _outputs(model, held_out)
    params = sum(p.numel() for p in model.parameters())
    returned = blockprune.compress(model, adapter=name, ratio=0.25, calibration=calibration, sandwich=False, progress=False)
    assert returned is model
    plan = blockprune.plan(model)
    assert len(plan.replaced) == 1 == round(0.25 * len(plan.blocks))
    replaced = model.get_submodule(plan.replaced[0].name)
    assert isinstance(replaced, LinearSurrogate)
    assert plan.params_after == sum(p.numel() for p in model.parameters()) < params == plan.params_before
    assert plan.flops_after < plan.flops_before
    assert set(plan.scores) == set(plan.blocks)
    # the least important block by the plan's own scores is the one replaced
    assert plan.replaced[0].name == min(plan.scores, key=plan.scores.get)
    after = _outputs(model, held_out)
    assert all(torch.isfinite(a).all() for a in after)
    assert not all(torch.equal(a, b) for a, b in zip(after, before))  # the replaced block changed what comes out
    # least squares beats skipping the block (fit error 1) on the calibration tokens, per stream
    for report in plan.replaced[0].streams.values():
        assert 0 <= report.relative_error < 1


def test_flux_ratio_counts_follow_round():
    model = make_flux(double=2, single=8)  # 10 blocks
    blockprune.compress(model, ratio=0.34, calibration=flux_batches(2), sandwich=False, progress=False,
                        order="start2end")
    assert blockprune.plan(model).replaced_names == ["transformer_blocks.0", "transformer_blocks.1",
                                                     "single_transformer_blocks.0"]


def test_orders_end2start_and_explicit_list():
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(2), sandwich=False, progress=False, order="end2start")
    assert blockprune.plan(model).replaced_names == ["single_transformer_blocks.1", "single_transformer_blocks.0"]
    model = make_flux()
    order = ["single_transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.0"]
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(2), sandwich=False, progress=False, order=order)
    assert blockprune.plan(model).replaced_names == order[:2]
    assert blockprune.plan(model).scores == {}


def test_replacement_is_progressive():
    """The second block is fitted on activations of the model in which the first is already replaced."""
    calibration = flux_batches(4)
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=calibration, sandwich=False, progress=False, order="start2end")
    second = model.get_submodule("transformer_blocks.1").linears["hidden_states"]

    reference = make_flux()
    adapter = plugins.get_adapter(reference)
    blocks = resolve_blocks(reference, adapter, calibration[0])
    first_surrogate = model.get_submodule("transformer_blocks.0")
    reference.transformer_blocks[0] = first_surrogate  # the state after stage 1
    fit = fit_affine(record_block(reference, blocks[1], calibration)["hidden_states"], ridge=1e-6)
    torch.testing.assert_close(second.weight, fit.weight.float())

    stale = make_flux()  # fitted on the original model instead: a different answer
    stale_fit = fit_affine(record_block(stale, blocks[1], calibration)["hidden_states"], ridge=1e-6)
    assert not torch.allclose(stale_fit.weight.float(), second.weight, atol=1e-4)


def test_progress_false_prints_nothing_and_true_prints_the_plan(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="blockprune"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(2), sandwich=False, progress=False)
    assert capsys.readouterr().out == ""
    assert any("replaced" in r.message for r in caplog.records)
    blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(2), sandwich=False, progress=True)
    out = capsys.readouterr().out
    assert "blockprune plan: 1 of 4 blocks replaced (flux)" in out and "FLOPs" in out


def test_generator_calibration_is_used_for_every_pass():
    model = make_flux()
    blockprune.compress(model, ratio=0.25, calibration=(b for b in flux_batches(3)), sandwich=False, progress=False)
    report = blockprune.plan(model).replaced[0].streams["hidden_states"]
    assert report.tokens == 3 * 2 * 16  # batches × batch size × image tokens


def test_record_device_and_ridge_options_take_effect():
    calibration = flux_batches(2)
    model = make_flux()
    blockprune.compress(model, ratio=0.25, calibration=calibration, sandwich=False, progress=False,
                        record_device="cpu", ridge=1e-3)
    plan = blockprune.plan(model)
    assert (plan.config["ridge"], plan.config["record_device"]) == (1e-3, "cpu")
    name = plan.replaced[0].name
    surrogate = model.get_submodule(name)

    reference = make_flux()
    block = next(b for b in resolve_blocks(reference, plugins.get_adapter(reference), calibration[0]) if b.name == name)
    recorded = record_block(reference, block, calibration, device="cpu")
    assert set(recorded) == set(plan.replaced[0].streams) == {"encoder_hidden_states", "hidden_states"}
    for stream, accumulator in recorded.items():
        asked, default = fit_affine(accumulator, ridge=1e-3), fit_affine(accumulator, ridge=1e-6)
        torch.testing.assert_close(surrogate.linears[stream].weight, asked.weight.float())
        torch.testing.assert_close(surrogate.linears[stream].bias, asked.bias.float())
        assert not torch.allclose(surrogate.linears[stream].weight, default.weight.float(), atol=1e-4)
        assert plan.replaced[0].streams[stream].relative_error == pytest.approx(asked.relative_error)
        assert asked.relative_error > default.relative_error


def test_plain_torch_model_through_generic_adapter():
    model = TinyResidualNet(depth=4)
    blockprune.compress(model, adapter="generic", ratio=0.5, calibration=residual_net_batches(4), sandwich=False,
                        progress=False)
    assert sum(isinstance(layer, LinearSurrogate) for layer in model.layers) == 2
    assert torch.isfinite(model(**residual_net_batches(1)[0])).all()
