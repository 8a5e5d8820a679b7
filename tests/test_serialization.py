"""save_pretrained / from_pretrained: files, exact round trip, meta device, bad folders."""

import copy
import json

import pytest
import torch
from conftest import MODELS, cast_batch, flux_batches, make_flux
from safetensors.torch import load_file, save_file

import blockprune
from blockprune import LinearSurrogate
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import output_tensor
from blockprune.toy import calibration_batches


def _compressed(name="flux", ratio=0.5):
    make, batches = MODELS[name]
    model = make()
    blockprune.compress(model, adapter=name, ratio=ratio, calibration=batches(4), sandwich=False, progress=False,
                        order="start2end")
    return model, batches(2, seed=3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_exact(name, tmp_path):
    model, held_out = _compressed(name)
    blockprune.save_pretrained(model, tmp_path)
    loaded = blockprune.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        for batch in held_out:
            assert torch.equal(output_tensor(loaded(**batch)), output_tensor(model(**batch)))
    assert blockprune.plan(loaded).replaced_names == blockprune.plan(model).replaced_names
    for name_ in blockprune.plan(loaded).replaced_names:
        assert isinstance(loaded.get_submodule(name_), LinearSurrogate)


def test_files_hold_surrogates_not_replaced_blocks(tmp_path):
    model, _ = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "blockprune.json"}
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any(k.startswith("transformer_blocks.0.") and ".linears." not in k for k in keys)
    assert "transformer_blocks.0.linears.hidden_states.weight" in keys
    assert any(k.startswith("single_transformer_blocks.0.attn.") for k in keys)  # kept block
    manifest = json.loads((tmp_path / "blockprune.json").read_text())
    assert manifest["format_version"] == 1 and manifest["adapter"] == "flux" and manifest["dtype"] == "float32"
    assert manifest["replaced"][0] == {
        "name": "transformer_blocks.0",
        "kind": "FluxTransformerBlock",
        "spec": {"outputs": ["encoder_hidden_states", "hidden_states"], "kept_submodules": []},
        "streams": {"encoder_hidden_states": [16, 16], "hidden_states": [16, 16]},
    }
    assert manifest["plan"]["replaced"][0]["name"] == "transformer_blocks.0"


def test_dit_block_zero_keeps_the_embedding_through_save_and_load(tmp_path):
    model, held_out = _compressed("dit", ratio=0.25)
    assert blockprune.plan(model).replaced_names == ["transformer_blocks.0"]
    assert hasattr(model.transformer_blocks[0], "norm1")
    blockprune.save_pretrained(model, tmp_path)
    loaded = blockprune.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**held_out[0])), output_tensor(model(**held_out[0])))


def test_replaced_blocks_are_never_materialised(tmp_path, monkeypatch):
    model, _ = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path)
    created = []
    original_init = torch.nn.Linear.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    blockprune.from_pretrained(tmp_path)
    assert created and set(created) == {"meta"}


def test_dtype_and_device_options(tmp_path):
    model, held_out = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path)
    loaded = blockprune.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {t.device for t in [*loaded.parameters(), *loaded.buffers()]} == {torch.device("cpu")}
    cast = copy.deepcopy(model).to(torch.bfloat16)
    batch = cast_batch(held_out[0], torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**batch)), output_tensor(cast(**batch)))


def test_sharded_round_trip(tmp_path):
    model, held_out = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = blockprune.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**held_out[0])), output_tensor(model(**held_out[0])))


@pytest.mark.parametrize("first_shard_bytes", [20_000, 10 * 2**30], ids=["sharded-then-single", "single-then-sharded"])
def test_saving_again_into_a_folder_leaves_no_weights_of_the_earlier_save(tmp_path, first_shard_bytes):
    first, _ = _compressed("flux")
    (tmp_path / "notes.txt").write_text("kept")
    blockprune.save_pretrained(first, tmp_path, max_shard_bytes=first_shard_bytes)
    second, held_out = _compressed("flux", ratio=0.25)
    second_shard_bytes = 10 * 2**30 if first_shard_bytes == 20_000 else 20_000
    blockprune.save_pretrained(second, tmp_path, max_shard_bytes=second_shard_bytes)
    files = sorted(p.name for p in tmp_path.iterdir())
    if second_shard_bytes == 20_000:
        assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    else:
        assert not any(name.startswith("model-") or name.endswith(".index.json") for name in files)
    assert "notes.txt" in files
    loaded = blockprune.from_pretrained(tmp_path)
    assert len(blockprune.plan(loaded).replaced) == 1
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**held_out[0])), output_tensor(second(**held_out[0])))


