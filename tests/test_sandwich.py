"""Sandwich training: spans, training effect, overlap, save/load, reuse, bad input."""

import copy

import pytest
import torch
from conftest import MODELS, flux_batches, make_flux
from safetensors.torch import load_file

import blockprune
from blockprune.errors import BlockpruneError, SandwichDivergedError
from blockprune.runtime.forward import output_tensor
from blockprune.sandwich import sandwich_span
from blockprune.sandwich.span import free_outputs

NAMES = [f"b{i}" for i in range(8)]
TRAIN = {"sandwich_steps": 25, "sandwich_lr": 3e-3, "heal_steps": 0, "progress": False, "cache_dir": False}


@pytest.mark.parametrize(
    "replaced, index, width, span",
    [
        ({"b3"}, 3, 3, ["b2", "b3", "b4"]),
        ({"b3", "b4"}, 4, 3, ["b2", "b3", "b4", "b5"]),  # overlap: the earlier linear layer is inside
        ({"b3", "b4"}, 4, 1, ["b3", "b4"]),  # width 1: the linear layers alone
        ({"b1", "b3"}, 3, 5, ["b0", "b1", "b2", "b3", "b4", "b5"]),  # two neighbours per side
        ({"b0"}, 0, 3, ["b0", "b1"]),  # one-sided at the start
        ({"b7", "b5"}, 7, 5, ["b4", "b5", "b6", "b7"]),  # one-sided at the end
    ],
)
def test_span(replaced, index, width, span):
    assert sandwich_span(NAMES, replaced, index, width) == span


@pytest.mark.parametrize(
    "replaced, index, free, span",
    [
        # b4's stage trained b3 to serve b5: b2's span ends where b4's did, not at b3
        ({"b4", "b2"}, 2, {"b3", "b4"}, ["b1", "b2", "b3", "b4", "b5"]),
        ({"b4", "b2"}, 2, {"b3", "b4", "b5", "b6"}, ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]),  # to the first anchored
        ({"b6"}, 6, {"b7"}, ["b5", "b6", "b7"]),  # the end of the stack
        ({"b2"}, 2, {"b1", "b0"}, ["b1", "b2", "b3"]),  # free blocks before the span change nothing
    ],
)
def test_a_span_ending_at_a_free_output_runs_on_to_an_anchored_one(replaced, index, free, span):
    assert sandwich_span(NAMES, replaced, index, 3, free) == span


def test_free_outputs_are_every_block_of_a_trained_span_but_its_last():
    assert free_outputs([["b3", "b4", "b5"]]) == {"b3", "b4"}
    assert free_outputs([["b3", "b4", "b5"], ["b1", "b2", "b3", "b4", "b5"]]) == {"b1", "b2", "b3", "b4"}
    assert free_outputs([["b3", "b4", "b5"], ["b5", "b6", "b7"]]) == {"b3", "b4", "b5", "b6"}  # b5 trained again
    assert free_outputs([["b1", "b2", "b3"], ["b0", "b1"]]) == {"b0", "b2"}  # b1 trained towards the unpruned again


