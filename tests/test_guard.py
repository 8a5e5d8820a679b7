"""The held-out guard of sandwich stages and of global healing: never worse than the start, early stop, rates."""

import io

import pytest
import torch
from conftest import cast_batch, flux_batches, make_flux
from rich.console import Console

import blockprune
from blockprune.config import SandwichConfig
from blockprune.errors import SandwichDivergedError
from blockprune.plan import plan as plan_of
from blockprune.report import stages_table
from blockprune.sandwich import guard
from blockprune.sandwich.guard import (
    LR_GRID,
    GuardSettings,
    check_interval,
    guarded_training,
    learning_rate,
    probe_cooldown_steps,
    probe_steps,
    training_progress,
)
from blockprune.sandwich.training import guard_settings

FAST = {"progress": False, "cache_dir": False, "importance": "fit_residual"}


def test_the_rate_warms_up_then_decays():
    rates = [learning_rate(step, 100, 1e-3) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] == pytest.approx(1e-4, rel=0.05)


def test_training_that_raises_the_held_out_error_is_reverted_to_the_start():
    weight = torch.nn.Parameter(torch.zeros(3))
    start = weight.detach().clone()

    def step_loss(index):  # training pulls the weight away from what the held-out check wants
        return ((weight - 1.0) ** 2).sum()

    result = guarded_training([weight], step_loss, lambda: float((weight**2).sum()), 4,
                              GuardSettings(steps=40, lr=0.1, batch_size=1, eval_every=5, patience=2), 0, "test")
    assert result.reverted and torch.equal(weight.detach(), start)
    assert result.error_after == result.error_before == 0.0
    assert result.steps_run == 15  # the check at 5 is within the first fifth (8 steps) and not counted; 10, 15 stop it


def test_a_fixed_rate_is_not_stopped_early_in_the_transient_of_its_first_fifth():
    weight = torch.nn.Parameter(torch.zeros(1))
    steps = [0]

    def step_loss(index):
        steps[0] += 1
        return (weight**2).sum()

    def held_error():  # the start's 1.0, then above it through step 150 (a warm-up's transient), then below, falling
        return 1.0 if not steps[0] else 2.0 if steps[0] <= 150 else 1.0 / (steps[0] - 150)

    settings = GuardSettings(steps=1000, lr=1e-3, batch_size=1, eval_every=50, patience=3)
    result = guarded_training([weight], step_loss, held_error, 4, settings, 0, "test")
    # the checks at 50, 100 and 150 fall in the first fifth (200 steps): they used to stop it at 150, reverted
    assert not result.reverted and result.best_step == result.steps_run == 1000


def test_auto_rate_keeps_the_probe_with_the_lowest_held_out_error():
    weight = torch.nn.Parameter(torch.full((3,), 5.0))
    result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(),
                              lambda: float(((weight - 1.0) ** 2).sum()), 4,
                              GuardSettings(steps=50, lr="auto", batch_size=1, eval_every=5, patience=3), 0, "test")
    assert set(result.lr_errors) == {f"{rate:g}" for rate in LR_GRID}
    assert result.lr == max(LR_GRID)  # the fastest rate gets closest in the probe
    assert result.error_after < result.error_before and not result.reverted


def test_a_probe_whose_loss_diverges_loses_and_the_other_rates_go_on():
    weight = torch.nn.Parameter(torch.zeros(1))

    def step_loss(index):  # past 5 the loss is NaN: only the fastest rate's steps get there
        return ((weight - 3.0) ** 2).sum() if weight.item() < 5.0 else weight.sum() * float("nan")

    settings = GuardSettings(steps=50, lr="auto", batch_size=1, eval_every=5, patience=3, grid=(0.1, 10.0, 1.0))
    result = guarded_training([weight], step_loss, lambda: float(((weight - 3.0) ** 2).sum()), 4, settings, 0, "test")
    assert result.lr_errors["10"] == float("inf") and set(result.lr_errors) == {"0.1", "10", "1"}
    assert result.lr == 1.0 and result.error_after < result.error_before and torch.isfinite(weight).all()


def test_when_every_probe_diverges_the_first_rate_runs_from_the_start_and_says_so():
    weight = torch.nn.Parameter(torch.zeros(1))

    def step_loss(index):  # NaN from 0.5 on, which each rate's third step reaches from the start
        return ((weight - 3.0) ** 2).sum() if weight.item() < 0.5 else weight.sum() * float("nan")

    settings = GuardSettings(steps=50, lr="auto", batch_size=1, eval_every=5, patience=3, grid=(1.0, 2.0))
    # at step 2: from the start again, not from where the last probe diverged (that would fail at step 0)
    with pytest.raises(SandwichDivergedError, match="at step 2, rate 1"):
        guarded_training([weight], step_loss, lambda: 0.0, 4, settings, 0, "test")


