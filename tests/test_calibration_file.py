"""Calibration without guesswork (#20 item 1): recorded from a pipeline, saved as safetensors + JSON, read back."""

import json
import os

import pytest
import torch
from conftest import make_flux
from safetensors import safe_open
from safetensors.torch import save_file
from test_pipeline import tiny_dit_pipeline

import blockprune
from blockprune import plugins
from blockprune.calibration_file import METADATA_KEY, calibration_info
from blockprune.cli import build_parser, main
from blockprune.cli.options import load_model
from blockprune.errors import BlockpruneError
from blockprune.runtime.atomic import file_mode, save_safetensors, write_atomically
from blockprune.toy import vocabulary
from blockprune.toy.small_models import small_model

FLUX_KEYS = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"}


@pytest.fixture(scope="module")
def toy_pipe():
    return small_model("flux-small").build()


def _batches():
    positions = torch.arange(12.0).reshape(2, 6)  # two views of one buffer, as positions often are
    return [
        {"hidden_states": torch.randn(2, 4, 8), "img_ids": positions[0], "txt_ids": positions[1], "return_dict": False,
         "joint_attention_kwargs": None, "scale": 0.5, "mode": "x", "ids": torch.arange(4),
         "added": {"resolution": torch.tensor([[32.0, 32.0]]), "sizes": (1, 2)}, "rotary": torch.randn(3, dtype=torch.cfloat)},
        {"hidden_states": torch.randn(2, 4, 8), "img_ids": positions[0], "txt_ids": positions[1], "return_dict": False,
         "joint_attention_kwargs": None, "scale": 1.0, "mode": "y", "ids": torch.arange(4),
         "added": {"resolution": torch.tensor([[64.0, 64.0]]), "sizes": (3, 4)}, "rotary": torch.randn(3, dtype=torch.cfloat)},
    ]


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_a_saved_calibration_reads_back_the_same(tmp_path):
    batches = _batches()
    path = blockprune.save_calibration(batches, tmp_path / "calib.safetensors", info={"prompts": ["a fox"]})
    loaded = blockprune.load_calibration(path)
    assert len(loaded) == 2 and all(_same(a, b) for a, b in zip(batches, loaded))
    assert calibration_info(path) == {"prompts": ["a fox"], "batches": 2, "blockprune": blockprune.__version__}