def test_a_stage_whose_neighbour_an_earlier_stage_trained_for_later_blocks_trains_to_where_that_stage_ended():
    # stage 1 trains single_transformer_blocks.0 (LoRA) to serve .2 through the linear .1; stage 2's paper span
    # would end at .0 and pull it back towards the unpruned block, undoing that: it ends at .2 instead
    order = ["single_transformer_blocks.1", "transformer_blocks.1"]
    model = make_flux(double=2, single=4)
    blockprune.compress(model, ratio=0.3, calibration=flux_batches(8), order=order, **TRAIN)
    first, second = blockprune.plan(model).stages
    assert first.best_step > 0 and first.span == [f"single_transformer_blocks.{i}" for i in range(3)]
    assert second.span == ["transformer_blocks.0", "transformer_blocks.1", *first.span]
    assert second.lora_blocks == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.2"]
    assert second.trained_surrogates == ["transformer_blocks.1", "single_transformer_blocks.1"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_lowers_the_held_out_span_error(name):
    make, batches = MODELS[name]
    model = make()
    # with 16 batches: 8 fit the least squares, 6 train, 2 are held out (with fewer, training overfits)
    blockprune.compress(model, adapter=name, ratio=0.25, calibration=batches(16), order="start2end",
                        sandwich_steps=60, sandwich_lr=1e-3, heal_steps=0, progress=False, cache_dir=False)
    (stage,) = blockprune.plan(model).stages
    assert stage.relative_error_after < stage.relative_error_before
    assert stage.loss_after < stage.loss_before
    assert stage.peak_memory_bytes is None  # CPU


def _weights(model, name):
    return {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}


def test_overlap_trains_both_linear_layers_with_lora_on_the_nearest_unreplaced_blocks():
    model = make_flux(double=2, single=3)  # transformer_blocks.0-1, single_transformer_blocks.0-2
    calibration = flux_batches(8)
    # stage 1 replaces transformer_blocks.1; stage 2 replaces single_transformer_blocks.0 right after it
    order = ["transformer_blocks.1", "single_transformer_blocks.0"]
    reference = make_flux(double=2, single=3)
    blockprune.compress(reference, ratio=0.2, calibration=calibration, order=order, **TRAIN)
    before_stage_two = {n: _weights(reference, n) for n in
                        ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.1",
                         "single_transformer_blocks.2"]}
    blockprune.compress(model, ratio=0.4, calibration=calibration, order=order, **TRAIN)
    stage = blockprune.plan(model).stages[1]
    assert stage.span == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                          "single_transformer_blocks.1"]
    assert stage.lora_blocks == ["transformer_blocks.0", "single_transformer_blocks.1"]
    assert stage.trained_surrogates == ["transformer_blocks.1", "single_transformer_blocks.0"]
    # stage 1 is identical in both runs, so differences come from stage 2
    changed = {n: any(not torch.equal(v, _weights(model, n)[k]) for k, v in w.items())
               for n, w in before_stage_two.items()}
    assert changed == {"transformer_blocks.0": True, "transformer_blocks.1": True,
                       "single_transformer_blocks.1": True, "single_transformer_blocks.2": False}
    # LoRA deltas of attention/MLP projections only: the adaLN modulation of the neighbour is untouched
    assert torch.equal(model.transformer_blocks[0].norm1.linear.weight,
                       before_stage_two["transformer_blocks.0"]["norm1.linear.weight"])
    assert not torch.equal(model.transformer_blocks[0].attn.to_q.weight,
                           before_stage_two["transformer_blocks.0"]["attn.to_q.weight"])


def test_width_one_trains_only_linear_layers_and_width_five_reaches_further():
    model = make_flux(double=2, single=3)
    blockprune.compress(model, ratio=0.2, calibration=flux_batches(6), order=["single_transformer_blocks.0"],
                        sandwich_width=1, **TRAIN)
    stage = blockprune.plan(model).stages[0]
    assert stage.span == ["single_transformer_blocks.0"] and stage.lora_blocks == []
    model = make_flux(double=2, single=3)
    blockprune.compress(model, ratio=0.2, calibration=flux_batches(6), order=["single_transformer_blocks.0"],
                        sandwich_width=5, **TRAIN)
    assert blockprune.plan(model).stages[0].lora_blocks == ["transformer_blocks.0", "transformer_blocks.1",
                                                           "single_transformer_blocks.1", "single_transformer_blocks.2"]


def test_global_target_differs_from_local():
    # the second span (single_transformer_blocks.1 alone) sees drift from the first replacement upstream:
    # "local" targets the original block on the drifted input, "global" the unpruned model's activation
    results = {}
    for target in ("local", "global"):
        model = make_flux()
        blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), sandwich_width=1,
                            order=["transformer_blocks.0", "single_transformer_blocks.1"], sandwich_target=target,
                            **TRAIN)
        results[target] = blockprune.plan(model).stages[1].relative_error_before
        assert blockprune.plan(model).sandwich["target"] == target
    assert results["local"] != results["global"]  # the same span measured against other targets


