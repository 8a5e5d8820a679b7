"""importance="auto": candidate plans checked on held-out calibration by the model's output error."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyResidualNet, flux_batches, make_flux, residual_net_batches
from rich.console import Console
from test_toy_pipeline import tiny_toy_pipeline
from tiny_pipelines import tiny_flux_pipeline

import blockprune
from blockprune.config import CompressConfig
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError, UnusedOptionWarning
from blockprune.plugins import get_adapter
from blockprune.report import selection_table
from blockprune.scoring.auto import split_for_selection
from blockprune.scoring.plan_check import PlanEvaluator
from blockprune.scoring.sampling import DEFAULT_SAMPLING_STEPS, sampling_steps
from blockprune.scoring.trajectory import latent_check, per_sample_error, relative_error
from blockprune.toy import calibration_batches

HERE = Path(__file__).parent
FAST = {"progress": False, "cache_dir": False}


def won_its_last_check(selection: dict) -> bool:
    """Whether the chosen plan has the lowest error of the last check: the finalists' re-check, if there was one."""
    last = selection["finalists"] or selection["candidates"]
    return last[selection["chosen"]] == min(last.values())


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
    assert won_its_last_check(plan.selection) and errors[plan.selection["chosen"]] == min(errors.values())
    assert errors[plan.selection["chosen"]] < errors["fit_residual"] / 10
    assert (plan.selection["fit_batches"], plan.selection["held_batches"]) == (6, 2)
    # and on batches no step of the selection saw, the compressed model is closer to the original
    original = planted_model()
    assert _output_error(chosen["auto"], original, fresh) < _output_error(chosen["fit_residual"], original, fresh) / 10


def test_auto_check_samples_warns_where_the_check_draws_no_noise():
    model = planted_model()  # the generic adapter, no pipeline: plans are checked on one-step outputs
    with pytest.warns(UnusedOptionWarning, match="auto_check_samples does nothing in this call: plans are checked on "
                                                 "outputs"):
        blockprune.compress(model, adapter="generic", ratio=0.25, calibration=residual_net_batches(8),
                            auto_check_samples=4, sandwich=False, **FAST)
    assert blockprune.plan(model).selection["checked_on"] == "outputs"


def test_greedy_refinement_never_raises_the_held_out_error():
    model = make_flux(double=2, single=4)
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), importance="auto", sandwich=False,
                        auto_refine=2, auto_finalists=0, **FAST)  # no re-check: the short check decides
    selection = blockprune.plan(model).selection
    best_candidate = min(e for name, e in selection["candidates"].items() if not name.startswith("greedy"))
    assert selection["finalists"] == {} and selection["candidates"][selection["chosen"]] <= best_candidate
    assert set(selection["candidates"]) >= {"start2end", "end2start", "fit_residual", "output_mse",
                                            "output_mse/replace", "block_influence"}


def test_the_best_plans_are_rechecked_over_the_sampling_steps():
    batches = flux_batches(8)
    model = make_flux(double=2, single=4)
    blockprune.compress(model, ratio=0.5, calibration=batches, sandwich=False, auto_refine=0, sampling_steps=12, **FAST)
    plan = blockprune.plan(model)
    selection = plan.selection
    assert (selection["steps"], selection["final_steps"]) == (8, 12)
    finalists = selection["finalists"]
    by_short = sorted(selection["candidates"], key=selection["candidates"].get)
    assert by_short[0] in finalists and "fit_residual" in finalists and 2 <= len(finalists) <= 4
    assert selection["chosen"] == min(finalists, key=finalists.get)
    # each finalist's error is its plan's over a 12-step trajectory, computed here afresh
    intact = make_flux(double=2, single=4)
    fit, held = split_for_selection(batches, 0.25)
    blocks = resolve_blocks(intact, get_adapter(intact), fit[0])
    with torch.no_grad():
        check = PlanEvaluator(intact, blocks, fit, CompressConfig().ridge, None, latent_check(intact, held, 1.0, 12),
                              aggregate=per_sample_error)
        assert check.error(plan.replaced_names) == pytest.approx(finalists[selection["chosen"]], rel=1e-5)
    assert finalists[selection["chosen"]] != selection["candidates"][selection["chosen"]]  # a longer check
    console = Console(file=io.StringIO(), width=240)
    console.print(selection_table(plan))  # what inspect shows: both checks' errors, the chosen plan marked
    shown = console.file.getvalue()
    assert "held-out rel. error, 8 steps" in shown and "re-checked, 12 steps" in shown
    assert f"{finalists[selection['chosen']]:.4g}" in shown and shown.count("chosen") == 1