def test_the_file_is_safetensors_with_its_structure_as_json(tmp_path):
    path = blockprune.save_calibration(_batches(), tmp_path / "calib.safetensors")
    with safe_open(path, framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        names = set(handle.keys())
    assert "0/hidden_states" in names and "1/added/resolution" in names
    assert header["batches"][0]["dict"]["return_dict"] == {"value": False}
    assert header["batches"][0]["dict"]["hidden_states"] == {"tensor": "0/hidden_states"}


def test_dtype_casts_floating_tensors_only(tmp_path):
    path = blockprune.save_calibration(_batches(), tmp_path / "calib.safetensors", dtype=torch.float16)
    saved = blockprune.load_calibration(path)[0]
    assert saved["hidden_states"].dtype == torch.float16 and saved["ids"].dtype == torch.int64
    cast = blockprune.load_calibration(path, dtype=torch.bfloat16)[0]
    assert cast["hidden_states"].dtype == cast["added"]["resolution"].dtype == torch.bfloat16
    assert cast["ids"].dtype == torch.int64 and cast["rotary"].dtype == torch.cfloat


def test_a_torch_save_file_is_refused_with_how_to_convert_it(tmp_path):
    torch.save(_batches(), tmp_path / "batches.pt")
    with pytest.raises(BlockpruneError, match=r"torch.save \(a pickle\).*blockprune.save_calibration\(torch.load"):
        blockprune.load_calibration(tmp_path / "batches.pt")


def test_foreign_missing_and_unstorable_files_are_clear_errors(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(BlockpruneError, match="not a calibration file"):
        blockprune.load_calibration(tmp_path / "weights.safetensors")
    with pytest.raises(BlockpruneError, match="does not exist; record one with `blockprune calibrate"):
        blockprune.load_calibration(tmp_path / "absent.safetensors")
    with pytest.raises(BlockpruneError, match=r"calibration 0/scheduler is a builtins.object"):
        blockprune.save_calibration([{"scheduler": object()}], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_saved_files_get_the_same_permissions_under_the_umask(tmp_path, toy_pipe):
    previous = os.umask(0o027)
    try:
        assert file_mode() == 0o640
        blockprune.save_calibration(_batches(), tmp_path / "calib.safetensors")
        save_safetensors({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
        write_atomically(tmp_path / "x.json", b"{}")
        files = toy_pipe.save_pretrained(tmp_path / "toy", "flux-small")
    finally:
        os.umask(previous)
    paths = [tmp_path / "calib.safetensors", tmp_path / "x.safetensors", tmp_path / "x.json", *files.values()]
    assert {oct(path.stat().st_mode & 0o777) for path in paths} == {"0o640"}  # safetensors alone would be 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_record_calibration_from_the_toy_pipeline(toy_pipe, capsys):
    prompts = ["a red circle", "a blue square above a green triangle", "two red squares"]
    batches = blockprune.record_calibration(toy_pipe, prompts, num_inference_steps=3, steps_per_prompt=2)
    assert len(batches) == 3 * 2 and set(batches[0]) == FLUX_KEYS
    assert batches[0]["hidden_states"].shape[0] == 2  # the prompt and the empty prompt (classifier-free guidance)
    out = capsys.readouterr().out  # not a terminal: the bar is logged as lines
    assert "recording calibration (3 steps a prompt): started (0/3)" in out and "done, 3/3" in out
    descriptions = plugins.get_adapter(toy_pipe.transformer, "flux").describe_batch()
    assert FLUX_KEYS <= set(descriptions)


def test_record_calibration_refuses_what_it_cannot_do(toy_pipe):
    with pytest.raises(BlockpruneError, match="draws 32 × 32 images only"):
        blockprune.record_calibration(toy_pipe, ["a red circle"], height=64, width=64, progress=False)
    with pytest.raises(BlockpruneError, match="pass the pipeline that holds it"):
        blockprune.record_calibration(toy_pipe.transformer, ["a red circle"])
    with pytest.raises(BlockpruneError, match="num_inference_steps must be a positive integer"):
        blockprune.record_calibration(toy_pipe, ["a red circle"], num_inference_steps=0)
    with pytest.raises(BlockpruneError, match="'dit' adapter's call_pipeline takes no height, width"):
        blockprune.record_calibration(tiny_dit_pipeline(), ["a fox"], height=64, width=64, progress=False)


def test_calibrate_a_toy_pipeline_then_compress_its_bare_transformer(toy_pipe, tmp_path, capsys):
    toy_pipe.transformer.save_pretrained(tmp_path / "transformer")  # a diffusers transformer folder
    code = main(["calibrate", "flux-small", "-o", str(tmp_path / "calib.safetensors"), "--num-prompts", "3",
                 "--calibration-steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recorded 6 batches from 3 prompts" in out and "the T5 text states" in out  # what a batch holds
    info = calibration_info(tmp_path / "calib.safetensors")
    assert info["pipeline"] == "ToyPipeline" and info["adapter"] == "flux" and info["num_inference_steps"] == 3
    assert all(word in vocabulary() for prompt in info["prompts"] for word in prompt.split())  # prompts it can draw
    code = main(["compress", str(tmp_path / "transformer"), "--calibration", str(tmp_path / "calib.safetensors"),
                 "-o", str(tmp_path / "out"), "--ratio", "0.1", "--no-sandwich", "--importance", "fit_residual",
                 "--no-progress", "--no-cache"])
    assert code == 0, capsys.readouterr().err
    assert len(blockprune.plan(blockprune.from_pretrained(tmp_path / "out")).replaced) == 2


def test_calibrate_a_diffusers_pipeline_folder(tmp_path, capsys):
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue car\n")
    code = main(["calibrate", str(tmp_path / "pipe"), "-o", str(tmp_path / "calib.safetensors"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--calibration-steps", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    batches = blockprune.load_calibration(tmp_path / "calib.safetensors")
    assert len(batches) == 2 * 2 and {"hidden_states", "timestep", "class_labels"} <= set(batches[0])
    assert main(["calibrate", str(tmp_path / "pipe"), "-o", str(tmp_path / "calib.safetensors")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["calibrate", "flux-random", "-o", str(tmp_path / "other.safetensors")]) == 2
    assert "calibrate runs a pipeline" in capsys.readouterr().err


def test_dtype_casts_the_calibration_read_from_a_file(tmp_path):
    make_flux().save_pretrained(tmp_path / "model")
    from conftest import flux_batches

    blockprune.save_calibration(flux_batches(2), tmp_path / "calib.safetensors")
    args = build_parser(["inspect"]).parse_args(
        ["inspect", str(tmp_path / "model"), "--calibration", str(tmp_path / "calib.safetensors"), "--dtype", "bfloat16"])
    loaded = load_model(args, count=1)
    assert loaded.batches[0]["hidden_states"].dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_a_saved_compressed_model_has_one_permission_for_every_file(tmp_path):
    from conftest import flux_batches, make_flux

    model = make_flux(double=2, single=2)
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(6), importance="fit_residual", sandwich_steps=2,
                        heal_steps=0, progress=False, cache_dir=False)
    previous = os.umask(0o027)
    try:
        blockprune.save_pretrained(model, tmp_path / "saved")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "stages.safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o640"}
