"""``importance="auto"``: choose the blocks by what the user will see, not by one cheap proxy.

Candidate plans come from several signals (the built-in forward metrics in both ablation modes, and the
fixed orders), scored on calibration batches with a share held out. Each plan's blocks are replaced at
once by least-squares surrogates fitted on the other batches, and the result is compared with the intact
model over several denoising steps, since errors compound over the steps (``docs/results.md`` shows a
one-step output check picking plans 3 to 7 dB worse than the best signal): on images sampled over a short
trajectory when a pipeline is at hand and the calibration's prompts are known (it was recorded from the
pipeline, or ``generation_prompts`` are given); otherwise, for rectified-flow models (the adapter's
``flow_time_scale``), on latents drawn from seeded noise over a few Euler steps, conditioned on the
held-out batches' text and guided as the pipeline samples (:mod:`blockprune.scoring.guidance`); otherwise
on images, with a pipeline, or on the held-out batches' one-step outputs. A greedy refinement then
tries swapping blocks of the best plan for the next ones in its ranking, and keeps a swap only when the
error falls on each half of the check (greedy makes many comparisons on a small check: one half alone
is often noise). The winner is therefore never worse, by that check, than any candidate, the simpler default
(``fit_residual``) included.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..brll.replacement import fit_surrogate
from ..calibration import bundled_prompts
from ..discovery.spec import Block
from ..errors import BlockpruneError
from ..runtime.forward import model_device
from .base import ScoringContext
from .cache import cache_directory
from .combination import resolve_metrics
from .metrics.generation import generation_settings
from .selection import ImportanceTable, compute_scores, score_run
from .trajectory import latent_check, relative_error

if TYPE_CHECKING:
    from ..run import Run

logger = logging.getLogger("blockprune")

AUTO = "auto"
FALLBACK = "fit_residual"  # with a single calibration batch there is nothing to hold out
# (metric, ablation) pairs that rank blocks; each gives one candidate plan
SIGNALS = (("fit_residual", "remove"), ("output_mse", "remove"), ("output_mse", "replace"), ("block_influence", "remove"))
FIXED_ORDERS = ("start2end", "end2start")
TRAJECTORY_STEPS, TRAJECTORY_PROMPTS = 8, 4  # the images / latent trajectory checks (generation_* metric options)
SWAP_POOL = 2  # greedy refinement: blocks outside the plan tried in place of each block inside it


@dataclass
class Candidate:
    """A plan (block names in replacement order) and where it came from; ``ranking`` continues past the plan."""

    name: str
    ranking: list[str]
    values: dict[str, float] | None = None


def split_for_selection(batches: list[dict[str, Any]], held_out: float) -> tuple[list, list]:
    """(fit, held-out) batches: every k-th batch is held out, so both shares span the sampled timesteps."""
    if len(batches) < 2:
        raise BlockpruneError(
            f"importance='auto' checks its choice on held-out calibration batches and needs at least 2, got "
            f"{len(batches)}; pass more batches or choose a metric, e.g. importance='fit_residual'"
        )
    held = min(max(1, round(held_out * len(batches))), len(batches) - 1)
    step = len(batches) / held
    held_indices = {min(len(batches) - 1, int(step * i + step / 2)) for i in range(held)}
    return ([b for i, b in enumerate(batches) if i not in held_indices],
            [b for i, b in enumerate(batches) if i in held_indices])


class PlanEvaluator:
    """Held-out error with a plan's blocks replaced by surrogates fitted once each.

    ``measure`` returns the tensors compared with the intact model's, from the model as it is: sampled
    images, the clean latents of a short trajectory from each held-out batch, or one-step outputs.
    """

    def __init__(self, model: nn.Module, blocks: list[Block], fit: list[dict], ridge: float,
                 record_device: Any, measure: Callable[[], list[torch.Tensor]]) -> None:
        self.model, self.by_name, self.fit, self.measure = model, {b.name: b for b in blocks}, fit, measure
        self.ridge, self.record_device = ridge, record_device
        self.surrogates: dict[str, nn.Module] = {}
        self.errors: dict[tuple[str, ...], float] = {}
        self.halves: dict[tuple[str, ...], tuple[float, float]] = {}
        self.fit_seconds = 0.0  # spent fitting surrogates (grows with the fit batches); the rest is measuring
        self.reference = [t.float() for t in measure()]

    def _surrogate(self, name: str) -> nn.Module:
        if name not in self.surrogates:  # fitted on the intact model, as the plan's first replacement would be
            started = time.perf_counter()
            self.surrogates[name], _ = fit_surrogate(self.model, self.by_name[name], self.fit, self.ridge,
                                                     self.record_device)
            self.fit_seconds += time.perf_counter() - started
        return self.surrogates[name]

    @contextlib.contextmanager
    def _replaced(self, names: list[str]) -> Iterator[None]:
        originals = {name: self.model.get_submodule(name) for name in names}
        stand_ins = {name: self._surrogate(name) for name in names}
        try:
            for name, surrogate in stand_ins.items():
                self.model.set_submodule(name, surrogate.to(model_device(originals[name])))
            yield
        finally:
            for name, original in originals.items():
                self.model.set_submodule(name, original)

    def error(self, names: list[str]) -> float:
        """Relative squared error ``Σ‖ŷ − y‖² / Σ‖y‖²`` of the measured tensors against the intact model's."""
        key = tuple(sorted(names))
        if key not in self.errors:
            with self._replaced(names):
                measured = self.measure()
            self.errors[key] = relative_error(measured, self.reference)
            self.halves[key] = tuple(relative_error(got, expected)  # type: ignore[assignment]
                                     for got, expected in zip(_halves(measured), _halves(self.reference)))
        return self.errors[key]

    def better_on_both_halves(self, names: list[str], than: list[str]) -> bool:
        """Whether ``names`` has the lower error on each half of the check (its images, or its batches), not only in
        sum: greedy refinement compares many plans on a small check, and one half alone is often noise."""
        self.error(names), self.error(than)
        mine, theirs = self.halves[tuple(sorted(names))], self.halves[tuple(sorted(than))]
        return all(a < b for a, b in zip(mine, theirs))