def test_the_recheck_ranks_plans_as_the_mean_psnr_of_their_samples_does():
    reference = [torch.ones(2, 4)]
    uneven = [reference[0] + torch.tensor([[0.1], [0.01]])]  # relative errors 1e-2 and 1e-4: 20 and 40 dB
    even = [reference[0] + 0.002**0.5]  # 2e-3 each: 27 dB
    assert per_sample_error(uneven, reference) == pytest.approx(1e-3, rel=1e-5)
    assert per_sample_error(uneven, reference) < per_sample_error(even, reference)  # 30 dB on average beats 27
    assert relative_error(uneven, reference) > relative_error(even, reference)  # the pooled error: the worst sample


def test_no_recheck_when_the_sampler_is_no_longer_than_the_check():
    for options in ({"sampling_steps": 8}, {"sampling_steps": 12, "auto_finalists": 0}):
        model = make_flux(double=2, single=4)
        blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), sandwich=False, auto_refine=0, **options,
                            **FAST)
        selection = blockprune.plan(model).selection
        assert selection["finalists"] == {} and won_its_last_check(selection)
    model = make_flux(double=2, single=4)  # a 4-step sampler: the check steps as it does
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), sandwich=False, auto_refine=0, sampling_steps=4,
                        **FAST)
    assert (blockprune.plan(model).selection["steps"], blockprune.plan(model).selection["final_steps"]) == (4, 4)


def test_sampling_steps_come_from_the_option_the_pipeline_or_the_default():
    assert sampling_steps(None, None) == DEFAULT_SAMPLING_STEPS == 28
    assert sampling_steps(tiny_flux_pipeline(), None) == 28  # FluxPipeline.__call__'s default
    assert sampling_steps(tiny_toy_pipeline(), None) == 3  # no default in its call: its config's
    assert sampling_steps(tiny_toy_pipeline(), 7) == 7
    with pytest.raises(BlockpruneError, match="sampling_steps must be a positive integer, got 0"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), sampling_steps=0, **FAST)
    with pytest.raises(BlockpruneError, match=r"auto_finalists must be an integer ≥ 0 .* got -1"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), auto_finalists=-1, **FAST)


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


