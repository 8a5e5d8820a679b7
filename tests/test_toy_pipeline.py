"""ToyPipeline: sampling, the adapters' generate/call_pipeline, compress without calibration, save/load, registry."""

import pytest
import torch

import blockprune
from blockprune import plugins
from blockprune.errors import BlockpruneError
from blockprune.toy import (
    ToyConfig,
    ToyPipeline,
    calibration_batches,
    evaluate,
    evaluation_prompts,
    generate,
)
from blockprune.toy.pipeline import weight_files
from blockprune.toy.small_models import toy_small_models

BLOCKS = {"flux": (2, 2), "sd3": (3,)}


def tiny_toy_pipeline(family: str = "flux", seed: int = 0) -> ToyPipeline:
    config = ToyConfig(family=family, width=16, heads=2, blocks=BLOCKS[family], text_width=16, text_layers=1,
                       text_heads=2, num_inference_steps=3, guidance_scale=2.0)
    return ToyPipeline.from_config(config, seed=seed)


@pytest.fixture(params=sorted(BLOCKS))
def toy_family(request):
    return request.param


def test_generation_shapes_range_and_determinism(toy_family):
    pipe = tiny_toy_pipeline(toy_family)
    images = pipe(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = pipe(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(images, again)
    # one generator per image: the same image whatever the batching
    batched = pipe(["a red circle", "a red circle"], generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    alone = pipe("a red circle", generator=torch.Generator().manual_seed(6)).images
    assert torch.allclose(batched[1:], alone, atol=1e-5)
    latent = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latent.shape == (1, 3, 32, 32) and latent.min() < 0
    assert pipe("a red circle", num_images_per_prompt=3, guidance_scale=1.0).images.shape == (3, 3, 32, 32)


def test_sample_draws_the_calls_images_and_trains_through_every_step():
    pipe = tiny_toy_pipeline("flux")
    prompts = ["a red circle", "two blue squares"]
    latent = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent").images
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pipe.sample(noise, prompts, 3, 2.0), latent)
    pipe.transformer.zero_grad()
    pipe.sample(noise, prompts, 3, 2.0).square().mean().backward()
    grads = [p.grad for p in pipe.transformer.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_evaluate_against_the_teacher_itself():
    pipe = tiny_toy_pipeline()
    prompts, seeds = evaluation_prompts(6, seed=2), list(range(6))
    teacher = generate(pipe, prompts, seeds, num_inference_steps=2, batch_size=4)  # batching must not matter
    results = evaluate(pipe, prompts, seeds, teacher_images=teacher, num_inference_steps=2)
    assert set(results) == {"accuracy", "count", "colour", "kind", "relation", "frechet", "psnr", "ssim"}
    assert results["psnr"] > 60 and results["ssim"] == pytest.approx(1.0) and 0 <= results["accuracy"] <= 1
    with pytest.raises(BlockpruneError, match="got 6 prompts and 1 seeds"):
        generate(pipe, prompts, [0])


def test_bad_calls_are_errors():
    pipe = tiny_toy_pipeline()
    with pytest.raises(BlockpruneError, match="output_type must be one of pt, latent, got 'np'"):
        pipe("a red circle", output_type="np")
    with pytest.raises(BlockpruneError, match="num_inference_steps must be a positive integer, got 0"):
        pipe("a red circle", num_inference_steps=0)
    with pytest.raises(BlockpruneError, match="got 1 generators for 2 images"):
        pipe(["a", "b"], generator=[torch.Generator()])
    with pytest.raises(BlockpruneError, match="blocks=\\(2, 2\\) does not fit the sd3 family"):
        ToyConfig(family="sd3", blocks=(2, 2))
    with pytest.raises(BlockpruneError, match="unknown toy model family 'dit'"):
        ToyConfig(family="dit")


def test_adapter_generate_and_compress_without_calibration(toy_family):
    pipe = tiny_toy_pipeline(toy_family)
    adapter = plugins.get_adapter(pipe.transformer)
    assert adapter.name == toy_family
    images = adapter.generate(pipe, ["a red circle", "a blue square"], [0, 1], 2)
    assert images.shape == (4, 3, 32, 32)
    returned = blockprune.compress(pipe, ratio=0.25, sandwich=False, progress=False, cache_dir=False,
                                   calibration_prompts=evaluation_prompts(3), calibration_steps=4)
    assert returned is pipe
    plan = blockprune.plan(pipe)
    assert len(plan.replaced) == 1
    assert isinstance(pipe.transformer.get_submodule(plan.replaced[0].name), blockprune.LinearSurrogate)
    # 3 prompts × 2 kept steps × (prompt + empty prompt for guidance) × 64 image tokens
    assert plan.replaced[0].streams["hidden_states"].tokens == 3 * 2 * 2 * 64
    assert torch.isfinite(pipe("a red circle", generator=torch.Generator().manual_seed(0)).images).all()


def test_compress_with_sandwich_training_records_through_the_pipeline(toy_family):
    pipe = tiny_toy_pipeline(toy_family)
    blockprune.compress(pipe, ratio=0.34, progress=False, cache_dir=False, calibration_prompts=evaluation_prompts(4),
                        calibration_steps=4, sandwich=True, sandwich_steps=3, heal_steps=0)
    assert len(blockprune.plan(pipe).replaced) == 1
    assert torch.isfinite(pipe("a red circle", generator=torch.Generator().manual_seed(0)).images).all()


def test_compress_records_calibration_on_the_bundled_prompts():
    pipe = tiny_toy_pipeline("sd3")
    blockprune.compress(pipe, ratio=0.34, sandwich=False, progress=False, cache_dir=False, calibration_steps=2,
                        steps_per_prompt=1)
    assert blockprune.plan(pipe).replaced[0].streams["hidden_states"].tokens == 40 * 2 * 64


def test_save_and_load_round_trip(tmp_path, toy_family):
    pipe = tiny_toy_pipeline(toy_family)
    files = pipe.save_pretrained(tmp_path, "toy", metadata={"steps": 7})
    assert set(files) == {"config", "transformer", "text_encoder"}
    loaded = ToyPipeline.from_pretrained("toy", tmp_path)
    assert loaded.metadata == {"steps": 7} and loaded.config == pipe.config
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images
    got = loaded("a red circle", generator=torch.Generator().manual_seed(0)).images
    assert (got - expected).abs().max() < 0.02  # fp16 weights
    with pytest.raises(BlockpruneError, match="toy model 'other' is missing"):
        ToyPipeline.from_pretrained("other", tmp_path)
    blockprune.compress(pipe, ratio=0.3, calibration=calibration_batches(pipe, 2), sandwich=False, progress=False,
                        cache_dir=False)
    with pytest.raises(BlockpruneError, match="transformer is compressed; save it with blockprune.save_pretrained"):
        pipe.save_pretrained(tmp_path, "compressed")
    blockprune.save_pretrained(pipe, tmp_path / "compressed")
    compressed = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images
    loaded.transformer = blockprune.from_pretrained(tmp_path / "compressed")
    loaded.text_encoder = pipe.text_encoder
    assert torch.allclose(loaded("a red circle", generator=torch.Generator().manual_seed(0)).images, compressed, atol=1e-5)


def test_trained_models_are_registered_only_when_their_files_exist(tmp_path):
    assert toy_small_models(tmp_path) == {}
    pipe = tiny_toy_pipeline("flux")
    pipe.save_pretrained(tmp_path, "flux-small")
    assert set(toy_small_models(tmp_path)) == {"flux-small"}
    weight_files("flux-small", tmp_path)["text_encoder"].unlink()
    assert toy_small_models(tmp_path) == {}
    tiny_toy_pipeline("sd3").save_pretrained(tmp_path, "sd3-small")
    entry = toy_small_models(tmp_path)["sd3-small"]
    assert entry.description == "SD3 architecture, 3 blocks, width 16, trained on toy shapes"
    built = entry.build()
    batches = entry.calibration(built, 2, 0)
    assert len(batches) == 2 and set(batches[0]) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    blockprune.compress(built, adapter=entry.adapter, ratio=0.34, calibration=batches, sandwich=False, progress=False,
                        cache_dir=False)
    assert len(blockprune.plan(built).replaced) == 1


def test_calibration_can_hold_the_unconditional_inputs_of_guided_sampling():
    pipe = tiny_toy_pipeline()
    plain, again = calibration_batches(pipe, 2, seed=5), calibration_batches(pipe, 2, seed=5, unconditional=0.0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain, again) for k in a)  # the default is unchanged
    empty, _ = pipe.encode_tokens(pipe.text_encoder.empty_tokens(1))
    (all_empty,) = calibration_batches(pipe, 1, seed=5, unconditional=1.0)
    states = all_empty["encoder_hidden_states"]
    assert torch.allclose(states, empty.expand_as(states))
    mixed = torch.cat([b["encoder_hidden_states"] for b in calibration_batches(pipe, 16, seed=5, unconditional=0.5)])
    share = sum(torch.allclose(s, empty[0]) for s in mixed) / len(mixed)
    assert 0.3 < share < 0.7