def test_saving_a_run_without_sandwich_stages_removes_an_earlier_runs_stages(tmp_path):
    trained = make_flux()
    blockprune.compress(trained, ratio=0.25, calibration=flux_batches(6), sandwich_steps=2, heal_steps=0,
                        progress=False, cache_dir=False)
    blockprune.save_pretrained(trained, tmp_path)
    assert (tmp_path / "stages.safetensors").is_file()
    plain, _ = _compressed("flux", ratio=0.5)  # least squares alone
    blockprune.save_pretrained(plain, tmp_path)
    assert not (tmp_path / "stages.safetensors").exists()
    lower = make_flux()
    blockprune.compress(lower, ratio=0.25, calibration=flux_batches(2), progress=False, reuse_from=tmp_path)
    assert blockprune.plan(lower).stages == []  # nothing of the first run is reused


def test_pipeline_round_trip_into_a_pipeline_slot(tmp_path):
    from test_toy_pipeline import tiny_toy_pipeline

    pipe = tiny_toy_pipeline("flux")
    blockprune.compress(pipe, adapter="flux", ratio=0.5, calibration=calibration_batches(pipe, 4, batch_size=2),
                        sandwich=False, progress=False, order="start2end")
    blockprune.save_pretrained(pipe, tmp_path)

    fresh = tiny_toy_pipeline("flux")
    untouched = fresh.transformer
    fresh.transformer = blockprune.from_pretrained(tmp_path, device="cpu")
    assert fresh.device == torch.device("cpu")
    assert {t.device for t in [*fresh.transformer.parameters(), *fresh.transformer.buffers()]} == {torch.device("cpu")}
    assert blockprune.plan(fresh).replaced_names == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(isinstance(fresh.transformer.get_submodule(n), LinearSurrogate) for n in blockprune.plan(fresh).replaced_names)

    def images(pipeline):
        return pipeline(["a red circle", "two blue squares"], num_inference_steps=2,
                        generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

    expected = images(pipe)
    assert torch.equal(images(fresh), expected)
    fresh.transformer = untouched
    assert not torch.allclose(images(fresh), expected, atol=1e-3)


def test_folder_not_written_by_blockprune(tmp_path):
    make_flux().save_pretrained(tmp_path)  # a plain diffusers folder
    with pytest.raises(BlockpruneError, match="not written by blockprune.save_pretrained: it has no blockprune.json"):
        blockprune.from_pretrained(tmp_path)
    with pytest.raises(BlockpruneError, match="is not a folder"):
        blockprune.from_pretrained(tmp_path / "nope")


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    model, _ = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "transformer_blocks.0.linears.hidden_states.weight"

    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(BlockpruneError, match=f"missing {key}"):
        blockprune.from_pretrained(tmp_path)

    save_file({**weights, key: torch.zeros(3, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(BlockpruneError, match=rf"tensor {key} .* has shape \(3, 3\), the model expects \(16, 16\)"):
        blockprune.from_pretrained(tmp_path)

    save_file({**weights, "extra.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(BlockpruneError, match="unexpected extra.weight"):
        blockprune.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(BlockpruneError, match="lacks model.safetensors"):
        blockprune.from_pretrained(tmp_path)


def test_bad_manifest_version_and_uncompressed_model(tmp_path):
    model, _ = _compressed("flux")
    blockprune.save_pretrained(model, tmp_path)
    manifest = json.loads((tmp_path / "blockprune.json").read_text())
    (tmp_path / "blockprune.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BlockpruneError, match="format version 99"):
        blockprune.from_pretrained(tmp_path)
    with pytest.raises(BlockpruneError, match="was not compressed by blockprune"):
        blockprune.save_pretrained(make_flux(), tmp_path / "other")
