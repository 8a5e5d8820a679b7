"""Global healing with ``heal_kept="full"``: every weight of the kept blocks trains, guarded as LoRA healing is."""

import pytest
import torch
from conftest import cast_batch, flux_batches, make_flux

import blockprune
from blockprune.errors import UnusedOptionWarning
from blockprune.plan import plan as plan_of
from blockprune.sandwich.heal import FULL_LR_GRID

FAST = {"progress": False, "cache_dir": False, "importance": "fit_residual"}
OPTIONS = {"ratio": 0.4, "order": "start2end", "sandwich_steps": 5, "sandwich_eval_every": 5, "heal_states": "calibration",
           **FAST}  # the calibration: healing of this random-weight model on its own trajectory is reverted


def _compress(heal_steps: int, **options):
    torch.manual_seed(0)
    model = make_flux(double=2, single=3)
    blockprune.compress(model, calibration=flux_batches(8), heal_steps=heal_steps, **OPTIONS, **options)
    return model


def test_full_healing_trains_the_kept_weights_themselves_and_never_raises_the_held_out_error():
    unhealed = _compress(0)
    healed = _compress(40, heal_kept="full", sandwich_lr=1e-3)  # 20 steps: a gain within the noise, refused
    heal = plan_of(healed).heal
    assert heal["kept"] == "full" and heal["lora_blocks"] == [] and len(heal["surrogates"]) == 2
    assert heal["relative_error_after"] < heal["relative_error_before"] and heal["best_step"] > 0
    kept = [name for name in plan_of(healed).blocks if name not in plan_of(healed).replaced_names]
    assert len(kept) == 3
    before, after = unhealed.state_dict(), healed.state_dict()
    assert before.keys() == after.keys() and not any("lora" in key for key in after)
    for name in kept:  # biases and norm scales moved, which LoRA (on the linear weights) never changes
        for tensor in ("attn.to_q.bias", "attn.norm_q.weight"):
            assert not torch.equal(after[f"{name}.{tensor}"], before[f"{name}.{tensor}"]), f"{name}.{tensor}"


def test_full_healing_that_never_beats_its_start_puts_every_weight_back():
    unhealed = _compress(0)
    healed = _compress(10, heal_kept="full", sandwich_lr=10.0)  # far too high: every check is worse
    assert plan_of(healed).heal["best_step"] == 0 and plan_of(healed).heal["lr"] is None
    for (name, a), (_, b) in zip(unhealed.state_dict().items(), healed.state_dict().items()):
        assert torch.equal(a, b), name


def test_full_healing_probes_a_tenth_of_loras_rates():
    heal = plan_of(_compress(10, heal_kept="full")).heal
    assert set(heal["lr_errors"]) == {f"{rate:g}" for rate in FULL_LR_GRID} == {"1e-05", "3e-05", "0.0001"}


def test_full_healing_keeps_a_half_precision_model_in_its_dtype():
    model = make_flux(double=2, single=2).to(torch.bfloat16)
    batches = [cast_batch(b, torch.bfloat16) for b in flux_batches(6)]
    blockprune.compress(model, ratio=0.5, calibration=batches, order="start2end", sandwich_steps=5,
                        sandwich_eval_every=5, heal_steps=5, heal_kept="full", **FAST)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert plan_of(model).heal["relative_error_after"] <= plan_of(model).heal["relative_error_before"]


def test_bad_or_unused_heal_kept_is_named():
    with pytest.raises(blockprune.BlockpruneError, match="heal_kept must be 'lora' .* or 'full'"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), heal_steps=5, heal_kept="all", **FAST)
    with pytest.raises(blockprune.BlockpruneError, match="use heal_kept='lora' with offload"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), heal_steps=5, heal_kept="full",
                            offload=True, device="cpu", **FAST)
    with pytest.warns(UnusedOptionWarning, match="option heal_kept does nothing in this call: heal_steps=0"):
        blockprune.compress(make_flux(), calibration=flux_batches(4), heal_kept="full", sandwich_steps=2, heal_steps=0,
                            **FAST)
