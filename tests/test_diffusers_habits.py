"""A compressed model used as diffusers users use models: its own save_pretrained, diffusers' loaders refusing
blockprune's format by name, torch.compile(fullgraph=True), FirstBlockCache, and the refusals (LoRA, quantized)."""

import copy
import json
import logging

import pytest
import torch
from conftest import MODELS, cast_batch, flux_batches, make_flux
from diffusers import FluxTransformer2DModel
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.hooks._helpers import TransformerBlockRegistry
from peft import LoraConfig

import blockprune
from blockprune import BlockpruneError, LinearSurrogate
from blockprune.runtime.forward import output_tensor


def _compressed(name="flux", ratio=0.5):
    make, batches = MODELS[name]
    model = make()
    blockprune.compress(model, adapter=name, ratio=ratio, calibration=batches(4), sandwich=False, progress=False,
                        order="start2end", cache_dir=False)
    return model, batches(1, seed=3)[0]


def _same_output(first, second, batch, exact=True):
    with torch.no_grad():
        a, b = output_tensor(first(**batch)), output_tensor(second(**batch))
    return torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_models_own_save_pretrained_writes_blockprunes_format(name, tmp_path):
    model, batch = _compressed(name)
    model.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors", "blockprune.json"}
    loaded = blockprune.from_pretrained(tmp_path / "model")
    assert blockprune.plan(loaded).replaced_names == blockprune.plan(model).replaced_names
    assert _same_output(loaded, model, batch)
    loaded.save_pretrained(tmp_path / "again")  # a loaded model keeps the habit
    assert _same_output(blockprune.from_pretrained(tmp_path / "again"), model, batch)


def test_diffusers_own_loader_refuses_the_folder_naming_blockprune(tmp_path):
    model, _ = _compressed("flux")
    model.save_pretrained(tmp_path)
    for options in ({}, {"low_cpu_mem_usage": False}):
        with pytest.raises(ValueError, match=r"load it with blockprune\.from_pretrained\(folder\)"):
            FluxTransformer2DModel.from_pretrained(tmp_path, **options)
    assert "quantization_config" not in blockprune.from_pretrained(tmp_path).config


def test_a_folder_saved_before_the_marker_still_loads(tmp_path):
    model, batch = _compressed("flux")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _same_output(blockprune.from_pretrained(tmp_path), model, batch)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fullgraph_compile_of_a_compressed_model(name):
    model, batch = _compressed(name)
    if name == "flux":
        batch = {**batch, "joint_attention_kwargs": {}}  # as FluxPipeline calls it
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert _same_output(compiled, model, batch, exact=False)


def test_surrogates_are_registered_with_the_replaced_blocks_metadata():
    model, _ = _compressed("flux", ratio=1.0 - 1e-9)
    for name in ("transformer_blocks.0", "single_transformer_blocks.0"):
        surrogate = model.get_submodule(name)
        assert isinstance(surrogate, LinearSurrogate)
        ours = TransformerBlockRegistry.get(type(surrogate))
        theirs = TransformerBlockRegistry.get(surrogate.replaced_class)
        assert (ours.return_hidden_states_index, ours.return_encoder_hidden_states_index) == (
            theirs.return_hidden_states_index, theirs.return_encoder_hidden_states_index)
        hidden = torch.randn(1, 3, 16)
        # diffusers finds the stream among positional arguments through the replaced block's signature
        assert ours._get_parameter_from_args_kwargs("hidden_states", (hidden,)) is hidden
    assert type(model.transformer_blocks[0]) is not type(model.single_transformer_blocks[0])


def test_first_block_cache_on_a_compressed_flux_skips_the_later_blocks():
    model, _ = _compressed("flux")  # the head block, transformer_blocks.0, is a surrogate
    assert isinstance(model.transformer_blocks[0], LinearSurrogate)
    steps = flux_batches(3, seed=5)
    tail_calls = []  # calls that reach a kept block's inner layer (a skipped block does not run it)
    model.single_transformer_blocks[1].proj_out.register_forward_hook(lambda *_: tail_calls.append(1))
    def denoise():
        with torch.no_grad(), model.cache_context("cond"):  # as a pipeline calls it
            return [output_tensor(model(**batch)) for batch in steps]

    with torch.no_grad():
        plain = [output_tensor(model(**batch)) for batch in steps]
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips: the same outputs
    assert all(torch.equal(got, out) for got, out in zip(denoise(), plain))
    model.disable_cache()
    calls_before = len(tail_calls)
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skips the later blocks after the first step
    cached = denoise()
    model.disable_cache()
    assert len(tail_calls) - calls_before == 1
    assert torch.equal(cached[0], plain[0]) and torch.isfinite(torch.stack(cached)).all()


def test_compressing_a_model_with_an_unfused_lora_is_refused():
    model = make_flux()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    with pytest.raises(BlockpruneError, match=r"LoRA.*fuse.*unload"):
        blockprune.compress(model, adapter="flux", ratio=0.5, calibration=flux_batches(2), sandwich=False,
                            progress=False, cache_dir=False)
    with_lora = copy.deepcopy(model)
    model.fuse_lora()
    model.unload_lora()
    batch = flux_batches(1, seed=3)[0]
    assert _same_output(model, with_lora, batch, exact=False)  # the LoRA is now in the weights
    blockprune.compress(model, adapter="flux", ratio=0.5, calibration=flux_batches(2), sandwich=False,
                        progress=False, cache_dir=False)
    assert len(blockprune.plan(model).replaced) == 2


def test_a_compiled_model_is_saved_as_the_model_it_wraps(tmp_path):
    model, batch = _compressed("flux")
    compiled = torch.compile(model, backend="eager")
    blockprune.save_pretrained(compiled, tmp_path / "by-blockprune")
    compiled.save_pretrained(tmp_path / "own")
    for folder in ("by-blockprune", "own"):
        manifest = json.loads((tmp_path / folder / "blockprune.json").read_text())
        assert manifest["model_class"].endswith(":FluxTransformer2DModel")
        assert _same_output(blockprune.from_pretrained(tmp_path / folder), model, batch)


def test_a_quantized_model_is_refused_before_anything_is_written(tmp_path):
    model, _ = _compressed("flux")
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(BlockpruneError, match="quantized.*save the compressed model before quantizing"):
        blockprune.save_pretrained(quantized, tmp_path / "q")
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_no_partial_folder_and_the_earlier_save_intact(tmp_path, monkeypatch):
    model, _ = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("blockprune.serialization.save_safetensors", disk_full)
    for folder in ("new", "kept"):
        with pytest.raises(OSError, match="No space left"):
            blockprune.save_pretrained(model, tmp_path / folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no temporary folder is left either
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before


def test_loading_in_bfloat16_is_direct_and_prints_no_casting_warning(tmp_path):
    model, batch = _compressed("flux")
    model.save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        loaded = blockprune.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "Casting directly" in r.getMessage()]
    assert {t.dtype for t in [*loaded.parameters(), *loaded.buffers()] if t.is_floating_point()} == {torch.bfloat16}
    cast = copy.deepcopy(model).to(torch.bfloat16)
    half = cast_batch(batch, torch.bfloat16)
    assert _same_output(loaded, cast, half)