def test_saved_model_has_no_lora_and_round_trip_is_exact(tmp_path):
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(6), **TRAIN)
    assert not any("lora" in name for name, _ in model.named_modules())
    blockprune.save_pretrained(model, tmp_path)
    assert not any("lora" in key for key in load_file(tmp_path / "model.safetensors"))
    loaded = blockprune.from_pretrained(tmp_path)
    batch = flux_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**batch)), output_tensor(model(**batch)))
    assert [s.block for s in blockprune.plan(loaded).stages] == blockprune.plan(model).replaced_names


def test_spilling_activations_to_disk_gives_the_same_model():
    in_memory, spilled = make_flux(), make_flux()
    blockprune.compress(in_memory, ratio=0.25, calibration=flux_batches(6), order="start2end", **TRAIN)
    blockprune.compress(spilled, ratio=0.25, calibration=flux_batches(6), order="start2end",
                        sandwich_activation_budget=1, **TRAIN)
    assert blockprune.plan(spilled).stages[0].spilled_items > 0
    assert blockprune.plan(in_memory).stages[0].spilled_items == 0
    for (name, a), (_, b) in zip(in_memory.state_dict().items(), spilled.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("source", ["folder", "model"])
def test_reuse_assembles_the_lower_ratio_from_the_higher_run(source, tmp_path):
    higher = make_flux(double=2, single=2)
    blockprune.compress(higher, ratio=0.5, calibration=flux_batches(6), **TRAIN)
    blockprune.save_pretrained(higher, tmp_path)
    high_plan = blockprune.plan(higher)
    lower = make_flux(double=2, single=2)
    untouched = copy.deepcopy(lower)
    blockprune.compress(lower, ratio=0.25, calibration=flux_batches(2), progress=False,
                        reuse_from=tmp_path if source == "folder" else higher)
    plan = blockprune.plan(lower)
    first = high_plan.replaced_names[0]
    assert plan.replaced_names == [first]
    for key, value in higher.get_submodule(first).state_dict().items():
        assert torch.equal(lower.get_submodule(first).state_dict()[key], value)
    # the first stage's LoRA deltas are merged into the blocks it trained (which are kept here)
    for neighbour in high_plan.stages[0].lora_blocks:
        if neighbour != high_plan.replaced_names[1]:
            assert not torch.equal(lower.get_submodule(neighbour).attn.to_q.weight,
                                   untouched.get_submodule(neighbour).attn.to_q.weight)
    assert plan.stages == high_plan.stages[:1] and plan.reused_from is not None


def test_reuse_from_a_lower_ratio_is_refused(tmp_path):
    lower = make_flux()
    blockprune.compress(lower, ratio=0.25, calibration=flux_batches(4), **TRAIN)
    with pytest.raises(BlockpruneError, match="reuse_from replaced 1 blocks; this ratio needs 2"):
        blockprune.compress(make_flux(), ratio=0.5, calibration=flux_batches(2), reuse_from=lower, progress=False)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("sandwich_width", 2, "sandwich_width must be 1, 3 or 5, got 2"),
        ("sandwich_steps", 0, "sandwich_steps must be a positive integer, got 0"),
        ("sandwich_lr", -1e-3, "sandwich_lr must be a positive number, got -0.001"),
        ("sandwich_batch_size", 0, "sandwich_batch_size must be a positive integer, got 0"),
        ("sandwich_target", "both", "sandwich_target must be 'local' or 'global'"),
    ],
)
def test_bad_sandwich_options(option, value, message):
    with pytest.raises(BlockpruneError, match=message):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(4), progress=False, **{option: value})


