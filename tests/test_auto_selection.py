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
    expected, got = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "model.pt")
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
