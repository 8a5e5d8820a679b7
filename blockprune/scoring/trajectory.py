"""A short denoising trajectory in latent space, for checking plans on a bare transformer (no pipeline at hand).

Rectified-flow transformers (FLUX, SD3 and the like) predict a velocity ``v`` and their samplers step
``x ← x + (σ_next − σ) v``. Starting from seeded noise shaped like a calibration batch's latents, a few
Euler steps from σ = 1 down to 0, conditioned on the batch's text states, give the latents the model would
draw for that text; with :class:`~blockprune.scoring.guidance.Guidance`, each step is guided against the empty
prompt as the user's sampler would. Comparing those of a compressed model with the
intact model's sees what a one-step output check cannot: errors that compound, or cancel, over the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BlockpruneError
from ..runtime.forward import forward_batch, model_device, output_tensor, to_device
from .guidance import Guidance

LATENTS = "hidden_states"
TIMESTEP = "timestep"
# noise draws a trajectory check makes at least by default (auto_check_samples): held-out batches are repeated with
# fresh noise up to this many samples. With one held-out batch of 4 samples, the noise drawn decided the check, which
# then misranked two plans of flux-small that differ by 3.8 dB in its images; with 32 draws of the same 4 captions it
# ranked them right
MIN_TRAJECTORIES = 32


def check_flow_batch(batch: Mapping[str, Any], index: int) -> None:
    """Refuse a batch that lacks the noisy latents or the timestep a trajectory starts from."""
    missing = [key for key in (LATENTS, TIMESTEP) if not isinstance(batch.get(key), torch.Tensor)]
    if missing:
        raise BlockpruneError(
            f"calibration batch {index} has no tensor {' or '.join(map(repr, missing))}, which the trajectory check "
            f"of importance='auto' starts from; pass the pipeline to compress, or auto_check='outputs'"
        )


def flow_trajectory(model: nn.Module, batch: Mapping[str, Any], index: int, time_scale: float, steps: int,
                    guidance: Guidance | None = None, seed: int | None = None,
                    visit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> torch.Tensor:
    """The clean latents after ``steps`` Euler steps from pure noise (noise level 1) down to 0.

    The noise is seeded by ``seed`` (default ``index``, the batch's number in error messages) and shaped like the
    batch's latents; the batch's other inputs (the
    text states, guidance ...) condition every step, as a sampler's would, guided against the empty prompt
    with ``guidance``. ``time_scale`` is what the model's ``timestep`` argument is in units of the noise level
    (FLUX: 1, SD3: 1000). ``visit``, if given, is called before each step with the step's noisy inputs
    (``{"hidden_states": x, "timestep": t}``, on the model's device).
    """
    check_flow_batch(batch, index)
    batch = to_device(dict(batch), model_device(model))
    empty = guidance.unconditional(batch, index) if guidance is not None else None
    latents, timestep = batch[LATENTS], batch[TIMESTEP]
    generator = torch.Generator().manual_seed(index if seed is None else seed)
    x = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    for i in range(steps):
        now, after = 1 - i / steps, 1 - (i + 1) / steps
        noisy = {LATENTS: x, TIMESTEP: torch.full_like(timestep, now * time_scale)}
        if visit is not None:
            visit(noisy)
        velocity = _velocity(model, {**batch, **noisy}, index, x).float()
        if empty is not None:
            velocity = guidance.combine(velocity, _velocity(model, {**empty, **noisy}, index, x))
        x = x + ((after - now) * velocity).to(x.dtype)
    return x


def _velocity(model: nn.Module, arguments: dict[str, Any], index: int, x: torch.Tensor) -> torch.Tensor:
    velocity = output_tensor(forward_batch(model, arguments, index))
    if velocity.shape != x.shape:
        raise BlockpruneError(
            f"the model's output {tuple(velocity.shape)} is not shaped like its {LATENTS} {tuple(x.shape)}, so it "
            f"is not a velocity to step with; pass the pipeline to compress, or auto_check='outputs'"
        )
    return velocity


def trajectory_runs(samples: int, at_least: int = MIN_TRAJECTORIES) -> int:
    """How many times a trajectory check runs its batches of ``samples`` samples in all: enough for ``at_least``."""
    return max(1, -(-at_least // max(samples, 1)))


class LatentCheck:
    """The tensors a plan or a trained model is checked on without a pipeline (see :func:`latent_check`); called,
    it measures them all; :meth:`half` measures one half of them, as :mod:`~blockprune.scoring.plan_check` halves
    a check (alternate tensors), where there are two tensors or more."""

    def __init__(self, measure_one: Callable[[int], torch.Tensor], count: int) -> None:
        self.measure_one, self.count = measure_one, count

    def __call__(self) -> list[torch.Tensor]:
        return [self.measure_one(k) for k in range(self.count)]

    def half(self, part: int) -> list[torch.Tensor]:
        """The even (``part`` 0) or odd (1) tensors alone (with fewer than two, :func:`halves` halves a batch)."""
        if self.count < 2:
            raise BlockpruneError("a check of one tensor is halved within its batch, not measured by halves")
        return [self.measure_one(k) for k in range(part, self.count, 2)]


def batch_samples(batch: Mapping[str, Any]) -> int:
    """The samples a batch draws trajectories for: the rows of its latents (none without them)."""
    latents = batch.get(LATENTS)
    return latents.shape[0] if isinstance(latents, torch.Tensor) else 0


def latent_check(model: nn.Module, batches: list[Mapping[str, Any]], time_scale: float | None,
                 steps: int, guidance: Guidance | None = None, at_least: int = MIN_TRAJECTORIES,
                 first_seed: int = 0) -> LatentCheck:
    """What a plan or a trained model is checked on without a pipeline: each batch's latents after a ``steps``-step
    trajectory from noise (guided with ``guidance``) when the model is a rectified-flow one (``time_scale`` set),
    the batches repeated with fresh noise up to ``at_least`` samples (run k's noise seeded ``first_seed + k``);
    else its one-step output."""
    if time_scale is not None:
        drawn = sum(batch_samples(b) for b in batches)
        runs = list(enumerate(batches)) * trajectory_runs(drawn, at_least)

        def trajectory(k: int) -> torch.Tensor:
            index, batch = runs[k]
            return flow_trajectory(model, batch, index, float(time_scale), steps, guidance, first_seed + k)
        return LatentCheck(trajectory, len(runs))
    return LatentCheck(lambda k: output_tensor(forward_batch(model, batches[k], k)), len(batches))


def halves(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The measured tensors in two halves: alternate tensors, or the two halves of a single batch."""
    if len(tensors) > 1:
        return tensors[0::2], tensors[1::2]
    (only,) = tensors
    if only.shape[0] < 2:
        return [only], [only]
    first, second = only.chunk(2)
    return [first], [second]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Relative squared error ``Σ‖ŷ − y‖² / Σ‖y‖²`` over matching tensors."""
    error = sum(float(((g.float() - e.to(g.device).float()) ** 2).sum()) for g, e in zip(got, expected))
    reference = sum(float((e.float() ** 2).sum()) for e in expected)
    return error / reference if reference > 0 else error


def per_sample_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The geometric mean over samples (rows) of each one's relative squared error ``‖ŷᵢ − yᵢ‖² / ‖yᵢ‖²``.

    It ranks plans as the mean of the samples' PSNR in dB does (a log per sample), where the pooled
    :func:`relative_error` lets the few samples with the largest errors decide.
    """
    return float(per_sample_logs(got, expected).mean().exp())


def per_sample_logs(got: list[torch.Tensor], expected: list[torch.Tensor]) -> torch.Tensor:
    """Each sample's (row's) log relative squared error ``log(‖ŷᵢ − yᵢ‖² / ‖yᵢ‖²)``, on the CPU, in order."""
    logs = []
    for g, e in zip(got, expected):
        g, e = g.float(), e.to(g.device).float()
        error = ((g - e) ** 2).flatten(1).sum(1).clamp_min(1e-30)
        logs.append(torch.log(error / (e**2).flatten(1).sum(1).clamp_min(1e-30)).cpu())
    return torch.cat(logs)
