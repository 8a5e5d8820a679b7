"""compress() on a diffusers pipeline: calibration recorded from the pipeline on bundled prompts."""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import blockprune
from blockprune.calibration import bundled_prompts


def tiny_dit_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def test_bundled_prompts_are_varied():
    prompts = bundled_prompts()
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)


def test_pipeline_without_calibration_records_its_own_and_returns_the_pipeline():
    pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = bundled_prompts()[:3]
    returned = blockprune.compress(pipe, adapter="dit", ratio=0.25, sandwich=False, progress=False,
                                   calibration_prompts=prompts, calibration_steps=4, steps_per_prompt=2)
    assert returned is pipe
    plan = blockprune.plan(pipe)
    assert len(plan.replaced) == 1
    assert isinstance(pipe.transformer.get_submodule(plan.replaced[0].name), blockprune.LinearSurrogate)
    # 3 prompts × 2 kept steps, each call with a classifier-free-guidance batch of 2, 16 tokens each
    assert plan.replaced[0].streams["hidden_states"].tokens == 3 * 2 * 2 * 16
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_a_saved_model_goes_back_into_a_pipeline(tmp_path):
    pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    blockprune.compress(pipe, adapter="dit", ratio=0.25, sandwich=False, progress=False, cache_dir=False,
                        calibration_prompts=bundled_prompts()[:2], calibration_steps=2)
    blockprune.save_pretrained(pipe.transformer, tmp_path / "dit")  # the model alone (a pipeline saves whole)
    expected = pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    fresh = tiny_dit_pipeline()
    fresh.set_progress_bar_config(disable=True)
    fresh.transformer = blockprune.from_pretrained(tmp_path / "dit")
    assert blockprune.plan(fresh).replaced_names == blockprune.plan(pipe).replaced_names
    got = fresh(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (got == expected).all()