def test_too_few_batches_for_sandwich():
    with pytest.raises(BlockpruneError, match="sandwich training needs at least 3 calibration batches"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(2), progress=False)


def test_nan_loss_rolls_the_stage_back_and_keeps_earlier_stages():
    model = make_flux()
    order = ["transformer_blocks.0", "single_transformer_blocks.1"]
    good = make_flux()
    blockprune.compress(good, ratio=0.25, calibration=flux_batches(6), order=order[:1], **TRAIN)

    calls = {"n": 0}
    original_backward = torch.Tensor.backward

    def poisoned(self, *args, **kwargs):  # the second stage's first step produces a NaN gradient
        calls["n"] += 1
        original_backward(self, *args, **kwargs)
        if calls["n"] > TRAIN["sandwich_steps"]:
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))

    torch.Tensor.backward = poisoned
    try:
        with pytest.raises(SandwichDivergedError, match="sandwich training of block single_transformer_blocks.1 diverged"):
            blockprune.compress(model, ratio=0.5, calibration=flux_batches(6), order=order, **TRAIN)
    finally:
        torch.Tensor.backward = original_backward
    assert blockprune.plan(model).replaced_names == order[:1]
    for (name, a), (_, b) in zip(model.state_dict().items(), good.state_dict().items()):
        assert torch.equal(a, b), name


def test_identity_surrogate_deletes_blocks_and_sandwich_training_leaves_them_deleted(tmp_path):
    model = make_flux()
    batches = flux_batches(8)
    blockprune.compress(model, adapter="flux", ratio=0.25, calibration=batches, order="start2end", surrogate="identity",
                        **TRAIN)
    plan = blockprune.plan(model)
    assert plan.surrogate == "identity" and plan.stages
    for name in plan.replaced_names:
        surrogate = model.get_submodule(name)
        assert all(float(p.abs().max()) == 0 for p in surrogate.linears.parameters())  # Y = X after training too
        assert all(r.relative_error == 1.0 for r in plan.replaced[0].streams.values())
    assert any(stage.lora_blocks for stage in plan.stages)  # the neighbours were trained
    blockprune.save_pretrained(model, tmp_path / "deleted")
    loaded = blockprune.from_pretrained(tmp_path / "deleted")
    assert blockprune.plan(loaded).surrogate == "identity"
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(loaded(**batches[0])), output_tensor(model(**batches[0])))


def test_train_surrogates_false_keeps_the_least_squares_fit():
    batches = flux_batches(8)
    models = {}
    for steps in (1, 25):  # the same seeded split, so the same fit; only training could tell them apart
        models[steps] = make_flux()
        blockprune.compress(models[steps], adapter="flux", ratio=0.25, calibration=batches, order="start2end",
                            sandwich_train_surrogates=False, **{**TRAIN, "sandwich_steps": steps})
    (name,) = blockprune.plan(models[25]).replaced_names
    assert blockprune.plan(models[25]).stages[0].trained_surrogates == []
    for key, value in models[1].get_submodule(name).state_dict().items():
        torch.testing.assert_close(models[25].get_submodule(name).state_dict()[key], value, rtol=0, atol=0)
    kept = blockprune.plan(models[25]).stages[0].lora_blocks[0]
    assert not torch.equal(models[1].get_submodule(kept).ff.net[2].weight, models[25].get_submodule(kept).ff.net[2].weight)


@pytest.mark.parametrize("options, message", [
    ({"surrogate": "zero"}, "unknown surrogate 'zero'; use one of 'identity', 'linear'"),
    ({"sandwich_train_surrogates": "no"}, "sandwich_train_surrogates must be True or False"),
])
def test_bad_surrogate_options(options, message):
    model = make_flux()
    with pytest.raises(BlockpruneError, match=message):
        blockprune.compress(model, adapter="flux", ratio=0.25, calibration=flux_batches(2), **options,
                            progress=False, cache_dir=False)