@pytest.mark.parametrize("lr, probe, cool", [("auto", 200, 50), (1e-3, 0, 0)])
def test_probe_steps_are_the_steps_each_rate_trains_before_they_are_compared(lr, probe, cool):
    weight = torch.nn.Parameter(torch.full((3,), 5.0))
    settings = guard_settings(SandwichConfig(steps=1000, lr=lr, patience=1000))
    calls = []
    result = guarded_training([weight], lambda i: calls.append(i) or ((weight - 1.0) ** 2).sum(),
                              lambda: float(((weight - 1.0) ** 2).sum()), 4, settings, 0, "test")
    assert probe_steps(settings) == probe and result.steps_run == 1000  # a fifth of the steps, each rate
    assert probe_cooldown_steps(settings) == cool  # a quarter of the probe, each rate, to score it
    # the other rates' probes and every probe's cool-down come on top of the steps
    assert len(calls) == 1000 + (len(LR_GRID) - 1) * probe + len(LR_GRID) * cool


@pytest.mark.parametrize("share, chosen", [(0.0, 0.01), (guard.PROBE_COOLDOWN_SHARE, 0.1)])
def test_auto_rate_scores_each_probe_where_it_lands_after_a_cool_down(monkeypatch, share, chosen):
    monkeypatch.setattr(guard, "PROBE_COOLDOWN_SHARE", share)
    weight = torch.nn.Parameter(torch.zeros(1))
    before_step = [weight.detach().clone()]

    def step_loss(index):
        before_step[0] = weight.detach().clone()
        return ((weight - 10.0) ** 2).sum()

    def held_error():  # the distance still to go, plus noise that grows with the last step (a high rate mid-flight)
        return float((10.0 - weight.detach()).abs() + 50 * (weight.detach() - before_step[0]).abs())

    settings = GuardSettings(steps=100, lr="auto", batch_size=1, eval_every=10, patience=3, grid=(0.01, 0.1))
    result = guarded_training([weight], step_loss, held_error, 4, settings, 0, "test")
    # mid-flight (share 0) the high rate's last step of ~0.1 costs 5 against the low rate's 0.5, though it went ten
    # times as far; cooled to a zero rate, both steps shrink and the rate that went further scores lower
    assert result.lr == chosen
    assert (result.lr_errors["0.1"] < result.lr_errors["0.01"]) == (chosen == 0.1)


def test_a_scored_probe_goes_on_as_if_its_cool_down_had_never_run(monkeypatch):
    targets = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0], [2.0, 1.0]])  # the batch order matters

    def final_weights(share: float) -> tuple:
        monkeypatch.setattr(guard, "PROBE_COOLDOWN_SHARE", share)
        weight = torch.nn.Parameter(torch.full((2,), 8.0))
        settings = GuardSettings(steps=60, lr="auto", batch_size=2, eval_every=10, patience=3, grid=(0.01, 0.1))
        result = guarded_training([weight], lambda i: ((weight - targets[i]) ** 2).sum(),
                                  lambda: float(((weight.detach() - targets.mean(0)) ** 2).sum()), 4, settings, 0, "t")
        return result, weight.detach().clone()

    (plain, plain_weights), (scored, scored_weights) = final_weights(0.0), final_weights(0.25)
    assert plain.lr == scored.lr == 0.1 and plain.best_step == scored.best_step == 60  # the same rate, to the end
    assert scored.lr_errors != plain.lr_errors  # the probes were scored differently ...
    assert torch.equal(scored_weights, plain_weights)  # ... and weights, Adam's state and batch order were put back


@pytest.mark.parametrize("later, kept", [(0.7, "cooled probe"), (0.4, "later step")])
def test_the_chosen_rates_cooled_probe_is_kept_when_nothing_after_it_beats_it(later, kept):
    weight = torch.nn.Parameter(torch.full((3,), 5.0))
    seen = []

    def held_error():  # the start, each rate's cooled probe, the chosen probe mid-flight, then every later check
        seen.append(weight.detach().clone())
        return [1.0, 0.9, 0.5, 0.8][len(seen) - 1] if len(seen) <= 4 else later

    settings = GuardSettings(steps=100, lr="auto", batch_size=1, eval_every=10, patience=3, grid=(0.01, 0.1))
    result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(), held_error, 4, settings, 0, "test")
    assert result.lr == 0.1 and result.lr_errors == {"0.01": 0.9, "0.1": 0.5}
    assert not torch.equal(seen[2], seen[3])  # the probe went on from before its cool-down
    if kept == "cooled probe":  # the checks after the probes stayed at 0.7, above the cooled probe's 0.5
        assert result.best_step == probe_steps(settings) and result.error_after == 0.5
        assert torch.equal(weight.detach(), seen[2])
    else:
        assert result.best_step > probe_steps(settings) and result.error_after == 0.4


