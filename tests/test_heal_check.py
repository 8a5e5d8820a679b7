"""Healing's held-out check: best weights are kept only when fresh noise confirms them beyond the noise."""

import pytest
import torch
from conftest import flux_batches, make_flux

import blockprune
from blockprune.plan import plan as plan_of
from blockprune.plugins import get_adapter
from blockprune.report import stages_table
from blockprune.sandwich import guard
from blockprune.sandwich.heal_check import (
    CHECK_BATCHES,
    FRESH_TRAJECTORIES,
    HeldCheck,
    HeldReference,
    fresh_check,
    guard_check,
    signed_rank_z,
    significantly_lower,
)
from blockprune.toy import ToyPipeline, calibration_batches


def test_a_change_within_the_noise_is_not_significant_and_a_clear_one_is():
    generator = torch.Generator().manual_seed(0)
    before = torch.randn(32, generator=generator)
    noise = 0.2 * torch.randn(32, generator=generator)
    assert not significantly_lower(before - 0.01 + noise, before)  # 1 % lower on average, noise 20 %
    assert significantly_lower(before - 0.2 + noise, before)  # 18 % lower on average: far beyond the noise
    assert not significantly_lower(before, before) and not significantly_lower(before + 0.2 + noise, before)
    assert not significantly_lower(torch.tensor([0.5]), torch.tensor([1.0]))  # one sample cannot confirm at 95 %


def test_the_statistic_is_the_signed_rank_z_with_ties_sharing_their_rank():
    before = torch.zeros(7)
    after = torch.tensor([-1.0, -1.0, 2.0, -3.0, 3.0, -0.5, 0.0])  # the unchanged sample is dropped: n = 6
    # sizes 0.5, 1, 1, 2, 3, 3 rank 1, 2.5, 2.5, 4, 5.5, 5.5; the rises (2, 3) sum to 9.5 against 10.5 expected;
    # variance 6 * 7 * 13 / 24 less (2³ - 2) * 2 / 48 for the two ties
    assert signed_rank_z(after, before) == pytest.approx((9.5 - 10.5) / (22.75 - 0.25) ** 0.5)
    assert signed_rank_z(before, before) == 0.0


def test_a_consistent_fall_is_confirmed_through_heavy_tails():
    """The confirmation's changes are heavy-tailed (docs/results.md: excess kurtosis up to 17): most samples fall a little
    while a few swing far either way. The rank test sees the many fall; the mean's t test would drown in the few."""
    change = torch.full((48,), -0.1)
    change[:8] = torch.tensor([3.0, -3.0] * 4)  # 8 samples of 48 swing far, as many up as down
    t = change.mean() / (change.std() / 48**0.5)
    assert -1.645 < t < 0 and significantly_lower(change, torch.zeros(48))
    assert not significantly_lower(-change, torch.zeros(48))


def _check(check_error: list[float], fresh_error: list[float]) -> HeldCheck:
    """A check whose latents are the references scaled by (1 + error) on each of its 4 tensors of 8 samples: the
    samples' relative errors are error², those of the check and of the fresh noise set apart."""
    generator = torch.Generator().manual_seed(1)
    check = [torch.randn(8, 4, generator=generator) + 3 for _ in range(4)]
    fresh = [torch.randn(8, 4, generator=generator) + 3 for _ in range(4)]
    jitter = [1 + 0.3 * torch.rand(8, 1, generator=generator) for _ in range(4)]  # each sample's own error
    reference = HeldReference(check, fresh)

    def scaled(tensors, errors):
        return lambda: [t * (1 + e * j) for t, e, j in zip(tensors, errors, jitter)]
    return HeldCheck(scaled(check, check_error), scaled(fresh, fresh_error), reference, torch.device("cpu"))


def _decide(start: float, best_check: float, best_fresh: float) -> bool:
    held = _check([start] * 4, [start] * 4)
    held.error()
    held.measure_fresh_start()
    held.measure = _check([best_check] * 4, [best_fresh] * 4).measure  # the best weights, as training left them
    held.fresh = _check([best_check] * 4, [best_fresh] * 4).fresh
    return held.accepts()


def test_best_weights_are_kept_only_when_the_fresh_noise_confirms_them():
    assert _decide(start=0.1, best_check=0.08, best_fresh=0.08)
    assert not _decide(start=0.1, best_check=0.08, best_fresh=0.1)  # the check's gain does not hold on fresh noise
    assert not _decide(start=0.1, best_check=0.08, best_fresh=0.12)
    assert not _decide(start=0.1, best_check=0.1, best_fresh=0.08)  # the check itself must be beaten first


