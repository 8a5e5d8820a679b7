"""Trajectory checks: importance="auto" and the heal guard step as the user's sampler does, guided, on enough noise."""

import copy
import io
import warnings

import pytest
import torch
from conftest import flux_batches, make_flux
from rich.console import Console
from test_toy_pipeline import tiny_toy_pipeline
from tiny_pipelines import TEXT_LENGTH, recorded_calibration, tiny_flux_pipeline

import blockprune
from blockprune import plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError, UnusedOptionWarning
from blockprune.report import selection_table, stages_table
from blockprune.scoring.auto import TRAJECTORY_STEPS, PlanEvaluator, split_for_selection
from blockprune.scoring.guidance import (
    guidance_scale,
    pipeline_guidance_scale,
    resolve_guidance,
)
from blockprune.scoring.trajectory import (
    MIN_TRAJECTORIES,
    flow_trajectory,
    latent_check,
)
from blockprune.toy import ToyPipeline, calibration_batches
from blockprune.toy.models import transformer_inputs

FAST = {"progress": False, "cache_dir": False}


def test_the_guided_trajectory_is_what_the_pipeline_samples():
    pipe = ToyPipeline.from_pretrained("sd3-small")
    adapter = plugins.get_adapter(pipe.transformer, "sd3")
    guidance = resolve_guidance(adapter, pipe, None, None)
    assert guidance.scale == pipe.config.guidance_scale == 2.0
    with torch.no_grad():
        empty_states, empty_pooled = pipe.encode_tokens(pipe.text_encoder.empty_tokens(1))
    assert torch.allclose(guidance.empty["encoder_hidden_states"], empty_states, atol=1e-6)
    assert torch.allclose(guidance.empty["pooled_projections"], empty_pooled, atol=1e-6)
    states, pooled = pipe.encode_prompt(["two blue squares"])
    sampled = pipe("two blue squares", num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    batch = transformer_inputs(pipe.transformer, pipe.config, torch.zeros_like(sampled), torch.ones(1), states, pooled)
    with torch.no_grad():
        guided = flow_trajectory(pipe.transformer, batch, 0, adapter.flow_time_scale, 8, guidance)
        unguided = flow_trajectory(pipe.transformer, batch, 0, adapter.flow_time_scale, 8)
    assert torch.allclose(guided, sampled, atol=1e-4)  # the same noise (seed 0) and the same 8 guided steps
    assert (unguided - sampled).abs().max() > 0.5


def test_guided_and_unguided_checks_order_two_sd3_small_plans_differently():
    """The case found in benchmarks/selection_check.py (docs/results.md): on sd3-small, seed 2, images sampled with
    guidance prefer blocks 7 + 6 and the unguided check preferred 7 + 5; the guided check agrees with the images."""
    torch.manual_seed(2)
    pipe = ToyPipeline.from_pretrained("sd3-small")
    adapter = plugins.get_adapter(pipe.transformer, "sd3")
    fit, held = split_for_selection(calibration_batches(pipe, 32, seed=1002, batch_size=8), 0.25)
    blocks = resolve_blocks(pipe.transformer, adapter, fit[0])
    first, second = ["transformer_blocks.7", "transformer_blocks.6"], ["transformer_blocks.7", "transformer_blocks.5"]
    errors = {}
    with torch.no_grad():
        for name, guidance in (("unguided", None), ("guided", resolve_guidance(adapter, pipe, None, None))):
            measure = latent_check(pipe.transformer, held, adapter.flow_time_scale, TRAJECTORY_STEPS, guidance)
            evaluator = PlanEvaluator(pipe.transformer, blocks, fit, 1e-6, None, measure)
            errors[name] = (evaluator.error(first), evaluator.error(second))
    assert errors["unguided"][1] < errors["unguided"][0]
    assert errors["guided"][0] < errors["guided"][1]


def test_auto_and_the_heal_guard_report_the_guidance_they_checked_with():
    runs = {}
    for scale in (None, 1.0):
        pipe = tiny_toy_pipeline("sd3")
        calibration = calibration_batches(pipe, 8, seed=3, batch_size=2)
        blockprune.compress(pipe, adapter="sd3", ratio=0.5, calibration=calibration, guidance_scale=scale,
                            auto_refine=0, sandwich_steps=2, sandwich_lr=1e-4, heal_steps=2, **FAST)
        runs[scale] = blockprune.plan(pipe)
    guided, unguided = runs[None], runs[1.0]
    assert guided.selection["checked_on"] == "trajectory" and guided.selection["guidance_scale"] == 2.0
    assert guided.heal["guidance_scale"] == 2.0 and unguided.heal["guidance_scale"] == 1.0
    assert unguided.selection["guidance_scale"] == 1.0
    assert guided.selection["candidates"] != unguided.selection["candidates"]
    shown = {}
    for name, plan in runs.items():
        console = Console(file=io.StringIO(), width=240)
        console.print(selection_table(plan))
        console.print(stages_table(plan))
        shown[name] = console.file.getvalue()
    assert shown[None].count("guided at scale 2") == 2 and "guided" not in shown[1.0]  # the selection and healing


def test_diffusers_flux_is_checked_unguided_unless_a_scale_is_given():
    """diffusers' FLUX pipelines feed guidance_scale into the model (distilled) and apply true_cfg_scale only
    against a negative prompt: blockprune does not guess; an explicit guidance_scale guides against the empty prompt."""
    pipe = tiny_flux_pipeline()
    adapter = plugins.get_adapter(pipe.transformer, "flux")
    assert adapter.guidance_argument(pipe) is None
    assert pipeline_guidance_scale(adapter, pipe, {"true_cfg_scale": 4.0, "guidance_scale": 3.5}) == 1.0
    assert resolve_guidance(adapter, pipe, None, {"true_cfg_scale": 4.0}) is None
    options = {"height": 8, "width": 8, "max_sequence_length": TEXT_LENGTH}
    guidance = resolve_guidance(adapter, pipe, 3.0, options)
    batch = recorded_calibration(pipe, ["a red fox"])[0]
    empty = guidance.unconditional(batch, 0)
    assert guidance.scale == 3.0 and set(guidance.empty) == {"encoder_hidden_states", "pooled_projections"}
    assert empty["encoder_hidden_states"].shape == batch["encoder_hidden_states"].shape
    assert not torch.equal(empty["encoder_hidden_states"], batch["encoder_hidden_states"])
    assert empty["hidden_states"] is batch["hidden_states"]


def test_a_pipeline_scale_of_one_or_less_samples_unguided():
    pipe = tiny_toy_pipeline("sd3")
    adapter = plugins.get_adapter(pipe.transformer, "sd3")
    assert guidance_scale(adapter, pipe, None, None) == 2.0  # the toy config's
    for scale in (1.0, 0.0):  # e.g. SD3.5 Turbo's 0: diffusers' pipelines guide only above 1
        assert guidance_scale(adapter, pipe, None, {"guidance_scale": scale}) == 1.0
        assert resolve_guidance(adapter, pipe, None, {"guidance_scale": scale}) is None


def test_a_workdir_of_another_guidance_scale_is_not_resumed(tmp_path):
    pipe = tiny_toy_pipeline("sd3")
    options = {"adapter": "sd3", "ratio": 0.5, "calibration": calibration_batches(pipe, 8, seed=3, batch_size=2),
               "sandwich": False, "auto_refine": 0, "workdir": tmp_path / "work", **FAST}
    blockprune.compress(copy.deepcopy(pipe), **options)  # the pipeline's scale, 2
    with pytest.raises(BlockpruneError, match="belongs to another compress call .*guidance_scale"):
        blockprune.compress(copy.deepcopy(pipe), calibration_call_options={"guidance_scale": 3.0}, **options)


def test_bad_guidance_settings_are_refused_with_the_fix():
    with pytest.raises(BlockpruneError, match="guidance_scale must be a finite number ≥ 1"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), guidance_scale=0.5, **FAST)
    with pytest.raises(BlockpruneError, match="needs the pipeline, to encode the empty prompt"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), guidance_scale=2.0, sandwich=False, **FAST)
    pipe = tiny_toy_pipeline("flux")
    adapter = plugins.get_adapter(pipe.transformer, "flux")
    guidance = resolve_guidance(adapter, pipe, None, None)
    batch = calibration_batches(pipe, 1, batch_size=2)[0]
    batch["encoder_hidden_states"] = batch["encoder_hidden_states"][:, :3]  # text of another length
    with pytest.raises(BlockpruneError, match="recorded with the pipeline's own text settings.*guidance_scale=1"):
        guidance.unconditional(batch, 0)


