"""Global healing's held-out check: the guard's measurement, the unpruned model's reference, the confirmation.

For rectified-flow models the check is the latents of short trajectories from noise on the held-out batches (as
``importance="auto"`` checks plans), otherwise the one-step outputs; the error is each sample's relative error,
geometric mean over samples. The guard picks the best weights on this check, so their figure there flatters them:
they are confirmed on trajectories from noise the check never draws, sample by sample, twice as many as the check has
(more held-out batches where there are more, else the same ones with more noise), so the confirmation has the power to
keep a real gain whose check figure was only fair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..scoring.auto import (
    TRAJECTORY_STEPS,  # the guard's trajectory is as long as auto's plan checks
)
from ..scoring.guidance import Guidance
from ..scoring.trajectory import (
    batch_samples,
    halves,
    latent_check,
    per_sample_error,
    per_sample_logs,
)
from .training import autocast

CHECK_BATCHES = 8  # held-out batches the guard checks on (bounds its cost)
FRESH_SEED = 1_000_000  # the confirmation's trajectories start from noise seeded from here: none the check draws
FRESH_TRAJECTORIES = 64  # the confirmation's samples at least, on the fewest held-out batches that hold them
CONFIDENCE_Z = 1.645  # confirmed when the samples' log errors fell with a signed-rank z below minus this (one-sided 95 %)


@dataclass
class HeldReference:
    """The unpruned model's measurements (CPU): the guard's check and its confirmation on fresh noise."""

    check: list[torch.Tensor]
    fresh: list[torch.Tensor]


def guard_check(model: nn.Module, adapter: Adapter, held: list[dict[str, Any]],
                guidance: Guidance | None = None) -> tuple[str, Callable[[], list[torch.Tensor]]]:
    """The guard's measurement on ``model`` as it is: ``(kind, function returning the tensors)``; trajectories are
    guided with ``guidance``."""
    kind = "trajectory" if adapter.flow_time_scale is not None else "outputs"
    return kind, latent_check(model, held[:CHECK_BATCHES], adapter.flow_time_scale, TRAJECTORY_STEPS, guidance)


def fresh_check(model: nn.Module, adapter: Adapter, held: list[dict[str, Any]],
                guidance: Guidance | None = None) -> Callable[[], list[torch.Tensor]] | None:
    """The confirmation's measurement on ``model`` as it is: at least :data:`FRESH_TRAJECTORIES` trajectories from
    noise the check never draws, on as many held-out batches as hold that many samples (all of them, drawn again with
    other noise, where they hold fewer); ``None`` for one-step outputs, which have no noise to draw (the check's own
    samples confirm them)."""
    if adapter.flow_time_scale is None:
        return None
    return latent_check(model, first_samples(held, FRESH_TRAJECTORIES), adapter.flow_time_scale, TRAJECTORY_STEPS,
                        guidance, at_least=FRESH_TRAJECTORIES, first_seed=FRESH_SEED)


def first_samples(batches: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The fewest first ``batches`` that hold ``count`` samples (:func:`batch_samples`), or all of them."""
    total = 0
    for index, batch in enumerate(batches):
        total += batch_samples(batch)
        if total >= count:
            return batches[:index + 1]
    return batches


def reference_check(model: nn.Module, adapter: Adapter, held: list[dict[str, Any]],
                    guidance: Guidance | None = None) -> HeldReference:
    """The guard's measurements on the unpruned model, on the CPU (one-step outputs are their own confirmation)."""
    with torch.no_grad():
        check = [t.detach().cpu() for t in guard_check(model, adapter, held, guidance)[1]()]
        fresh = fresh_check(model, adapter, held, guidance)
        return HeldReference(check, check if fresh is None else [t.detach().cpu() for t in fresh()])


