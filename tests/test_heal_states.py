"""What global healing trains on: the compressed model's own sampling trajectory, the unpruned model's outputs there."""

import copy

import pytest
import torch
from conftest import dit_batches, flux_batches, make_dit, make_flux

import blockprune
from blockprune import plugins
from blockprune.errors import UnusedOptionWarning
from blockprune.plan import plan as plan_of
from blockprune.report import stages_table
from blockprune.sandwich.heal_states import own_trajectory_states, unpruned_outputs
from blockprune.scoring.guidance import Guidance
from blockprune.scoring.trajectory import flow_trajectory

FAST = {"progress": False, "cache_dir": False, "importance": "fit_residual"}
HEAL = {"ratio": 0.4, "order": "start2end", "sandwich_steps": 5, "sandwich_eval_every": 5, "heal_steps": 10, **FAST}


def test_the_states_are_the_inputs_of_the_models_own_euler_steps():
    model, batches = make_flux(), flux_batches(2)
    items = own_trajectory_states(model, plugins.get_adapter(model, "flux"), batches, steps=4, count=6, guidance=None,
                                  seed=7)
    assert len(items) == 6  # the first batch's 4 steps, then the second's first 2 with fresh noise
    assert [float(item["timestep"][0]) for item in items] == [1.0, 0.75, 0.5, 0.25, 1.0, 0.75]
    assert torch.equal(items[4]["encoder_hidden_states"], batches[1]["encoder_hidden_states"])
    noise = torch.randn(batches[0]["hidden_states"].shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(items[0]["hidden_states"], noise)  # seeded noise, then the model's own steps from it
    with torch.no_grad():
        velocity = model(**items[0]).sample
        end = flow_trajectory(model, batches[0], 0, 1.0, 4, seed=7)
        last = model(**items[3]).sample
    assert torch.allclose(items[1]["hidden_states"], noise - 0.25 * velocity, atol=1e-6)  # the model's own step
    assert torch.allclose(end, items[3]["hidden_states"] - 0.25 * last, atol=1e-6)  # the trajectory's last input


def test_with_guidance_each_step_also_gives_the_empty_prompts_input_on_the_same_latents():
    model, batches = make_flux(), flux_batches(1)
    empty = {"encoder_hidden_states": torch.zeros(1, 6, 16), "pooled_projections": torch.zeros(1, 8)}
    items = own_trajectory_states(model, plugins.get_adapter(model, "flux"), batches, steps=3, count=6,
                                  guidance=Guidance(2.0, empty), seed=0)
    assert len(items) == 6
    for conditional, unconditional in zip(items[0::2], items[1::2]):
        assert torch.equal(conditional["hidden_states"], unconditional["hidden_states"])
        assert torch.equal(conditional["encoder_hidden_states"], batches[0]["encoder_hidden_states"])
        assert not unconditional["encoder_hidden_states"].any()


def test_targets_are_the_unpruned_models_outputs_and_the_compressed_model_is_left_as_it_is():
    model, batches = make_flux(double=2, single=3), flux_batches(8)
    unpruned = copy.deepcopy(model)
    blockprune.compress(model, calibration=batches, **{**HEAL, "heal_steps": 0})
    originals = {name: copy.deepcopy(unpruned.get_submodule(name)) for name in plan_of(model).replaced_names}
    originals.update({name: copy.deepcopy(unpruned.get_submodule(name)) for name in ("single_transformer_blocks.0",)})
    compressed = {k: v.clone() for k, v in model.state_dict().items()}
    items = own_trajectory_states(model, plugins.get_adapter(model, "flux"), batches[:2], 4, 8, None, 0)
    targets = unpruned_outputs(model, originals, items)
    with torch.no_grad():
        for item, target in zip(items, targets):
            assert torch.equal(target, unpruned(**item).sample)
    assert model.state_dict().keys() == compressed.keys()
    assert all(torch.equal(v, compressed[k]) for k, v in model.state_dict().items())


def test_flow_models_heal_on_their_own_trajectory_and_others_on_the_calibration():
    flux = make_flux(double=2, single=3)
    blockprune.compress(flux, calibration=flux_batches(8), **HEAL)
    heal = plan_of(flux).heal
    assert heal["states"] == "trajectory" and heal["relative_error_after"] <= heal["relative_error_before"]
    assert "trained on its own trajectories" in stages_table(plan_of(flux)).caption  # the printed plan says so
    dit = make_dit()
    blockprune.compress(dit, calibration=dit_batches(8), **HEAL)
    assert plan_of(dit).heal["states"] == "calibration"  # DiT is no rectified-flow model: no trajectory to sample


def test_bad_or_unusable_heal_states_are_named():
    with pytest.raises(blockprune.BlockpruneError, match="heal_states must be 'auto', 'trajectory'"):
        blockprune.compress(make_flux(), calibration=flux_batches(8), **{**HEAL, "heal_states": "own"})
    with pytest.raises(blockprune.BlockpruneError, match="needs a rectified-flow model.*heal_states='calibration'"):
        blockprune.compress(make_dit(), calibration=dit_batches(8), **{**HEAL, "heal_states": "trajectory"})
    with pytest.raises(blockprune.BlockpruneError, match="offload=True.*heal_states='calibration' with offload"):
        blockprune.compress(make_flux(), calibration=flux_batches(8), offload=True, device="cpu",
                            **{**HEAL, "heal_states": "trajectory"})
    with pytest.raises(blockprune.BlockpruneError, match="with offload and a number of heal_steps .100, say: heal_steps="
                       "'auto' does not heal under offload.*or drop heal_states"):  # the default's own way out
        blockprune.compress(make_flux(), calibration=flux_batches(8), offload=True, device="cpu",
                            **{**HEAL, "heal_steps": "auto", "heal_states": "trajectory"})
    with pytest.warns(UnusedOptionWarning, match="heal_states does nothing.*heal_steps=0"):
        blockprune.compress(make_flux(), calibration=flux_batches(8),
                            **{**HEAL, "heal_steps": 0, "heal_states": "calibration"})