def test_guidance_scale_without_auto_or_healing_is_reported_unused():
    pipe = tiny_toy_pipeline("flux")
    calibration = calibration_batches(pipe, 4, seed=3, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockprune.compress(pipe, adapter="flux", ratio=0.5, calibration=calibration, order="end2start",
                            guidance_scale=3.0, sandwich=False, **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnusedOptionWarning)]
    assert any("guidance_scale does nothing" in m for m in messages), messages


def test_a_small_held_out_share_is_checked_on_fresh_noise_up_to_the_minimum():
    """With one held-out batch of 4 samples the noise drawn decided the check (flux-small: a plan 3.8 dB worse in
    its images won); repeated with fresh noise up to MIN_TRAJECTORIES samples, the check ranked the plans right."""
    pipe = tiny_toy_pipeline("flux")
    held = calibration_batches(pipe, 1, seed=3, batch_size=4)
    with torch.no_grad():
        trajectories = latent_check(pipe.transformer, held, 1.0, 2)()
    assert len(trajectories) * 4 == MIN_TRAJECTORIES
    assert not torch.equal(trajectories[0], trajectories[1])  # the same captions, other noise
    many = calibration_batches(pipe, 9, seed=3, batch_size=4)  # 36 samples: enough as they are
    assert len(latent_check(pipe.transformer, many, 1.0, 2)()) == 9