class HeldCheck:
    """Healing's held-out check: each sample's relative error (geometric mean over samples) against the unpruned
    model's reference, in sum and on each half of the check; the halves of the first measurement are the start's.
    The best weights must also be confirmed on fresh noise (:func:`significantly_lower`); ``fresh`` is ``None`` for
    one-step outputs, which have no noise to draw, and the check's own samples confirm them."""

    def __init__(self, measure: Callable[[], list[torch.Tensor]], fresh: Callable[[], list[torch.Tensor]] | None,
                 reference: HeldReference, device: torch.device) -> None:
        self.measure, self.fresh, self.reference, self.device = measure, fresh, reference, device
        self.halves_before: list[float] = []
        self.halves_after: list[float] = []  # with the best healed weights, when they were asked about
        self.fresh_before = torch.zeros(0)  # each fresh sample's log error at the start
        self.fresh_after = torch.zeros(0)  # and with the best healed weights, when they were asked about

    def _errors(self) -> tuple[float, list[float], torch.Tensor]:
        """The error in sum, on each half, and each sample's log error."""
        with torch.no_grad(), autocast(self.device):
            got = self.measure()
        parts = [per_sample_error(g, e) for g, e in zip(halves(got), halves(self.reference.check))]
        logs = per_sample_logs(got, self.reference.check)
        return float(logs.mean().exp()), parts, logs

    def _fresh_logs(self) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device):
            return per_sample_logs(self.fresh(), self.reference.fresh)

    def error(self) -> float:
        """The error in sum (the guard's figure)."""
        error, parts, logs = self._errors()
        if not self.halves_before:  # the start
            self.halves_before = parts
            if self.fresh is None:
                self.fresh_before = logs
        return error

    def measure_fresh_start(self) -> None:
        """The confirmation's measurement of the starting weights (before any training; none for one-step outputs)."""
        if self.fresh is not None:
            self.fresh_before = self._fresh_logs()

    def accepts(self) -> bool:
        """Whether the weights now loaded beat the start on each half of the check, not only in sum, and by more
        than the noise on fresh noise."""
        _, self.halves_after, logs = self._errors()
        if not beats_on_both_halves(self.halves_after, self.halves_before):
            return False
        self.fresh_after = logs if self.fresh is None else self._fresh_logs()
        return significantly_lower(self.fresh_after, self.fresh_before)

    def fresh_z(self) -> float:
        """The confirmation's statistic, :func:`signed_rank_z` of the best weights against the start on fresh noise
        (0 when they were not asked about)."""
        return signed_rank_z(self.fresh_after, self.fresh_before) if self.fresh_after.numel() else 0.0

    @staticmethod
    def fresh_error(logs: torch.Tensor) -> float:
        """The geometric mean of the samples' relative errors (0 when not measured)."""
        return float(logs.mean().exp()) if logs.numel() else 0.0


def beats_on_both_halves(after: list[float], before: list[float]) -> bool:
    """Whether the check's error on each of its halves is below the start's (the first test of the best weights)."""
    return all(a < b for a, b in zip(after, before))


def signed_rank_z(after: torch.Tensor, before: torch.Tensor) -> float:
    """The Wilcoxon signed-rank statistic of the samples' log-error changes from ``before`` to ``after`` (paired,
    sample by sample) as a normal z: negative when they fell. Unchanged samples are dropped and tied sizes share
    their mean rank; 0 when no sample changed.

    A rank test, not the mean's t: the changes are heavy-tailed (a few samples of an 8-step trajectory swing far either
    way while most move a little), which leaves a t test little power and lets those few decide.
    """
    change = (after - before).double()
    change = change[change != 0]
    n = change.numel()
    if n == 0:
        return 0.0
    _, inverse, ties = torch.unique(change.abs(), return_inverse=True, return_counts=True)
    first = torch.cumsum(ties, 0) - ties  # the rank before each distinct size's first sample
    ranks = (first + (ties + 1) / 2).double()[inverse]
    rising = float(ranks[change > 0].sum())
    variance = n * (n + 1) * (2 * n + 1) / 24 - float((ties.double() ** 3 - ties).sum()) / 48
    return (rising - n * (n + 1) / 4) / math.sqrt(variance)


def significantly_lower(after: torch.Tensor, before: torch.Tensor, z: float = CONFIDENCE_Z) -> bool:
    """Whether the samples' log errors ``after`` are lower than ``before`` (paired, sample by sample) beyond the
    noise: :func:`signed_rank_z` below ``-z``, a one-sided test at 95 % by default."""
    return signed_rank_z(after, before) < -z
