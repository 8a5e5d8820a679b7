"""Hardening: nothing pickled or imported from files, contained weight paths, saved dtype, damaged files, exact
fingerprints, damaged caches and workdirs."""

import json
import logging
import re
import shutil
import sys

import pytest
import torch
from conftest import cast_batch, dit_batches, flux_batches, make_dit, make_flux
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

import blockprune
from blockprune import plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError
from blockprune.runtime.fingerprint import model_fingerprint
from blockprune.runtime.forward import output_tensor
from blockprune.runtime.workdir import Workdir
from blockprune.sandwich.data import (
    ActivationStore,
    SpanSample,
    record_block_outputs,
    record_span_inputs,
)

# ---------------------------------------------------------------------------------------------------------------
# 1. spilled activations: safetensors, never pickle


def _assert_same(got, expected, where="item"):
    """Equal structure, types, tensors (values, dtype, shape) and plain values."""
    assert type(got) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert torch.equal(got, expected), where
    elif isinstance(expected, SpanSample):
        _assert_same(got.inputs, expected.inputs, f"{where}.inputs")
        _assert_same(got.contexts, expected.contexts, f"{where}.contexts")
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


@pytest.fixture(scope="module")
def flux_span():
    model = make_flux()
    batches = flux_batches(3)
    blocks = resolve_blocks(model, plugins.get_adapter(model), batches[0])
    return model, blocks, batches


def test_spilled_span_inputs_and_outputs_round_trip_exactly(flux_span, tmp_path):
    model, blocks, batches = flux_span
    span = blocks[1:4]  # transformer_blocks.1 .. single_transformer_blocks.1: both block kinds
    in_memory = record_span_inputs(model, span, batches, budget=10**12)
    spilled = record_span_inputs(model, span, batches, budget=0, folder=tmp_path)
    assert in_memory.spilled == 0 and spilled.spilled == len(spilled) == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 3
    for index in range(3):
        got = spilled[index]
        _assert_same(got, in_memory[index])
        # FLUX passes one rotary embedding to every block: still one tensor after the round trip
        rotary = got.inputs["image_rotary_emb"]
        assert type(rotary) is tuple and got.inputs["joint_attention_kwargs"] is None
        assert all(context["image_rotary_emb"][0] is rotary[0] for context in got.contexts)
    outputs_memory = record_block_outputs(model, span[-1], batches, budget=10**12)
    outputs_spilled = record_block_outputs(model, span[-1], batches, budget=0, folder=tmp_path)
    assert outputs_spilled.spilled == 3
    for index in range(3):
        _assert_same(outputs_spilled[index], outputs_memory[index])
    spilled.close()
    outputs_spilled.close()
    assert not list(tmp_path.iterdir())


def test_non_tensor_leaves_and_dtypes_round_trip(flux_span, tmp_path):
    model, blocks, batches = flux_span
    recorded = record_span_inputs(model, blocks[:2], batches[:1], budget=10**12)[0]
    extra = {
        "scale": 0.5, "steps": 3, "flag": True, "nothing": None, "name": "mode", "size": (4, (2, 2)), "items": [1, 2.5],
        "dtype": torch.bfloat16, "device": torch.device("cpu"), 7: "int key",
        "bf16": torch.randn(3, 5).bfloat16(), "mask": torch.rand(2, 3) > 0.5, "ids": torch.arange(6).reshape(2, 3),
        "freqs": torch.polar(torch.ones(4, 2), torch.randn(4, 2)), "view": torch.randn(4, 6)[:, 1:3],
        "empty": torch.zeros(0, 3),
    }
    item = SpanSample({**recorded.inputs, **extra}, recorded.contexts)
    store = ActivationStore(0, tmp_path)
    store.append(item)
    assert store.spilled == 1
    _assert_same(store[0], item)


def test_a_value_safetensors_cannot_hold_is_refused_not_serialized(tmp_path):
    store = ActivationStore(0, tmp_path)
    item = SpanSample({"hidden_states": torch.randn(2, 4), "processor": AttnProcessor2_0()}, [])
    with pytest.raises(BlockpruneError, match=r"the item\.inputs\['processor'\] is a "
                       r"diffusers\.models\.attention_processor\.AttnProcessor2_0.*no Python object is serialized.*"
                       r"raise sandwich_activation_budget"):
        store.append(item)
    assert not list(tmp_path.iterdir())  # nothing half-written