def test_best_weights_that_the_accept_check_refuses_give_way_to_the_start():
    weight = torch.nn.Parameter(torch.full((3,), 5.0))
    asked = []

    def accept():  # asked once, with the best weights loaded
        asked.append(weight.detach().clone())
        return False

    settings = GuardSettings(steps=20, lr=0.1, batch_size=1, eval_every=5, patience=3)
    result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(),
                              lambda: float(((weight - 1.0) ** 2).sum()), 4, settings, 0, "test", accept=accept)
    assert len(asked) == 1 and float(asked[0][0]) < 5.0  # the best was a trained one
    assert result.refused and result.reverted and result.lr is None and result.error_after == result.error_before
    assert torch.equal(weight.detach(), torch.full((3,), 5.0))
    kept = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(),
                            lambda: float(((weight - 1.0) ** 2).sum()), 4, settings, 0, "test", accept=lambda: True)
    assert not kept.refused and kept.best_step > 0 and float(weight[0]) < 5.0


def test_the_cool_down_settles_best_weights_that_a_high_rate_left_bouncing():
    weight = torch.nn.Parameter(torch.full((2,), 3.0))
    targets = [torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])]  # batches disagree; the held-out check wants 0

    def run(cooldown: int) -> tuple:
        with torch.no_grad():
            weight.fill_(3.0)
        settings = GuardSettings(steps=40, lr=0.5, batch_size=1, eval_every=5, patience=2, cooldown=cooldown)
        result = guarded_training([weight], lambda i: ((weight - targets[i]) ** 2).sum(),
                                  lambda: float((weight.detach() ** 2).sum()), 2, settings, 0, "test")
        return result, weight.detach().clone()

    plain, at_best = run(0)
    cooled, settled = run(10)
    assert cooled.steps_run == plain.steps_run + 10  # the cool-down follows the early stop
    assert cooled.best_step == cooled.steps_run and cooled.cooled and not plain.cooled  # what it reached was kept:
    assert cooled.error_after < plain.error_after / 10  # far below the best the constant high rate found
    assert float((settled**2).sum()) == pytest.approx(cooled.error_after)
    assert float((at_best**2).sum()) == pytest.approx(plain.error_after)


def test_a_cool_down_past_the_steps_grows_the_progress_total_with_it():
    weight = torch.nn.Parameter(torch.full((1,), 5.0))
    told = []
    settings = GuardSettings(steps=40, lr=0.05, batch_size=1, eval_every=5, patience=3, cooldown=10)
    with training_progress(lambda name, step, steps, error: told.append((step, steps))):
        result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(),
                                  lambda: float(((weight.detach() - 1.0) ** 2).sum()), 2, settings, 0, "test")
    assert result.steps_run == 50 and result.cooled  # every check improved, then the cool-down ran past the 40 steps
    assert all(step <= steps for step, steps in told) and told[-1] == (50, 50)


def test_a_cool_down_that_does_not_beat_the_best_weights_leaves_them():
    weight = torch.nn.Parameter(torch.zeros(1))
    settings = GuardSettings(steps=30, lr=0.05, batch_size=1, eval_every=5, patience=2, cooldown=10)
    snapshots = {}

    def held_error() -> float:  # training pulls towards 1 and passes the check's 0.2 on its way
        snapshots[len(snapshots)] = weight.detach().clone()
        return float(((weight.detach() - 0.2) ** 2).sum())

    result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(), held_error, 2, settings, 0, "test")
    assert 0 < result.best_step < result.steps_run - 10 and not result.cooled  # the cool-down ran, and lost
    assert result.error_after == pytest.approx(float((weight.detach() - 0.2) ** 2))  # the best weights are back,
    assert float(weight[0]) < float(snapshots[len(snapshots) - 1][0])  # not those the cool-down reached


@pytest.mark.parametrize("lr", ["auto", 1.0])
def test_a_stage_never_ends_above_its_held_out_error_before(lr):
    model = make_flux(double=2, single=3)
    blockprune.compress(model, ratio=0.4, calibration=flux_batches(8), order="start2end", sandwich_steps=20,
                        sandwich_lr=lr, sandwich_eval_every=5, heal_steps=0, **FAST)
    stages = plan_of(model).stages
    assert len(stages) == 2
    for stage in stages:
        assert stage.relative_error_after <= stage.relative_error_before
        assert stage.steps_run <= 20 and (stage.lr is None) == stage.reverted
    if lr == 1.0:  # far too high for this model: every stage is put back to its start, and the table says so
        assert all(stage.reverted for stage in stages)
        console = Console(file=io.StringIO(), width=120)
        console.print(stages_table(plan_of(model)))
        assert console.file.getvalue().count("reverted") == 2


