"""Long runs: workdir, resume after SIGKILL or Ctrl-C, damaged files, determinism."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flux_batches, make_flux

import blockprune
import blockprune.sandwich.stage
from blockprune.errors import BlockpruneError, CompressionInterrupted

HERE = Path(__file__).parent
OPTIONS = {"ratio": 0.5, "sandwich_steps": 8, "sandwich_lr": 1e-3, "heal_steps": 0, "progress": False, "cache_dir": False}


def _job(workdir, out, kill_at=None, heal_steps=0):
    command = [sys.executable, str(HERE / "compress_job.py"), str(workdir), str(out)] + ([kill_at] if kill_at else [])
    env = {**os.environ, "JOB_HEAL_STEPS": str(heal_steps)}
    return subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    result = _job(folder / "work", folder / "model.pt")
    assert result.returncode == 0, result.stderr
    return torch.load(folder / "model.pt", weights_only=True)


@pytest.mark.parametrize("kill_at", ["scoring:3", "recording:2", "fitting:3", "training:2", "writing:4", "writing:9"])
def test_killed_run_resumes_to_the_same_model(kill_at, reference, tmp_path):
    killed = _job(tmp_path / "work", tmp_path / "model.pt", kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "model.pt").exists()
    resumed = _job(tmp_path / "work", tmp_path / "model.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert _equal(torch.load(tmp_path / "model.pt", weights_only=True), reference)


def test_a_run_killed_while_healing_resumes_to_the_same_model(tmp_path):
    healed = _job(tmp_path / "first", tmp_path / "healed.pt", heal_steps=6)
    assert healed.returncode == 0, healed.stderr
    killed = _job(tmp_path / "work", tmp_path / "model.pt", "healing:1", heal_steps=6)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "model.pt").exists()
    resumed = _job(tmp_path / "work", tmp_path / "model.pt", heal_steps=6)
    assert resumed.returncode == 0, resumed.stderr
    report, expected = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("model", "healed"))
    for timing in ("seconds", "states_seconds"):  # wall times; everything else is bit-identical
        assert report.pop(timing) > 0 and expected.pop(timing) > 0
    assert report == expected
    assert report["lr_errors"] and any(e != report["relative_error_before"] for e in report["lr_errors"].values())
    assert _equal(torch.load(tmp_path / "model.pt", weights_only=True),
                  torch.load(tmp_path / "healed.pt", weights_only=True))


def _compress(workdir, single=2, **kwargs):
    model = make_flux(double=2, single=single)
    blockprune.compress(model, calibration=flux_batches(8), workdir=workdir, **{**OPTIONS, **kwargs})
    return model


def test_same_call_is_bit_identical_and_resuming_a_finished_run_restores_it(tmp_path):
    first = _compress(tmp_path / "a")
    assert _equal(first.state_dict(), _compress(tmp_path / "b").state_dict())
    again = _compress(tmp_path / "a")  # everything restored from the workdir
    assert _equal(first.state_dict(), again.state_dict())
    assert blockprune.plan(again).replaced_names == blockprune.plan(first).replaced_names
    assert [s.loss_after for s in blockprune.plan(again).stages] == [s.loss_after for s in blockprune.plan(first).stages]


def test_damaged_stage_file_is_detected_and_recomputed(tmp_path, caplog):
    first = _compress(tmp_path / "w")
    stage = tmp_path / "w" / "stage-001.safetensors"
    stage.write_bytes(stage.read_bytes()[:100])  # truncated by hand
    with caplog.at_level(logging.WARNING, logger="blockprune"):
        again = _compress(tmp_path / "w")
    assert any("stage-001.safetensors is missing or damaged" in r.message for r in caplog.records)
    assert _equal(first.state_dict(), again.state_dict())
    assert len(stage.read_bytes()) > 100


def test_a_different_call_is_refused(tmp_path):
    _compress(tmp_path / "w")
    with pytest.raises(BlockpruneError, match=r"belongs to another compress call \(differs in: ratio, seed\)"):
        _compress(tmp_path / "w", ratio=0.25, seed=1)
    with pytest.raises(BlockpruneError, match=r"differs in: data"):
        model = make_flux(double=2, single=2)
        blockprune.compress(model, calibration=flux_batches(8, seed=1), workdir=tmp_path / "w", **OPTIONS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BlockpruneError, match="is not empty and has no manifest.json"):
        _compress(tmp_path / "other")


# the second layout's second span runs on past the output its first stage left free (test_sandwich.py)
@pytest.mark.parametrize("layout, second_span", [
    ({}, 3), ({"single": 4, "ratio": 0.3, "order": ["single_transformer_blocks.1", "transformer_blocks.1"]}, 5)])
def test_ctrl_c_stops_after_the_stage_and_says_how_to_resume(layout, second_span, tmp_path, monkeypatch):
    reference = _compress(tmp_path / "reference", **layout)
    assert len(blockprune.plan(reference).stages[1].span) == second_span
    original = blockprune.sandwich.stage.train_span
    calls = {"n": 0}

    def train_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-stage: the stage still finishes
        return original(*args, **kwargs)

    monkeypatch.setattr(blockprune.sandwich.stage, "train_span", train_then_interrupt)
    with pytest.raises(CompressionInterrupted, match=r"after stage 1 of 2; run the same call again with workdir="):
        _compress(tmp_path / "w", **layout)
    monkeypatch.setattr(blockprune.sandwich.stage, "train_span", original)
    resumed = _compress(tmp_path / "w", **layout)
    assert [s.span for s in blockprune.plan(resumed).stages] == [s.span for s in blockprune.plan(reference).stages]
    assert _equal(resumed.state_dict(), reference.state_dict())


def test_disk_use_is_reported_and_activation_shards_are_deleted_unless_kept(tmp_path):
    model = _compress(tmp_path / "w", sandwich_activation_budget=1)
    assert blockprune.plan(model).workdir_bytes > 0
    assert not list((tmp_path / "w" / "activations").rglob("*.safetensors"))
    _compress(tmp_path / "k", sandwich_activation_budget=1, keep_activations=True)
    assert list((tmp_path / "k" / "activations").rglob("*.safetensors"))