def test_a_resumed_selection_redoes_neither_the_signals_nor_the_plans_it_had_checked(tmp_path):
    reference = _job(tmp_path / "reference", tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr
    killed = _job(tmp_path / "work", tmp_path / "model.pt", "checking:5")  # after 4 plans were measured
    assert killed.returncode == -signal.SIGKILL
    resumed = _job(tmp_path / "work", tmp_path / "model.pt", "scoring:1")  # any signal scored again kills it
    assert resumed.returncode == 0, resumed.stderr
    expected, got = (json.loads((tmp_path / f"{name}.selection.json").read_text()) for name in ("reference", "model"))
    assert expected["restored"] == 0 and got["restored"] == 4 and expected["evaluations"] > 4
    for selection in expected, got:
        del selection["seconds"], selection["restored"]
    assert got == expected
    expected, got = torch.load(tmp_path / "reference.pt", weights_only=True), torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


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
    assert won_its_last_check(plan.selection)
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
    assert won_its_last_check(plan.selection) and len(set(errors.values())) > 1
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


def test_auto_check_samples_sets_how_many_noise_draws_a_trajectory_check_makes():
    model, batches = make_flux(double=1, single=2), flux_batches(8)
    _, held = split_for_selection(batches, 0.25)
    samples = sum(b["hidden_states"].shape[0] for b in held)
    assert latent_check(model, held, 1.0, 2).count == len(held) * -(-32 // samples)  # the default: 32 at least
    assert latent_check(model, held, 1.0, 2, at_least=3 * samples).count == 3 * len(held)
    assert latent_check(model, held, 1.0, 2, at_least=1).count == len(held)  # never fewer than the batches
    errors = {}
    for draws in (1, 64):
        compressed = make_flux(double=1, single=2)
        blockprune.compress(compressed, ratio=0.34, calibration=batches, sandwich=False, auto_refine=0, auto_finalists=0,
                            auto_check_samples=draws, **FAST)
        errors[draws] = blockprune.plan(compressed).selection["candidates"]
    assert errors[1].keys() == errors[64].keys() and errors[1] != errors[64]  # other draws, other errors
    with pytest.raises(BlockpruneError, match="auto_check_samples must be a positive integer"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), auto_check_samples=0, **FAST)


def test_scoring_and_the_selection_use_the_first_32_calibration_batches_by_default():
    for given, used in (({}, 32), ({"score_batches": 36}, 36)):
        model = make_flux(double=1, single=2)
        blockprune.compress(model, ratio=0.34, calibration=flux_batches(36), sandwich=False, auto_refine=0,
                            auto_finalists=0, **given, **FAST)
        selection = blockprune.plan(model).selection
        assert selection["fit_batches"] + selection["held_batches"] == used


def test_greedy_swaps_must_win_on_both_halves_of_the_check():
    from blockprune.scoring.trajectory import halves

    one, two, three = torch.ones(4, 2), torch.zeros(4, 2), torch.full((4, 2), 2.0)
    assert [len(h) for h in halves([one, two, three])] == [2, 1]  # alternate batches
    first, second = halves([torch.arange(6.0).reshape(6, 1)])  # one batch of images: its two halves
    assert first[0].flatten().tolist() == [0, 1, 2] and second[0].flatten().tolist() == [3, 4, 5]

    from blockprune.scoring.auto import Candidate, PlanEvaluator, _refine

    class Known(PlanEvaluator):  # known errors per plan: (sum, first half, second half)
        def __init__(self, known):
            self.known, self.errors, self.halves, self.saved, self.measure, self._first = known, {}, {}, {}, None, {}

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


def test_greedy_measures_a_swap_that_loses_on_the_first_half_no_further_and_chooses_as_before():
    from blockprune.scoring.auto import Candidate, _refine

    batches = flux_batches(8)
    model = make_flux(double=2, single=4)
    fit, held = split_for_selection(batches, 0.25)
    blocks = resolve_blocks(model, get_adapter(model), fit[0])
    ranking = Candidate("start2end", [b.name for b in blocks])
    results, runs = {}, {}
    with torch.no_grad():
        for way in ("by halves", "whole"):
            check = latent_check(model, held, 1.0, 3, at_least=8)
            counted, measure_one = {"n": 0}, check.measure_one

            def counting(k, counted=counted, measure_one=measure_one):
                counted["n"] += 1
                return measure_one(k)
            check.measure_one = counting
            measure = check if way == "by halves" else (lambda check=check: check())  # no half(): whole checks only
            evaluator = PlanEvaluator(model, blocks, fit, CompressConfig().ridge, None, measure)
            results[way], runs[way] = _refine(ranking, 3, evaluator, rounds=2), counted["n"]
            if way == "by halves":
                halved = evaluator
    assert results["by halves"] == results["whole"] and results["whole"][0][:3] != ranking.ranking[:3]
    assert runs["by halves"] < runs["whole"]
    only_first = [label for label, errors in halved.saved.items() if len(errors) == 1]
    spared = check.count - len(range(0, check.count, 2))  # the odd runs of each swap measured on its first half
    assert only_first and runs["whole"] - runs["by halves"] == spared * len(only_first)
    assert not halved._first  # no first half is kept once its swap lost or was measured in full


def test_with_a_pipeline_but_batches_of_unknown_prompts_auto_checks_a_latent_trajectory():
    pipe = tiny_toy_pipeline("flux")
    calibration = calibration_batches(pipe, 6, seed=3, batch_size=2)  # made without the pipeline's prompts
    blockprune.compress(pipe, adapter="flux", ratio=0.5, calibration=calibration, sandwich=False, auto_refine=0,
                        **FAST)
    assert blockprune.plan(pipe).selection["checked_on"] == "trajectory"


def test_the_selection_fits_each_surrogate_once_and_chooses_as_refitting_would(monkeypatch):
    from blockprune.brll import replacement

    recorded, record_block, record_blocks = [], replacement.record_block, replacement.record_blocks

    def counting(model, block, *args, **kwargs):
        recorded.append(block.name)
        return record_block(model, block, *args, **kwargs)

    def counting_all(model, blocks, *args, **kwargs):
        recorded.extend(b.name for b in blocks)
        return record_blocks(model, blocks, *args, **kwargs)

    monkeypatch.setattr(replacement, "record_block", counting)
    monkeypatch.setattr(replacement, "record_blocks", counting_all)
    selections, counts = {}, {}
    for reuse in (True, False):  # accumulators elsewhere (record_device) turn the reuse off
        recorded.clear()
        model = make_flux(double=2, single=4)
        blockprune.compress(model, ratio=0.5, calibration=flux_batches(8), sandwich=False, auto_refine=1,
                            sampling_steps=12, **({} if reuse else {"record_device": "cpu"}), **FAST)
        plan = blockprune.plan(model)
        selections[reuse], counts[reuse] = plan.selection, {b: recorded.count(b) for b in plan.blocks}
    assert {k: selections[True][k] for k in ("candidates", "finalists", "chosen")} == \
        {k: selections[False][k] for k in ("candidates", "finalists", "chosen")}
    # fit_residual, the replace ablation and the plan checks share one fit per block; the stages fit their own
    assert counts[True] == {b: 1 + (b in plan.replaced_names) for b in plan.blocks}
    assert sum(counts[False].values()) >= sum(counts[True].values()) + len(plan.blocks)