def test_healing_never_raises_the_held_out_output_error_and_is_reported():
    model = make_flux(double=2, single=3)
    blockprune.compress(model, ratio=0.4, calibration=flux_batches(8), order="start2end", sandwich_steps=5,
                        heal_steps=20, sandwich_eval_every=5, heal_states="calibration", **FAST)
    heal = plan_of(model).heal
    assert heal["steps"] == 20 and heal["relative_error_after"] <= heal["relative_error_before"]
    assert heal["best_step"] > 0 and not heal["refused"]  # kept: it beat the start on both halves of the check
    assert len(heal["halves_before"]) == 2 and all(a < b for a, b in zip(heal["halves_after"], heal["halves_before"]))
    assert heal["checked_on"] == "trajectory"  # FLUX is a rectified-flow model: guarded on a latent trajectory
    assert len(heal["lora_blocks"]) == 3 and len(heal["surrogates"]) == 2
    assert not any("lora" in name for name in model.state_dict())  # merged
    assert heal["steps_run"] == 20 + 2 * 5  # the steps, then a cool-down of two check intervals from the best
    assert heal["cooled"] == (heal["best_step"] == 30)
    assert ("(after its cool-down)" in stages_table(plan_of(model)).caption) == heal["cooled"]


def test_healing_resumes_from_the_workdir_bit_identical(tmp_path):
    first = make_flux(double=2, single=3)
    options = {"ratio": 0.4, "calibration": flux_batches(8), "order": "start2end", "sandwich_steps": 5,
               "heal_steps": 10, "sandwich_eval_every": 5, "workdir": tmp_path / "work", **FAST}
    blockprune.compress(first, **options)
    again = make_flux(double=2, single=3)
    blockprune.compress(again, **options)  # every stage and the healing restored from the workdir
    assert plan_of(again).heal == plan_of(first).heal
    assert "heal" in plan_of(first).seconds and "heal" not in plan_of(again).seconds  # no reference forwards again
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_guard_options_are_refused():
    with pytest.raises(blockprune.BlockpruneError, match="heal_steps must be 'auto' or an integer ≥ 0"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), heal_steps=-1, **FAST)
    with pytest.raises(blockprune.BlockpruneError, match="sandwich_lr must be a positive number"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), sandwich_lr="fast", **FAST)
    with pytest.raises(blockprune.BlockpruneError, match=r"sandwich_split must be in \(0, 1\]"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), sandwich_split=1.5, **FAST)
    with pytest.raises(blockprune.BlockpruneError, match="sandwich_eval_every must be a positive integer"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), sandwich_eval_every="often", **FAST)


def test_auto_checks_a_twentieth_of_the_steps_but_no_more_often_than_every_ten():
    assert check_interval("auto", 1000) == 50 and check_interval("auto", 300) == 15
    assert check_interval("auto", 100) == 10 and check_interval("auto", 20) == 10  # healing's 100 steps: as before
    assert check_interval(7, 1000) == 7  # a number is taken as given
    weight = torch.nn.Parameter(torch.full((3,), 5.0))
    checked = []
    settings = guard_settings(SandwichConfig(steps=400, lr=0.01, patience=1000), cooldown_checks=2)
    with training_progress(lambda name, step, steps, error: checked.append(step)):
        result = guarded_training([weight], lambda i: ((weight - 1.0) ** 2).sum(),
                                  lambda: float(((weight - 1.0) ** 2).sum()), 4, settings, 0, "test")
    assert settings.eval_every == 20 and settings.cooldown == 40  # the cool-down: two check intervals
    assert checked[:21] == list(range(0, 401, 20)) and result.steps_run == 440  # then the cool-down's check


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_on_the_cpu_and_keep_their_dtype(dtype):
    model = make_flux(double=2, single=2).to(dtype)
    batches = [cast_batch(b, dtype) for b in flux_batches(6)]
    blockprune.compress(model, ratio=0.5, calibration=batches, order="start2end", sandwich_steps=10,
                        sandwich_eval_every=5, heal_steps=5, **FAST)
    plan = plan_of(model)
    assert len(plan.stages) == 2 and all(s.relative_error_after <= s.relative_error_before for s in plan.stages)
    assert plan.heal["relative_error_after"] <= plan.heal["relative_error_before"]
    assert {t.dtype for t in model.state_dict().values()} == {dtype}


def test_the_cli_takes_auto_or_a_rate():
    import argparse

    from blockprune.cli.compress import add_sandwich_arguments

    parser = argparse.ArgumentParser()
    add_sandwich_arguments(parser)
    assert parser.parse_args(["--sandwich-lr", "auto"]).sandwich_lr == "auto"
    assert parser.parse_args(["--sandwich-lr", "3e-4"]).sandwich_lr == 3e-4
    with pytest.raises(SystemExit):
        parser.parse_args(["--sandwich-lr", "fast"])
