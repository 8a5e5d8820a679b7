"""heal_steps: off by default (0); "auto" heals where it trains on the model's own trajectory, nowhere else."""

import argparse

import pytest
from conftest import dit_batches, flux_batches, make_dit, make_flux

import blockprune
from blockprune import plugins
from blockprune.cli.compress import add_sandwich_arguments
from blockprune.config import SandwichConfig
from blockprune.errors import UnusedOptionWarning
from blockprune.plan import plan as plan_of
from blockprune.sandwich.heal_states import AUTO_HEAL_STEPS, resolve_heal_steps

FAST = {"ratio": 0.4, "order": "start2end", "sandwich_steps": 5, "sandwich_eval_every": 5, "progress": False,
        "cache_dir": False}


def test_auto_heals_flow_models_in_memory_and_nothing_else():
    flux, dit = plugins.get_adapter(make_flux(), "flux"), plugins.get_adapter(make_dit(), "dit")
    assert SandwichConfig().heal_steps == 0  # the default: no healing
    auto = SandwichConfig(heal_steps="auto")
    assert resolve_heal_steps(auto, flux, offloaded=False).heal_steps == AUTO_HEAL_STEPS == 100
    assert resolve_heal_steps(auto, flux, offloaded=True).heal_steps == 0  # the targets need the unpruned blocks on the GPU
    assert resolve_heal_steps(auto, dit, offloaded=False).heal_steps == 0  # no rectified flow: no own trajectory
    asked = SandwichConfig(heal_states="calibration")  # healing on the calibration was not measured to help
    assert resolve_heal_steps(asked, flux, offloaded=False).heal_steps == 0
    for steps in (0, 7):  # a number is taken as given
        assert resolve_heal_steps(SandwichConfig(heal_steps=steps), dit, offloaded=True).heal_steps == steps


def test_the_plan_records_the_settled_steps_and_a_dit_is_not_healed():
    model = make_dit()
    blockprune.compress(model, calibration=dit_batches(8), heal_steps="auto", **FAST)
    plan = plan_of(model)
    assert plan.sandwich["heal_steps"] == 0 and not plan.heal and plan.config["sandwich"]["heal_steps"] == "auto"


def test_heal_options_that_auto_leaves_unused_are_named_with_the_way_to_heal():
    with pytest.warns(UnusedOptionWarning, match="heal_kept does nothing.*heal_steps='auto' heals only.*heal_steps=100") as seen:
        blockprune.compress(make_dit(), calibration=dit_batches(8), heal_kept="full", heal_steps="auto", **FAST)
    assert seen[0].filename == __file__  # it points at the caller's line
    model = make_flux()
    with pytest.warns(UnusedOptionWarning, match="heal_states does nothing.*own trajectory"):
        blockprune.compress(model, calibration=flux_batches(8), heal_states="calibration", heal_steps="auto", **FAST)
    assert not plan_of(model).heal
    model = make_flux()  # the default, no healing: the option is named with the way to heal
    with pytest.warns(UnusedOptionWarning, match=r"heal_kept does nothing.*heal_steps=0 \(the default\).*heal_steps=100"):
        blockprune.compress(model, calibration=flux_batches(8), heal_kept="full", **FAST)
    assert not plan_of(model).heal and plan_of(model).sandwich["heal_steps"] == 0


@pytest.mark.parametrize("value", ["many", -1, 2.5, True])
def test_bad_heal_steps_are_refused_with_what_is_taken(value):
    with pytest.raises(blockprune.BlockpruneError, match=r"heal_steps must be 'auto' or an integer ≥ 0"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), heal_steps=value, **FAST)


def test_the_command_line_takes_auto_or_a_number(capsys):
    parser = argparse.ArgumentParser()
    add_sandwich_arguments(parser)
    assert parser.parse_args(["--heal-steps", "auto"]).heal_steps == "auto"
    assert parser.parse_args(["--heal-steps", "30"]).heal_steps == 30
    assert parser.parse_args(["--sandwich-eval-every", "auto"]).sandwich_eval_every == "auto"  # the guard's checks too
    assert parser.parse_args(["--sandwich-eval-every", "25"]).sandwich_eval_every == 25
    with pytest.raises(SystemExit):
        parser.parse_args(["--heal-steps", "lots"])
    assert "expected a whole number or auto, got 'lots'" in capsys.readouterr().err
