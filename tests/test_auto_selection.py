"""importance="auto": candidate plans checked on held-out calibration by the model's output error."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyResidualNet, flux_batches, make_flux, residual_net_batches
from test_toy_pipeline import tiny_toy_pipeline

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.scoring.auto import split_for_selection
from blockprune.toy import calibration_batches

HERE = Path(__file__).parent
FAST = {"progress": False, "cache_dir": False}


def planted_model() -> TinyResidualNet:
    """Block 0's branch is tiny but far from linear; block 1's is large and nearly linear.

    fit_residual (the relative residual of each block's linear fit) ranks block 1 first although replacing it
    moves the output much more than replacing block 0 does.
    """
    torch.manual_seed(0)
    model = TinyResidualNet(dim=16, depth=4)
    with torch.no_grad():
        quiet, loud = model.layers[0], model.layers[1]
        quiet.up.weight.mul_(20.0)
        quiet.down.weight.mul_(1e-3)
        quiet.down.bias.zero_()
        loud.up.weight.mul_(0.02)
        loud.up.bias.zero_()
        loud.down.weight.mul_(30.0)
    return model.eval()


def _output_error(model, reference, batches):
    with torch.no_grad():
        got = torch.cat([model(**b) for b in batches])
        expected = torch.cat([reference(**b) for b in batches])
    return float(((got - expected) ** 2).sum() / (expected**2).sum())


def test_auto_picks_the_harmless_block_where_a_proxy_is_wrong():
    calibration, fresh = residual_net_batches(8), residual_net_batches(8, seed=1)
    chosen = {}
    for importance in ("fit_residual", "auto"):
        model = planted_model()
        blockprune.compress(model, adapter="generic", ratio=0.25, calibration=calibration, importance=importance,
                            sandwich=False, **FAST)
        chosen[importance] = model
    assert blockprune.plan(chosen["fit_residual"]).replaced_names == ["layers.1"]  # the proxy is fooled
    plan = blockprune.plan(chosen["auto"])
    assert plan.replaced_names == ["layers.0"]
    errors = plan.selection["candidates"]
    assert errors[plan.selection["chosen"]] == min(errors.values())
    assert errors[plan.selection["chosen"]] < errors["fit_residual"] / 10
    assert (plan.selection["fit_batches"], plan.selection["held_batches"]) == (6, 2)
    # and on batches no step of the selection saw, the compressed model is closer to the original
    original = planted_model()
    assert _output_error(chosen["auto"], original, fresh) < _output_error(chosen["fit_residual"], original, fresh) / 10


def test_greedy_refinement_never_raises_the_held_out_error():
    model = make_flux(double=2, single=4)
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), importance="auto", sandwich=False,
                        auto_refine=2, **FAST)
    selection = blockprune.plan(model).selection
    best_candidate = min(e for name, e in selection["candidates"].items() if not name.startswith("greedy"))
    assert selection["candidates"][selection["chosen"]] <= best_candidate
    assert set(selection["candidates"]) >= {"start2end", "end2start", "fit_residual", "output_mse",
                                            "output_mse/replace", "block_influence"}


def test_the_held_out_batches_are_kept_apart_and_spread():
    batches = [{"i": i} for i in range(8)]
    fit, held = split_for_selection(batches, 0.25)
    assert [b["i"] for b in held] == [2, 6] and [b["i"] for b in fit] == [0, 1, 3, 4, 5, 7]
    with pytest.raises(BlockpruneError, match="needs at least 2"):
        split_for_selection(batches[:1], 0.25)


def test_auto_refuses_what_it_cannot_do():
    with pytest.raises(BlockpruneError, match="cannot rescore='each'"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), importance="auto", rescore="each", **FAST)
    with pytest.raises(BlockpruneError, match="runs inside compress"):
        blockprune.importance(make_flux(), calibration=flux_batches(4), importance="auto", **FAST)
    with pytest.raises(BlockpruneError, match="auto_held_out must be strictly between 0 and 1"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), importance="auto", auto_held_out=1.0, **FAST)


def _job(workdir, out, kill_at=None):
    command = [sys.executable, str(HERE / "compress_job.py"), str(workdir), str(out)] + ([kill_at] if kill_at else [])
    env = {**os.environ, "JOB_IMPORTANCE": "auto"}
    return subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env)


@pytest.mark.parametrize("kill_at", ["evaluating:4", "training:2"])
def test_a_selection_killed_by_sigkill_resumes_to_the_same_model(kill_at, tmp_path):
    reference = _job(tmp_path / "reference", tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr
    killed = _job(tmp_path / "work", tmp_path / "model.pt", kill_at)
    assert killed.returncode == -signal.SIGKILL
    resumed = _job(tmp_path / "work", tmp_path / "model.pt")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = torch.load(tmp_path / "reference.pt", weights_only=True), torch.load(tmp_path / "model.pt", weights_only=True)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_with_a_pipeline_auto_checks_candidates_on_sampled_images():
    pipe = tiny_toy_pipeline("flux")
    calibration = calibration_batches(pipe, 6, seed=3, batch_size=2)
    prompts = ["a red circle", "two blue squares"]
    options = {"generation_prompts": prompts, "generation_seeds": [0], "generation_steps": 3}
    blockprune.compress(pipe, adapter="flux", ratio=0.5, calibration=calibration, importance="auto", sandwich=False,
                        auto_refine=0, metric_options=options, **FAST)
    plan = blockprune.plan(pipe)
    assert plan.selection["checked_on"] == "images"
    errors = plan.selection["candidates"]
    assert errors[plan.selection["chosen"]] == min(errors.values())
    assert errors["start2end"] != errors["end2start"] and all(error > 0 for error in errors.values())
    with pytest.raises(BlockpruneError, match="auto_check='images' samples images and needs a pipeline"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), importance="auto", auto_check="images", **FAST)


def test_without_a_pipeline_flux_plans_are_checked_over_a_latent_trajectory():
    model = make_flux(double=2, single=4)
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), sandwich=False, auto_refine=0, **FAST)
    plan = blockprune.plan(model)  # importance="auto" is the default
    assert plan.importance == {"auto": 1.0}
    assert plan.selection["checked_on"] == "trajectory"
    errors = plan.selection["candidates"]
    assert errors[plan.selection["chosen"]] == min(errors.values()) and len(set(errors.values())) > 1
    outputs = make_flux(double=2, single=4)
    blockprune.compress(outputs, ratio=0.5, calibration=flux_batches(8), sandwich=False, auto_refine=0,
                        auto_check="outputs", **FAST)
    assert blockprune.plan(outputs).selection["candidates"] != errors  # a different check, different errors


def test_one_trajectory_step_is_one_euler_step_from_noise_to_level_zero():
    from blockprune.scoring.trajectory import flow_trajectory

    model, batch = make_flux(double=1, single=1), flux_batches(1)[0]
    noise = torch.randn(batch["hidden_states"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        velocity = model(**{**batch, "hidden_states": noise, "timestep": torch.ones_like(batch["timestep"])}).sample
        got = flow_trajectory(model, batch, 0, time_scale=1.0, steps=1)
        two = flow_trajectory(model, batch, 0, time_scale=1.0, steps=2)
    torch.testing.assert_close(got, noise - velocity)
    assert not torch.allclose(two, got)  # the second step runs the model again at half the noise level


def test_the_trajectory_check_needs_a_flow_model_and_the_latents():
    from blockprune.scoring.trajectory import flow_trajectory

    with pytest.raises(BlockpruneError, match="adapter sets no flow_time_scale"):
        blockprune.compress(planted_model(), adapter="generic", ratio=0.25, calibration=residual_net_batches(8),
                            auto_check="trajectory", sandwich=False, **FAST)
    batch = {k: v for k, v in flux_batches(1)[0].items() if k != "timestep"}
    with pytest.raises(BlockpruneError, match="has no tensor 'timestep'"):
        flow_trajectory(make_flux(double=1, single=1), batch, 0, time_scale=1.0, steps=2)
    with pytest.raises(BlockpruneError, match="auto_check_batches must be a positive integer"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), auto_check_batches=0, **FAST)


def test_greedy_swaps_must_win_on_both_halves_of_the_check():
    from blockprune.scoring.auto import _halves

    one, two, three = torch.ones(4, 2), torch.zeros(4, 2), torch.full((4, 2), 2.0)
    assert [len(h) for h in _halves([one, two, three])] == [2, 1]  # alternate batches
    first, second = _halves([torch.arange(6.0).reshape(6, 1)])  # one batch of images: its two halves
    assert first[0].flatten().tolist() == [0, 1, 2] and second[0].flatten().tolist() == [3, 4, 5]

    from blockprune.scoring.auto import Candidate, PlanEvaluator, _refine

    class Known(PlanEvaluator):  # known errors per plan: (sum, first half, second half)
        def __init__(self, known):
            self.known, self.errors, self.halves = known, {}, {}

        def error(self, names):
            key = tuple(sorted(names))
            self.errors[key], *halves = self.known[key]
            self.halves[key] = tuple(halves)
            return self.errors[key]

    ranking = Candidate("x", ["a", "b", "c", "d"])
    noisy = Known({("a",): (0.5, 0.5, 0.5), ("b",): (0.4, 0.1, 0.7), ("c",): (0.6, 0.6, 0.6)})
    assert _refine(ranking, 1, noisy, rounds=1) == (["a", "b", "c", "d"], 0.5)  # b wins in sum, on one half only
    steady = Known({("a",): (0.5, 0.5, 0.5), ("b",): (0.4, 0.4, 0.4), ("c",): (0.6, 0.6, 0.6)})
    assert _refine(ranking, 1, steady, rounds=1) == (["b", "a", "c", "d"], 0.4)


def test_with_a_pipeline_but_batches_of_unknown_prompts_auto_checks_a_latent_trajectory():
    pipe = tiny_toy_pipeline("flux")
    calibration = calibration_batches(pipe, 6, seed=3, batch_size=2)  # made without the pipeline's prompts
    blockprune.compress(pipe, adapter="flux", ratio=0.5, calibration=calibration, sandwich=False, auto_refine=0,
                        **FAST)
    assert blockprune.plan(pipe).selection["checked_on"] == "trajectory"