class _Planted:
    """Unpickling this creates ``marker``: the stand-in for code run by a planted file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_planted_pickle_in_the_spill_folder_is_never_unpickled(flux_span, tmp_path):
    model, blocks, batches = flux_span
    folder, marker = tmp_path / "spill", tmp_path / "marker"
    folder.mkdir()
    planted = tmp_path / "planted.pt"
    torch.save({"hidden_states": _Planted(marker)}, planted)  # what the old torch.load(weights_only=False) read
    torch.load(planted, weights_only=False)["hidden_states"].close()  # the payload is live: unpickling runs code
    assert marker.exists()
    marker.unlink()

    store = record_span_inputs(model, blocks[:2], batches, budget=0, folder=folder)
    shutil.copy(planted, folder / "planted.pt")  # a stray file beside the shards is never opened
    shutil.copy(planted, store.items[0])  # a shard replaced by a pickle
    with pytest.raises(BlockpruneError, match=r"activation shard .*\.safetensors is not a blockprune safetensors "
                       r"shard, or is damaged; delete .*spill and run again"):
        store[0]
    _assert_same(store[1], record_span_inputs(model, blocks[:2], batches[1:2], budget=10**12)[0])
    assert not marker.exists()

    save_file({"0": torch.zeros(2)}, store.items[1])  # safetensors, but not a shard
    with pytest.raises(BlockpruneError, match="it has no blockprune.activation entry"):
        store[1]
    save_file({"0": torch.zeros(2)}, store.items[2], metadata={"blockprune.activation": '{"pickle": 0}'})
    with pytest.raises(BlockpruneError, match="unknown tag 'pickle'"):
        store[2]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2-5. from_pretrained: model class, weight paths, dtype, damaged folders


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    model = make_flux()
    blockprune.compress(model, adapter="flux", ratio=0.5, calibration=flux_batches(4), sandwich=False, progress=False,
                        order="start2end", cache_dir=False)
    folder = tmp_path_factory.mktemp("saved") / "model"
    blockprune.save_pretrained(model, folder)
    return folder, model, flux_batches(1, seed=3)[0]


@pytest.fixture
def folder(saved_flux, tmp_path):
    """A fresh copy of the saved FLUX folder, to damage."""
    copy_ = tmp_path / "model"
    shutil.copytree(saved_flux[0], copy_)
    return copy_


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "blockprune.json").read_text())
    edit(manifest)
    (folder / "blockprune.json").write_text(json.dumps(manifest))


def _set_class(folder, name):
    _edit_manifest(folder, lambda m: m.update(model_class=name))


@pytest.mark.parametrize("name, why", [
    ("this:s", "whose module 'this' is not part of diffusers"),
    ("os:system", "whose module 'os' is not part of diffusers"),
    ("diffusers_extra:FluxTransformer2DModel", "whose module 'diffusers_extra' is not part of diffusers"),
    ("diffusers:DDPMScheduler", r"which is not a diffusers model class \(a subclass of diffusers.ModelMixin"),
    ("diffusers:DiffusionPipeline", "which is not a diffusers model class"),
    ("diffusers:ModelMixin", "which is not a diffusers model class"),  # no config: not a model to build
    ("diffusers:utils", "which is not a diffusers model class"),
    ("diffusers:NoSuchModel", "which diffusers .* does not export"),
    ("diffusers.models:FluxTransformer2DModel.__init__", "in which .* is not a class name"),
])
def test_model_classes_outside_diffusers_are_refused(folder, name, why, capsys):
    _set_class(folder, name)
    with pytest.raises(BlockpruneError, match=rf"names the model class '{re.escape(name)}', {why}.*; blockprune loads "
                       r"only diffusers model classes"):
        blockprune.from_pretrained(folder)
    assert "Beautiful is better than ugly" not in capsys.readouterr().out  # "this" was not imported


def test_a_module_planted_in_the_folder_is_not_imported(folder, monkeypatch):
    marker = folder.parent / "imported"
    (folder / "blockprune_planted.py").write_text(
        f"import pathlib, diffusers\npathlib.Path({str(marker)!r}).touch()\n"
        "class FluxTransformer2DModel(diffusers.FluxTransformer2DModel):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    for name in ["blockprune_planted:FluxTransformer2DModel", "diffusers.x:blockprune_planted"]:
        _set_class(folder, name)
        with pytest.raises(BlockpruneError, match="only diffusers model classes"):
            blockprune.from_pretrained(folder)
    assert not marker.exists() and "blockprune_planted" not in sys.modules


def test_the_class_is_found_by_name_wherever_diffusers_keeps_it(folder, saved_flux):
    _set_class(folder, "diffusers.models.an_older_layout:FluxTransformer2DModel")
    loaded = blockprune.from_pretrained(folder)
    assert type(loaded) is FluxTransformer2DModel
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**saved_flux[2])), output_tensor(saved_flux[1](**saved_flux[2])))


def _index_to(folder, keys, target):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, target)}))


def test_index_entries_outside_the_folder_are_refused(folder):
    other = folder.parent / "other"
    other.mkdir()
    keys = list(load_file(folder / "model.safetensors"))
    shutil.move(folder / "model.safetensors", other / "model.safetensors")  # complete weights: following would work
    for target in ["../other/model.safetensors", str(other / "model.safetensors"), "sub/../../other/model.safetensors"]:
        _index_to(folder, keys, target)
        with pytest.raises(BlockpruneError, match=rf"names the weight file '{target}', which lies outside "
                           r".*reads weights only from the folder itself"):
            blockprune.from_pretrained(folder)


def test_index_entries_inside_the_folder_still_load(folder, saved_flux):
    (folder / "weights").mkdir()
    keys = list(load_file(folder / "model.safetensors"))
    shutil.move(folder / "model.safetensors", folder / "weights" / "all.safetensors")
    _index_to(folder, keys, "./weights/../weights/all.safetensors")
    loaded = blockprune.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**saved_flux[2])), output_tensor(saved_flux[1](**saved_flux[2])))


def test_the_saved_dtype_is_restored(tmp_path):
    model = make_dit().to(torch.bfloat16)
    calibration = [cast_batch(b, torch.bfloat16) for b in dit_batches(4)]
    blockprune.compress(model, adapter="dit", ratio=0.5, calibration=calibration,
                        sandwich=False, progress=False, cache_dir=False)
    blockprune.save_pretrained(model, tmp_path)
    loaded = blockprune.from_pretrained(tmp_path)
    floating = [t for t in [*loaded.parameters(), *loaded.buffers()] if t.is_floating_point()]
    assert any(name == "pos_embed.pos_embed" for name, _ in loaded.named_buffers())  # a non-persistent buffer
    assert floating and {t.dtype for t in floating} == {torch.bfloat16}
    with torch.no_grad():
        for batch in dit_batches(2, seed=3):
            half = cast_batch(batch, torch.bfloat16)
            assert torch.equal(output_tensor(loaded(**half)), output_tensor(model(**half)))
    as_float = blockprune.from_pretrained(tmp_path, torch_dtype=torch.float32)  # an asked dtype still wins
    assert {t.dtype for t in [*as_float.parameters(), *as_float.buffers()] if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("key", ["model_class", "dtype", "replaced", "plan"])
def test_a_manifest_without_a_key_is_named(folder, key):
    _edit_manifest(folder, lambda m: m.pop(key))
    with pytest.raises(BlockpruneError, match=rf"blockprune.json lacks the key '{key}' at the top level; the folder "
                       r"is damaged, save the model again"):
        blockprune.from_pretrained(folder)


def test_a_replaced_entry_without_a_key_is_named(folder):
    _edit_manifest(folder, lambda m: m["replaced"][1].pop("streams"))
    with pytest.raises(BlockpruneError, match="lacks the key 'streams' in replaced block 1"):
        blockprune.from_pretrained(folder)


def test_a_dtype_that_is_not_a_dtype_is_refused(folder):
    _edit_manifest(folder, lambda m: m.update(dtype="load"))
    with pytest.raises(BlockpruneError, match="names dtype 'load', which is not a torch floating dtype"):
        blockprune.from_pretrained(folder)


def test_a_block_the_model_lacks_is_named(folder):
    _edit_manifest(folder, lambda m: m["replaced"][0].update(name="transformer_blocks.9"))
    with pytest.raises(BlockpruneError, match=r"names the replaced block 'transformer_blocks.9', which the "
                       r"FluxTransformer2DModel built from config.json lacks"):
        blockprune.from_pretrained(folder)


def test_a_damaged_weight_file_is_named(folder, saved_flux):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BlockpruneError, match=r"model.safetensors is not a readable safetensors file .*the folder is "
                       r"damaged, save the model again"):
        blockprune.from_pretrained(folder)
    blockprune.save_pretrained(saved_flux[1], folder, max_shard_bytes=20_000)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(b"\0" * 64)
    with pytest.raises(BlockpruneError, match=rf"{shard.name} is not a readable safetensors file"):
        blockprune.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(BlockpruneError, match=r"index.json is not a valid index"):
        blockprune.from_pretrained(folder)


def test_a_wrong_shaped_tensor_is_named(folder):
    weights = load_file(folder / "model.safetensors")
    key = "single_transformer_blocks.0.proj_mlp.weight"  # a kept block's
    save_file({**weights, key: torch.zeros(3, 16)}, folder / "model.safetensors")
    with pytest.raises(BlockpruneError, match=rf"tensor {key} .* has shape \(3, 16\), the model expects \(64, 16\)"):
        blockprune.from_pretrained(folder)
    save_file(weights, folder / "model.safetensors")
    _edit_manifest(folder, lambda m: m["replaced"][0]["streams"].update(hidden_states=[8, 8]))  # manifest disagrees
    with pytest.raises(BlockpruneError, match=r"tensor transformer_blocks.0.linears.hidden_states.bias .* has shape "
                       r"\(16,\), the model expects \(8,\)"):
        blockprune.from_pretrained(folder)


def test_a_damaged_config_is_named(folder):
    (folder / "config.json").write_text("{")
    with pytest.raises(BlockpruneError, match="config.json could not be read as the FluxTransformer2DModel config"):
        blockprune.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# 6. fingerprints: every byte


def _wide_flux(dtype=torch.float32):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(4, 12, 16)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprints_see_every_element(dtype):
    first, second = _wide_flux(dtype), _wide_flux(dtype)
    assert model_fingerprint(first) == model_fingerprint(second)
    weight = second.single_transformer_blocks[0].proj_mlp.weight  # 256 x 64 elements
    assert weight.numel() > 4096
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    weight.data.view(-1).view(bits)[390] += 1  # one element, by one unit in the last place
    assert (weight != first.single_transformer_blocks[0].proj_mlp.weight).sum() == 1
    assert model_fingerprint(first) != model_fingerprint(second)
    third = _wide_flux(dtype)
    weight = third.single_transformer_blocks[0].proj_mlp.weight
    with torch.no_grad():  # two elements swapped off a 4-element stride: same sums, same strided sample
        weight.view(-1)[[1, 2]] = weight.view(-1)[[2, 1]].clone()
    assert model_fingerprint(first) != model_fingerprint(third)


# ---------------------------------------------------------------------------------------------------------------
# 7. score cache


@pytest.mark.parametrize("damage", ["{trunc", '{"metric": "x"}', '{"values": {"transformer_blocks.0": 1.0}}',
                                    '{"values": [1, 2]}', "\udcff"])
def test_a_damaged_score_cache_entry_is_recomputed_and_rewritten(counting, tmp_path, caplog, damage):
    def score():
        return blockprune.importance(make_flux(), calibration=flux_batches(2), importance="counting",
                                     progress=False, cache_dir=tmp_path)

    first = score()
    (entry,) = tmp_path.rglob("*.json")
    entry.write_bytes(damage.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="blockprune"):
        again = score()
    assert counting.calls == 8 and again.cached == [] and again.values == first.values
    assert any("is damaged" in r.message and "recomputed" in r.message for r in caplog.records)
    assert json.loads(entry.read_text())["values"] == first.values["counting"]  # rewritten
    assert score().cached == ["counting"] and counting.calls == 8


# ---------------------------------------------------------------------------------------------------------------
# 8. workdir

KEY = {"model": "m", "ratio": 0.5}


@pytest.mark.parametrize("content, problem", [
    ("{\"version\": 1, \"key\"", "JSONDecodeError"),
    ("[]", "it holds a list, not an object"),
    ('{"version": 1, "key": {"model": "m", "ratio": 0.5}}', "it has no 'files' object"),
    ('{"version": 1, "files": {}}', "it has no 'key' object"),
    ('{"version": 7, "key": {}, "files": {}}', "its version is 7"),
])
def test_a_damaged_workdir_manifest_says_what_to_do(tmp_path, content, problem):
    Workdir(tmp_path, KEY)
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(BlockpruneError, match=rf"workdir {tmp_path} has a damaged manifest.json \({problem}.*\); "
                       r"delete the folder to start over, or use a new workdir"):
        Workdir(tmp_path, KEY)


def test_compress_into_a_workdir_with_a_damaged_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BlockpruneError, match="has a damaged manifest.json"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(2), sandwich=False, progress=False,
                            cache_dir=False, workdir=tmp_path)


def test_temporary_files_of_killed_writes_are_removed_when_the_workdir_opens(tmp_path):
    workdir = Workdir(tmp_path, KEY)
    workdir.write_json("scores-000.json", {"a": 1})
    stale = [tmp_path / ".manifest.json.4242.tmp", tmp_path / ".stage-001.safetensors.17.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / ".manifest.json.tmp"]
    for path in kept:
        path.write_text("mine")
    Workdir(tmp_path, KEY, writer=False)  # a reading rank leaves them to the writer
    assert all(path.exists() for path in stale)
    reopened = Workdir(tmp_path, KEY)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert reopened.read_json("scores-000.json") == {"a": 1}


def test_a_workdir_killed_during_its_first_manifest_write_opens(tmp_path):
    (tmp_path / ".manifest.json.99.tmp").write_bytes(b"{")
    workdir = Workdir(tmp_path, KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock.json", "manifest.json"]
    assert workdir.read_json("scores-000.json") is None
    workdir.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