@pytest.mark.parametrize("probe_cooldown_share", [0.0, guard.PROBE_COOLDOWN_SHARE])
def test_on_the_trained_sd3_small_the_heal_that_lowered_psnr_is_not_kept(monkeypatch, probe_cooldown_share):
    """docs/results.md: with 16 batches of 4, healing on the model's own trajectory won the check by 0.5 % and lowered
    teacher PSNR by 0.32 dB (16 prompts, 8 steps) and 0.24 dB (64 prompts, 20 steps); its gain on fresh noise is
    within the noise, so it is refused. That was with the rate probes scored mid-flight (share 0); scored after
    their cool-down, every rate's probe lands above the start and nothing later beats it: the guard puts it back."""
    monkeypatch.setattr(guard, "PROBE_COOLDOWN_SHARE", probe_cooldown_share)
    pipe = ToyPipeline.from_pretrained("sd3-small")
    blockprune.compress(pipe, adapter="sd3", ratio=0.25, order=["transformer_blocks.7", "transformer_blocks.6"],
                        calibration=calibration_batches(pipe, 16, seed=0), heal_steps=100, progress=False,
                        cache_dir=False, sandwich_steps=100, sandwich_eval_every=10)  # the defaults it was measured at
    heal = plan_of(pipe).heal
    assert heal["states"] == "trajectory" and heal["best_step"] == 0 and heal["lr"] is None
    if not probe_cooldown_share:
        assert heal["refused"]
        assert all(a < b for a, b in zip(heal["halves_after"], heal["halves_before"]))  # it had won on both halves
        assert 0 < heal["fresh_error_after"]  # on 72 fresh samples no lower than the start's (on 36: 3.6 % lower)
        assert -1.645 < heal["fresh_z"] < 0
        assert "within the noise" in stages_table(plan_of(pipe)).caption
    else:
        assert not heal["refused"] and heal["halves_after"] == []  # put back by the guard, before any confirmation
        assert all(error > heal["relative_error_before"] for error in heal["lr_errors"].values())


def test_one_step_outputs_confirm_themselves_without_being_measured_twice():
    generator = torch.Generator().manual_seed(2)
    reference = [torch.randn(8, 4, generator=generator) + 3 for _ in range(2)]
    errors, calls = iter([0.1, 0.05]), []  # the start, then the best weights

    def measure():
        calls.append(1)
        error = next(errors)
        return [t * (1 + error * (1 + 0.1 * k)) for k, t in enumerate(reference)]

    held = HeldCheck(measure, None, HeldReference(reference, reference), torch.device("cpu"))
    held.measure_fresh_start()  # nothing to draw: the first check is the start's confirmation
    start = held.error()
    assert len(calls) == 1 and HeldCheck.fresh_error(held.fresh_before) == pytest.approx(start)
    assert held.accepts() and len(calls) == 2  # half the error on every sample: confirmed by the same measurement
    assert HeldCheck.fresh_error(held.fresh_after) < start


def test_the_confirmation_draws_twice_the_checks_samples_from_more_held_out_batches_where_there_are_more():
    """The check measures 32 trajectories at least on 8 held-out batches; the confirmation at least 64, from fresh
    noise, on the fewest held-out batches that hold them (a held-out set of a few batches is drawn again with other
    noise)."""
    model = make_flux(double=1, single=1)
    adapter = get_adapter(model, "flux")
    # 3 batches of 2: 6 to a draw, 6 draws for the check, 11 for the confirmation; 80 batches of 1: the check draws
    # its 8 batches 4 times, the confirmation draws 64 batches once; 20 batches of 8: 8 batches hold 64 samples, and
    # the confirmation measures no more than those
    cases = ((flux_batches(3), 36, 66), (flux_batches(80, batch=1), 32, 64), (flux_batches(20, batch=8), 64, 64))
    for batches, check_samples, fresh_samples in cases:
        with torch.no_grad():
            check = torch.cat(guard_check(model, adapter, batches)[1]())
            fresh = torch.cat(fresh_check(model, adapter, batches)())
        assert (check.shape[0], fresh.shape[0]) == (check_samples, fresh_samples) and CHECK_BATCHES == 8
        assert fresh_samples >= FRESH_TRAJECTORIES == 64
        assert not any(torch.allclose(f, c) for f in fresh for c in check)  # noise the check never draws
        assert len({tuple(f.flatten()[:4].tolist()) for f in fresh}) == fresh_samples  # no sample repeated
    assert fresh_check(model, get_adapter(model, "generic"), batches) is None  # one-step outputs: no noise to draw
