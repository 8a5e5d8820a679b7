"""Whole diffusers pipelines with a compressed transformer: both save paths, both load paths, the plain diffusers
path failing by name, ``blockprune inspect`` on a pipeline folder, LoRA, FirstBlockCache and compile in a pipeline."""

import logging

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.hooks import FirstBlockCacheConfig
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_cli import run_cli
from tiny_pipelines import compressed_flux_pipeline, flux_images, tiny_flux_pipeline

import blockprune
from blockprune import LinearSurrogate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed FLUX pipeline, its images, and the folders written by both save paths."""
    pipe = compressed_flux_pipeline()
    folder = tmp_path_factory.mktemp("pipelines")
    blockprune.save_pretrained(pipe, folder / "blockprune")
    pipe.save_pretrained(folder / "diffusers")
    return pipe, flux_images(pipe), folder


@pytest.mark.parametrize("path", ["blockprune", "diffusers"])
def test_a_saved_pipeline_comes_back_whole_with_identical_images(saved, path):
    pipe, expected, folder = saved
    assert (folder / path / "transformer" / "blockprune.json").is_file()
    loaded = blockprune.from_pretrained(folder / path)
    assert isinstance(loaded, FluxPipeline)
    assert blockprune.plan(loaded).replaced_names == blockprune.plan(pipe).replaced_names
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(flux_images(loaded), expected)


def test_diffusers_loads_the_pipeline_given_the_transformer(saved):
    _, expected, folder = saved
    transformer = blockprune.from_pretrained(folder / "blockprune" / "transformer")
    loaded = DiffusionPipeline.from_pretrained(folder / "blockprune", transformer=transformer)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(flux_images(loaded), expected)


@pytest.mark.parametrize("path", ["blockprune", "diffusers"])
def test_plain_diffusion_pipeline_from_pretrained_fails_naming_blockprune(saved, path):
    _, _, folder = saved
    with pytest.raises(ValueError, match=r"blockprune\.from_pretrained\(pipeline_folder\)"):
        DiffusionPipeline.from_pretrained(folder / path)


def test_inspect_a_pipeline_folder(saved, capsys):
    _, _, folder = saved
    code, out, err = run_cli(capsys, "inspect", folder / "blockprune")
    assert code == 0, err
    assert "blockprune plan: 2 of 4 blocks replaced" in out


def test_a_pipeline_loads_in_bfloat16_directly(saved):
    _, _, folder = saved
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        loaded = blockprune.from_pretrained(folder / "blockprune", torch_dtype=torch.bfloat16)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "Casting directly" in r.getMessage()]
    for component in (loaded.transformer, loaded.vae, loaded.text_encoder_2):
        assert {p.dtype for p in component.parameters()} == {torch.bfloat16}
    loaded.set_progress_bar_config(disable=True)
    assert torch.isfinite(flux_images(loaded).float()).all()


def test_a_lora_made_for_the_original_model_loads_onto_the_compressed_pipeline(saved, tmp_path):
    pipe, expected, _ = saved
    original = tiny_flux_pipeline().transformer
    original.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(original))
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    try:
        kept = pipe.transformer.single_transformer_blocks[0].attn.to_q
        assert "style" in kept.lora_A  # on the kept blocks; the replaced blocks' entries have nothing to load into
        with_lora = flux_images(pipe)
        assert not torch.allclose(with_lora, expected, atol=1e-4)
        pipe.set_adapters("style", 0.0)
        assert torch.allclose(flux_images(pipe), expected, atol=1e-6)
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(flux_images(pipe), expected)


def test_first_block_cache_and_fullgraph_compile_in_a_compressed_pipeline(saved, tmp_path):
    pipe, expected, _ = saved
    assert isinstance(pipe.transformer.transformer_blocks[0], LinearSurrogate)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        assert torch.equal(flux_images(pipe), expected)
    finally:
        pipe.transformer.disable_cache()
    transformer = pipe.transformer
    torch._dynamo.reset()
    pipe.transformer = torch.compile(transformer, fullgraph=True, backend="eager")
    try:
        assert torch.allclose(flux_images(pipe), expected, atol=1e-5)
        blockprune.save_pretrained(pipe, tmp_path / "compiled")  # saved as the model the wrapper holds
    finally:
        pipe.transformer = transformer
    loaded = blockprune.from_pretrained(tmp_path / "compiled")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(flux_images(loaded), expected)
