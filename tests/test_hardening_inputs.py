"""Hardening, continued: eval mode during compression, the workdir lock, bad input (importance weights,
meta-device models, NaN in calibration, options that do nothing, reuse from another model), and the once-only
IllConditionedWarning."""

import json
import logging
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    TinyResidualNet,
    dit_batches,
    flux_batches,
    make_flux,
    residual_net_batches,
)
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

import blockprune
import blockprune.brll.fit
from blockprune import IllConditionedWarning, Metric, plugins
from blockprune.brll.fit import fit_affine
from blockprune.brll.recording import StreamAccumulator, record_block
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import (
    BlockpruneError,
    NonFiniteActivationError,
    UnusedOptionWarning,
)
from blockprune.plan import plan as plan_of
from blockprune.progressive import split_batches, split_indices
from blockprune.runtime.finite import check_finite_batches
from blockprune.runtime.workdir import Workdir

QUIET = {"progress": False, "cache_dir": False}
FAST = {"importance": "fit_residual", **QUIET}  # compress's default, "auto", fits many candidate plans

# ---------------------------------------------------------------------------------------------------------------
# 6. compress in eval mode, the caller's modes restored


def _dropout_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
                                 dropout=0.5)


def test_dropout_does_not_change_the_fit_or_the_choice_and_the_mode_comes_back():
    evaluated, trained = _dropout_dit().eval(), _dropout_dit().train()
    trained.transformer_blocks[3].eval()  # a mixed-mode caller: each module gets its own flag back
    modes = {module: module.training for module in trained.modules()}
    options = {"ratio": 0.5, "calibration": dit_batches(6), "sandwich_steps": 2, **FAST}
    blockprune.compress(evaluated, **options)
    blockprune.compress(trained, **options)
    a, b = plan_of(evaluated), plan_of(trained)
    assert a.replaced_names == b.replaced_names and a.scores == b.scores
    errors = [[r.streams["hidden_states"].relative_error for r in plan.replaced] for plan in (a, b)]
    assert errors[0] == errors[1]
    state_a, state_b = evaluated.state_dict(), trained.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not any(m.training for m in evaluated.modules())
    after = list(trained.modules())
    assert all(m.training == modes[m] for m in after if m in modes)
    assert all(m.training for m in after if m not in modes)  # the surrogates: the model's own mode


class _ModeSpy(Metric):
    """Records whether the model was in train mode when it was scored, then fails."""

    name = "mode_spy"
    higher_is_better = False

    def __init__(self):
        self.seen = []

    def evaluate(self, context, block, state):
        self.seen.append(context.model.training)
        raise RuntimeError("metric failed")


class _SpyPlugin:
    def __init__(self):
        self.metric = _ModeSpy()

    @blockprune.hookimpl
    def blockprune_register_metrics(self, register):
        register(self.metric)


@pytest.mark.parametrize("call", ["compress", "importance"])
def test_scoring_sees_eval_mode_and_a_failure_restores_the_train_mode(call):
    plugin = _SpyPlugin()
    blockprune.register_plugin(plugin)
    try:
        model = make_flux().train()
        with pytest.raises(RuntimeError, match="metric failed"):
            getattr(blockprune, call)(model, calibration=flux_batches(3), importance="mode_spy", **QUIET)
    finally:
        blockprune.unregister_plugin(plugin)
    assert plugin.metric.seen == [False]
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# 8. the workdir lock: a second process is refused, a dead one's lock taken over

KEY = {"model": "m", "ratio": 0.5}
HOLDER = """
import os, sys
from blockprune.runtime.workdir import Workdir
workdir = Workdir(sys.argv[1], {"model": "m", "ratio": 0.5})
(workdir.activations(0) / "inputs-0.safetensors").write_bytes(b"a spilled shard")
(workdir.path / f".stage-000.safetensors.{os.getpid()}.tmp").write_bytes(b"half")  # a write in flight
print("holding", flush=True)
sys.stdin.readline()
workdir.close()
"""