def _halves(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The measured tensors in two halves: alternate tensors, or the two halves of a single batch."""
    if len(tensors) > 1:
        return tensors[0::2], tensors[1::2]
    (only,) = tensors
    if only.shape[0] < 2:
        return [only], [only]
    first, second = only.chunk(2)
    return [first], [second]


def _candidates(run: Run, blocks: list[Block], fit: list[dict], on_block: Callable | None) -> list[Candidate]:
    names = [b.name for b in blocks]
    found = [Candidate("start2end", names), Candidate("end2start", names[::-1])]
    cache = cache_directory(run.config.scoring.cache_dir)
    for metric, ablation in SIGNALS:
        weights, metrics = resolve_metrics(metric)
        context = ScoringContext(run.transformer, run.adapter, blocks, fit, run.pipeline, run.metric_options)
        table = compute_scores(context, weights, metrics, ablation, cache, on_block)
        label = metric if ablation == "remove" else f"{metric}/{ablation}"
        found.append(Candidate(label, table.order, table.values[metric]))
    return found


def _refine(best: Candidate, count: int, evaluator: PlanEvaluator, rounds: int) -> tuple[list[str], float]:
    """Greedy swaps from ``best``: each round tries every block of the plan against the next ``SWAP_POOL``
    blocks of its ranking and keeps the swap that lowers the error most among those that lower it on both
    halves of the check, if any does."""
    plan, rest = list(best.ranking[:count]), list(best.ranking[count:])
    error = evaluator.error(plan)
    for _ in range(rounds):
        trials = sorted((evaluator.error(plan[:i] + [c] + plan[i + 1:]), i, c)
                        for i in range(len(plan)) for c in rest[:SWAP_POOL])
        kept = [(e, i, c) for e, i, c in trials
                if e < error and evaluator.better_on_both_halves(plan[:i] + [c] + plan[i + 1:], plan)]
        if not kept:
            break
        error, i, c = kept[0]
        rest.remove(c)
        rest.insert(0, plan[i])
        plan[i] = c
    return plan + rest, error


def check_kind(run: Run) -> str:
    """What ``auto`` checks plans on: ``"images"``, ``"trajectory"`` or ``"outputs"``."""
    check = run.config.scoring.auto_check
    if check == "images" and run.pipeline is None:
        raise BlockpruneError("auto_check='images' samples images and needs a pipeline: pass the pipeline to compress, "
                              "or use auto_check='trajectory' (rectified-flow models) or 'outputs'")
    if check == "trajectory" and run.adapter.flow_time_scale is None:
        raise BlockpruneError(f"auto_check='trajectory' steps a rectified-flow sampler, and the {run.adapter.name!r} "
                              f"adapter sets no flow_time_scale; pass the pipeline to compress, or auto_check='outputs'")
    if check != "auto":
        return check
    # sampled images check the plans on prompts; those must be the calibration's own: the prompts it was recorded
    # from, or the generation_prompts given. With calibration batches of unknown prompts, the trajectory conditioned
    # on their text checks the same distribution the fits saw (measured: images on other prompts misled, results.md).
    prompts_known = run.recorded or "generation_prompts" in (run.config.scoring.metric_options or {})
    if run.pipeline is not None and prompts_known:
        return "images"
    if run.adapter.flow_time_scale is not None:
        return "trajectory"
    return "images" if run.pipeline is not None else "outputs"


def _measure(run: Run, kind: str, held: list[dict]) -> Callable[[], list[torch.Tensor]]:
    """The function whose tensors, compared with the intact model's, score a plan."""
    prompts = list(run.config.calibration_prompts or bundled_prompts())[:TRAJECTORY_PROMPTS]
    options = {"generation_steps": TRAJECTORY_STEPS, "generation_prompts": prompts,
               **(run.config.scoring.metric_options or {})}
    if kind == "images":
        settings = generation_settings(ScoringContext(run.transformer, run.adapter, [], [], run.pipeline, options))
        return lambda: [run.adapter.generate(run.pipeline, settings["prompts"], settings["seeds"], settings["steps"])]
    if kind == "outputs":
        return latent_check(run.transformer, held[: run.config.scoring.auto_check_batches], None, 0)
    return latent_check(run.transformer, held[: run.config.scoring.auto_check_batches], run.adapter.flow_time_scale,
                        int(options["generation_steps"]), run.guidance)


def auto_select(run: Run, blocks: list[Block], count: int, bars: Any = None) -> ImportanceTable:
    """The ranking whose first ``count`` blocks give the lowest held-out output error, with every candidate's."""
    scoring = run.config.scoring
    if len(run.scoring_batches) < 2:
        logger.warning("importance='auto' needs 2 calibration batches to hold one out and has 1: blocks are ranked "
                       "by %s alone; pass more batches to have the choice checked", FALLBACK)
        return score_run(run, FALLBACK, blocks, bars)
    kind = check_kind(run)
    if kind == "outputs" and scoring.auto_check == "auto":
        logger.info("importance='auto' checks plans on one-step outputs: no pipeline was given and the %r adapter is "
                    "not a rectified-flow one; pass the pipeline to compress to check them on sampled images",
                    run.adapter.name)
    fit, held = split_for_selection(run.scoring_batches, scoring.auto_held_out)
    on_block = None
    if bars is not None:
        task = bars.add_task("scoring blocks (auto: all signals)", total=len(blocks) * len(SIGNALS))
        on_block = lambda block: bars.advance(task)
    started = time.perf_counter()
    candidates = _candidates(run, blocks, fit, on_block)
    signals_seconds, started = time.perf_counter() - started, time.perf_counter()
    with torch.no_grad():
        evaluator = PlanEvaluator(run.transformer, blocks, fit, run.config.ridge, run.config.record_device,
                                  _measure(run, kind, held))
        errors = {c.name: evaluator.error(c.ranking[:count]) for c in candidates}
        best = min(candidates, key=lambda c: errors[c.name])
        ranking, refined = _refine(best, count, evaluator, scoring.auto_refine)
    chosen = best.name
    if refined < errors[best.name]:
        chosen = f"greedy({best.name})"
        errors[chosen] = refined
    names = [b.name for b in blocks]
    values = {c.name: c.values for c in candidates if c.values is not None}
    selection = {"candidates": errors, "chosen": chosen, "fit_batches": len(fit), "held_batches": len(held),
                 "evaluations": len(evaluator.errors), "checked_on": kind,
                 "guidance_scale": run.guidance.scale if kind == "trajectory" and run.guidance else 1.0,
                 "seconds": {"signals": signals_seconds, "fits": evaluator.fit_seconds,
                             "checks": time.perf_counter() - started - evaluator.fit_seconds}}
    return ImportanceTable(names, values, {name: float(name == best.name) for name in values},
                           {name: float(ranking.index(name)) for name in names}, AUTO, [], selection)