def _holder(folder):
    """A real second process that opens ``folder`` as its workdir and holds it until its stdin gets a line."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.stdout.readline().strip() == "holding"
    return process


def test_a_second_process_on_a_held_workdir_is_refused_and_deletes_nothing(tmp_path):
    holder = _holder(tmp_path)
    try:
        files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
        assert Path(f".stage-000.safetensors.{holder.pid}.tmp") in files  # a write of the holder's, in flight
        with pytest.raises(BlockpruneError, match=rf"workdir {tmp_path} is in use by process {holder.pid} on host "
                           rf"{socket.gethostname()} since .*; wait for it to finish or use another workdir"):
            blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), workdir=tmp_path, **FAST)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == files
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0 and not (tmp_path / "lock.json").exists()
    Workdir(tmp_path, KEY).close()  # free again


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait(timeout=60)
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="blockprune"):
        workdir = Workdir(tmp_path, KEY)
    assert any(f"took over the lock of process {holder.pid}" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob(".*.tmp"))  # the killed process's unfinished write is gone
    workdir.close()
    assert not (tmp_path / "lock.json").exists()


def test_a_lock_held_on_another_host_or_unreadable_says_how_to_clear_it(tmp_path):
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "since": "2030-01-01 00:00:00 +0000"}))
    with pytest.raises(BlockpruneError, match=r"in use by process 1 on host gpu-node-7 since 2030-01-01 .*If that "
                       rf"process is no longer running, delete {lock}"):
        Workdir(tmp_path, KEY)
    lock.write_text("{")
    with pytest.raises(BlockpruneError, match=rf"has an unreadable lock file lock.json; if no other process uses this "
                       rf"workdir, delete {lock}"):
        Workdir(tmp_path, KEY)
    assert lock.read_text() == "{"  # left for the user to judge


def test_a_workdir_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BlockpruneError, match=r"workdir .*notes.txt is a file; pass a folder"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), workdir=tmp_path / "notes.txt",
                            **FAST)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_one_process_may_open_its_workdir_twice_and_the_lock_goes_with_the_last(tmp_path):
    first, second = Workdir(tmp_path, KEY), Workdir(tmp_path, KEY)
    first.close()
    assert (tmp_path / "lock.json").exists()
    second.close()
    assert not (tmp_path / "lock.json").exists()
    Workdir(tmp_path, KEY, writer=False)  # a reading rank takes no lock
    assert not (tmp_path / "lock.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# bad input: importance weights, meta-device models


@pytest.mark.parametrize("weight", [math.inf, math.nan, -1.0, "high", True])
@pytest.mark.parametrize("call", ["compress", "importance"])
def test_an_importance_weight_that_is_not_a_finite_number_is_refused(weight, call):
    with pytest.raises(BlockpruneError, match=r"importance weight of 'output_mse' is .*; each weight must be a "
                       r"finite number ≥ 0"):
        getattr(blockprune, call)(make_flux(), calibration=flux_batches(2),
                                  importance={"fit_residual": 1.0, "output_mse": weight}, **QUIET)


@pytest.mark.parametrize("call", ["compress", "importance"])
def test_a_meta_device_model_is_refused_before_any_work(call):
    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    with pytest.raises(BlockpruneError, match=r"FluxTransformer2DModel has weights on the meta device \(.*\): they "
                       r"were never loaded .*load the model with its weights") as raised:
        getattr(blockprune, call)(model, calibration=flux_batches(2), **QUIET)
    assert "calibration" not in str(raised.value)  # not blamed on the data


# ---------------------------------------------------------------------------------------------------------------
# NaN in calibration: named by its index in the caller's list, wherever the split puts it


@pytest.mark.parametrize("role", ["least_squares", "training", "held_out"])
def test_nan_in_any_calibration_batch_is_named_by_its_index_in_the_callers_list(role):
    batches = flux_batches(6)
    parts = dict(zip(["least_squares", "training", "held_out"], split_batches(batches, 0.5, 0.25, seed=0)))
    chosen = parts[role][-1]
    index = next(i for i, b in enumerate(batches) if b is chosen)
    assert role != "least_squares" or index != len(parts[role]) - 1  # its place in the subset is another number
    chosen["hidden_states"][1, 3, 2] = math.nan
    with pytest.raises(NonFiniteActivationError, match=rf"^calibration batch {index} holds NaN in 'hidden_states'; "
                       r"every value must be finite: fix or drop that batch"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=batches, sandwich_steps=2, **FAST)


@pytest.mark.parametrize("sandwich", [True, False])
def test_nan_made_inside_the_model_is_named_by_the_batchs_index_in_the_callers_list(sandwich):
    batches = residual_net_batches(8)
    shares = split_indices(len(batches), 1.0, 0.2, seed=0)[0] if sandwich else list(range(len(batches)))
    # a batch of the least-squares share whose place in that share differs from its index (with sandwich training)
    index = next(i for place, i in enumerate(shares) if i != 0 and (place != i or not sandwich))
    batches[index]["scale"] = torch.full((1,), 3e38)  # finite, but norm(x) × scale overflows inside layers.0
    with pytest.raises(NonFiniteActivationError, match=rf"^NaN or Inf in stream 'x' of block layers\.0 \(calibration "
                       rf"batch {index}\); check the calibration inputs"):
        blockprune.compress(TinyResidualNet(), adapter="generic", ratio=0.25, calibration=batches, order="start2end",
                            sandwich=sandwich, sandwich_steps=2, **QUIET)


def test_inf_is_found_inside_nested_values_but_allowed_in_masks():
    check_finite_batches([{"x": torch.zeros(2)}, {"encoder_attention_mask": torch.tensor([0.0, -math.inf])}])
    with pytest.raises(NonFiniteActivationError, match=r"calibration batch 1 holds Inf in 'rotary'\[1\]"):
        check_finite_batches([{"x": torch.zeros(2)}, {"rotary": (torch.zeros(2), torch.tensor([math.inf]))}])


# ---------------------------------------------------------------------------------------------------------------
# options that do nothing in the call get a warning


@pytest.mark.parametrize("options, reason", [
    ({"sandwich": False, "sandwich_steps": 5}, "sandwich_steps does nothing in this call: sandwich=False"),
    ({"sandwich": False, "lora_rank": 4}, "lora_rank does nothing in this call: sandwich=False"),
    ({"sandwich_steps": 1, "heal_steps": 0, "keep_activations": True}, "keep_activations does nothing in this call: without workdir="),
    ({"sandwich": False, "order": "start2end", "ablation": "replace"}, "ablation .*: with a fixed order= no block"),
    ({"sandwich": False, "auto_refine": 2}, "auto_refine .*: it is used only with importance='auto'"),
    ({"sandwich": False, "calibration_steps": 4}, "calibration_steps .*: calibration is recorded from a pipeline"),
    ({"sandwich": False, "calibration_call_options": {"height": 8}},
     "calibration_call_options .*: calibration is recorded from a pipeline"),
])
def test_an_option_that_does_nothing_in_the_call_is_warned_about(options, reason):
    with pytest.warns(UnusedOptionWarning, match=rf"option {reason}.*; leave it out"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), **{**options, **FAST})


def test_the_warnings_are_public_names():
    for name in ("UnusedOptionWarning", "IllConditionedWarning"):
        assert name in blockprune.__all__ and getattr(blockprune, name) is getattr(blockprune.errors, name)
    with pytest.warns(blockprune.UnusedOptionWarning, match="option lora_rank does nothing"):
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), sandwich=False, lora_rank=4, **FAST)


def test_options_that_are_used_or_left_at_their_default_are_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedOptionWarning)
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), sandwich=False, sandwich_steps=1000,
                            keep_activations=False, ridge=1e-5, **FAST)
        blockprune.compress(make_flux(), ratio=0.25, calibration=flux_batches(3), sandwich_steps=1, lora_rank=2,
                            ablation="replace", heal_steps=0, **FAST)
    with pytest.warns(UnusedOptionWarning, match="option sandwich_steps does nothing .*importance\\(\\) only scores"):
        blockprune.importance(make_flux(), calibration=flux_batches(2), sandwich_steps=5, **QUIET)


# ---------------------------------------------------------------------------------------------------------------
# reuse_from another model is refused


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(4), sandwich=False, **FAST)
    folder = tmp_path_factory.mktemp("higher") / "model"
    blockprune.save_pretrained(model, folder)
    return folder, model


def _wide_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(4, 4, 8))


@pytest.mark.parametrize("source", ["folder", "model"])
def test_reuse_from_a_run_on_another_model_is_refused(saved_run, source):
    reuse_from = saved_run[0] if source == "folder" else saved_run[1]
    options = {"ratio": 0.25, "calibration": flux_batches(4), "reuse_from": reuse_from, **QUIET}
    with pytest.raises(BlockpruneError, match=r"reuse_from was made on a model with other weights .*reuse only from "
                       r"a run on this same model"):
        blockprune.compress(make_flux(seed=1), **options)
    with pytest.raises(BlockpruneError, match=r"reuse_from was made on another model: its block \S+ has stream "
                       r"'\w+' of width 16, this model's has 32"):
        blockprune.compress(_wide_flux(), **options)
    same = make_flux()
    with pytest.warns(UnusedOptionWarning, match="option ridge does nothing .*with reuse_from="):
        blockprune.compress(same, **options, ridge=1e-3)
    assert plan_of(same).replaced_names == plan_of(saved_run[1]).replaced_names[:1]


# ---------------------------------------------------------------------------------------------------------------
# IllConditionedWarning: the cause said, once per stream and cause


def _first_block_accumulators(batches):
    model = make_flux()
    blocks = resolve_blocks(model, plugins.get_adapter(model), batches[0])
    return record_block(model, blocks[0], batches)


def test_a_structural_rank_deficiency_is_called_so_and_warned_once(monkeypatch):
    monkeypatch.setattr(blockprune.brll.fit, "_warned", set())
    image = _first_block_accumulators(flux_batches(4))["hidden_states"]  # a linear embedding of 4 latent channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fit = fit_affine(image, name="flux/transformer_blocks.0/hidden_states")
    (warning,) = [w for w in caught if issubclass(w.category, IllConditionedWarning)]
    assert torch.isfinite(fit.weight).all()
    message = str(warning.message)
    assert "ill-conditioned least squares, the inputs span only 5 of 17 dimensions (the bias included) over 128 " \
           "tokens" in message
    assert "the deficiency is structural: it comes from the model" in message
    assert "more calibration data of the same kind will not change it; the ridge term handles it" in message
    few = StreamAccumulator(16)
    few.update(torch.randn(5, 16), torch.randn(5, 16))
    with pytest.warns(IllConditionedWarning, match=r"5 tokens for 17 unknowns .*more calibration data makes it better"):
        fit_affine(few, name="flux/transformer_blocks.0/hidden_states")  # another cause: warned too


def test_compress_runs_warn_once_per_stream_and_cause(monkeypatch):
    monkeypatch.setattr(blockprune.brll.fit, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # fit_residual scoring and the replacement both fit transformer_blocks.0
            blockprune.compress(make_flux(), ratio=0.5, calibration=flux_batches(2), sandwich=False, **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, IllConditionedWarning)]
    causes = [(m.split(":")[0], "structural" in m) for m in messages]
    assert len(causes) == len(set(causes))
    assert causes.count(("transformer_blocks.0/hidden_states", True)) == 1
