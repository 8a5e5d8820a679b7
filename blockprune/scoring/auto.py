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
is often noise).

That check takes ``TRAJECTORY_STEPS`` (8) steps, fewer than samplers take, and over more steps errors go on
compounding or cancelling: on ``flux-deep`` at 10 % it ranked three plans against the order of their 20-step
images. So the ``auto_finalists`` best plans that replace different blocks, and the simpler default
(``fit_residual``)'s plan, are checked again over the sampler's own steps (:mod:`blockprune.scoring.sampling`),
each sample's error taken on a log scale, as the images' PSNR in dB takes it (a pooled error lets a few
samples decide: with it, the 20-step check still chose a plan 0.58 dB worse on one seed of ``flux-deep``), and
the lowest error there wins: never worse, by that check, than the simpler default.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..calibration import bundled_prompts
from ..config import ScoringConfig
from ..discovery.spec import Block
from ..errors import BlockpruneError, UnusedOptionWarning
from ..runtime import distributed
from .base import ScoringContext
from .cache import cache_directory
from .combination import resolve_metrics
from .metrics.generation import generation_settings
from .plan_check import PlanEvaluator
from .selection import ImportanceTable, compute_scores, score_run
from .selection_record import SelectionRecord
from .trajectory import latent_check, per_sample_error

if TYPE_CHECKING:
    from ..run import Run
    from ..runtime.workdir import Workdir

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


def _candidates(run: Run, blocks: list[Block], fit: list[dict], record: SelectionRecord, bars: Any,
                surrogates: dict[str, Any]) -> list[Candidate]:
    """The fixed orders and each signal's ranking (from ``record`` where it was saved); the signals' surrogates,
    fitted on the intact model, are left in ``surrogates``."""
    on_block = None
    if bars is not None:
        task = bars.add_task("scoring blocks (auto: all signals)", total=len(blocks) * len(SIGNALS))

        def on_block(block: Block) -> None:
            bars.advance(task)
    names = [b.name for b in blocks]
    found = [Candidate("start2end", names), Candidate("end2start", names[::-1])]
    cache = cache_directory(run.config.scoring.cache_dir)
    for metric, ablation in SIGNALS:
        label = metric if ablation == "remove" else f"{metric}/{ablation}"
        if record.signal(label) is None:
            weights, metrics = resolve_metrics(metric)
            context = ScoringContext(run.transformer, run.adapter, blocks, fit, run.pipeline, run.metric_options,
                                     surrogates=surrogates)
            table = compute_scores(context, weights, metrics, ablation, cache, on_block)
            record.add_signal(label, table.order, table.values[metric])
        elif bars is not None:
            bars.advance(task, len(blocks))
        saved = record.signal(label)
        found.append(Candidate(label, saved["ranking"], saved["values"]))
    return found


def _refine(best: Candidate, count: int, evaluator: PlanEvaluator, rounds: int) -> tuple[list[str], float]:
    """Greedy swaps from ``best``: each round tries every block of the plan against the next ``SWAP_POOL``
    blocks of its ranking and keeps the swap that lowers the error most among those that lower it on both
    halves of the check, if any does."""
    plan, rest = list(best.ranking[:count]), list(best.ranking[count:])
    error = evaluator.error(plan)
    for _ in range(rounds):
        first = evaluator.first_half_error(plan)
        swaps = {(i, c): plan[:i] + [c] + plan[i + 1:] for i in range(len(plan)) for c in rest[:SWAP_POOL]}
        for swap, swapped in list(swaps.items()):
            if evaluator.first_half_error(swapped) >= first:  # it cannot be kept
                evaluator.forget_first_half(swapped)
                del swaps[swap]
        trials = sorted((evaluator.error(swapped), i, c) for (i, c), swapped in swaps.items())
        kept = [(e, i, c) for e, i, c in trials if e < error and evaluator.better_on_both_halves(swaps[i, c], plan)]
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


def _measure(run: Run, kind: str, held: list[dict], steps: int) -> Callable[[], list[torch.Tensor]]:
    """The function whose tensors, compared with the intact model's, score a plan: over ``steps`` sampling steps."""
    prompts = list(run.config.calibration_prompts or bundled_prompts())[:TRAJECTORY_PROMPTS]
    options = {"generation_prompts": prompts, **(run.config.scoring.metric_options or {}), "generation_steps": steps}
    if kind == "images":
        settings = generation_settings(ScoringContext(run.transformer, run.adapter, [], [], run.pipeline, options))
        return lambda: [run.adapter.generate(run.pipeline, settings["prompts"], settings["seeds"], settings["steps"])]
    if kind == "outputs":
        return latent_check(run.transformer, held[: run.config.scoring.auto_check_batches], None, 0)
    return latent_check(run.transformer, held[: run.config.scoring.auto_check_batches], run.adapter.flow_time_scale,
                        steps, run.guidance, run.config.scoring.auto_check_samples)


def check_steps(run: Run, kind: str) -> tuple[int, int]:
    """(steps of the check every plan gets, steps of the finalists' re-check): the short check takes
    ``TRAJECTORY_STEPS`` (or the ``generation_steps`` metric option), never more than the sampler; the re-check
    takes the sampler's own (``sampling_steps``). A one-step outputs check has no steps to lengthen."""
    final = run.sampling_steps
    short = (run.config.scoring.metric_options or {}).get("generation_steps", min(TRAJECTORY_STEPS, final))
    return int(short), (int(short) if kind == "outputs" else max(int(short), final))


def _distinct_best(errors: dict[str, float], plans: dict[str, list[str]], count: int, keep: int) -> list[str]:
    """The names of the ``keep`` lowest-error plans that replace different blocks, and the fallback's plan."""
    chosen, seen = [], set()
    for name in sorted(errors, key=errors.get):
        blocks = frozenset(plans[name][:count])
        if len(chosen) < keep and blocks not in seen:
            chosen.append(name)
        seen.add(blocks)
    if FALLBACK in plans and frozenset(plans[FALLBACK][:count]) not in {frozenset(plans[n][:count]) for n in chosen}:
        chosen.append(FALLBACK)  # the simpler default: the final check compares the winner with it too
    return chosen


def _announce(run: Run, kind: str) -> None:
    """Say what the check kind implies: a one-step check chosen for want of a pipeline, an option it does not use."""
    scoring = run.config.scoring
    if kind == "outputs" and scoring.auto_check == "auto":
        logger.info("importance='auto' checks plans on one-step outputs: no pipeline was given and the %r adapter is "
                    "not a rectified-flow one; pass the pipeline to compress to check them on sampled images",
                    run.adapter.name)
    if kind != "trajectory" and scoring.auto_check_samples != ScoringConfig().auto_check_samples:
        warnings.warn(f"option auto_check_samples does nothing in this call: plans are checked on {kind}, and only a "
                      f"latent-trajectory check draws noise; leave it out", UnusedOptionWarning, stacklevel=3)


def auto_select(run: Run, blocks: list[Block], count: int, bars: Any = None,
                workdir: Workdir | None = None) -> ImportanceTable:
    """The ranking whose first ``count`` blocks give the lowest held-out output error, with every candidate's.

    With a ``workdir``, the signals' rankings and the plans' errors are kept there as they are found
    (:mod:`blockprune.scoring.selection_record`), so that an interrupted selection resumes without redoing them."""
    scoring = run.config.scoring
    if len(run.scoring_batches) < 2:
        logger.warning("importance='auto' needs 2 calibration batches to hold one out and has 1: blocks are ranked "
                       "by %s alone; pass more batches to have the choice checked", FALLBACK)
        return score_run(run, FALLBACK, blocks, bars)
    kind = check_kind(run)
    _announce(run, kind)
    fit, held = split_for_selection(run.scoring_batches, scoring.auto_held_out)
    short, final = check_steps(run, kind)
    started = time.perf_counter()
    record = SelectionRecord(workdir)
    fitted: dict[str, Any] = {}
    candidates = _candidates(run, blocks, fit, record, bars, fitted)
    signals_seconds, started = time.perf_counter() - started, time.perf_counter()
    finalists: dict[str, float] = {}
    # the plan checks fit the same surrogates (same model, blocks, batches, ridge): reused, unless ranks scored
    # different blocks (and a check's fits all-reduce over ranks) or the accumulators live elsewhere
    reused = {} if distributed.active() or run.config.record_device is not None else {n: m for n, (m, _) in fitted.items()}
    with torch.no_grad():
        evaluator = PlanEvaluator(run.transformer, blocks, fit, run.config.ridge, run.config.record_device,
                                  _measure(run, kind, held, short), reused, saved=record.checks("check"),
                                  on_new=record.save)
        errors = {c.name: evaluator.error(c.ranking[:count]) for c in candidates}
        plans = {c.name: c.ranking for c in candidates}
        best = min(candidates, key=lambda c: errors[c.name])
        ranking, refined = _refine(best, count, evaluator, scoring.auto_refine)
        if refined < errors[best.name]:
            plans[f"greedy({best.name})"], errors[f"greedy({best.name})"] = ranking, refined
        chosen, fit_seconds, restored = min(errors, key=errors.get), evaluator.fit_seconds, evaluator.restored
        if final > short and scoring.auto_finalists > 0:  # errors compound over the steps: re-check the best plans
            longer = PlanEvaluator(run.transformer, blocks, fit, run.config.ridge, run.config.record_device,
                                   _measure(run, kind, held, final), evaluator.surrogates, per_sample_error,
                                   record.checks("re-check"), record.save)
            finalists = {name: longer.error(plans[name][:count])
                         for name in _distinct_best(errors, plans, count, scoring.auto_finalists)}
            chosen, fit_seconds = min(finalists, key=finalists.get), fit_seconds + longer.fit_seconds
            restored += longer.restored
    base = chosen.removeprefix("greedy(").removesuffix(")")
    names = [b.name for b in blocks]
    values = {c.name: c.values for c in candidates if c.values is not None}
    selection = {"candidates": errors, "chosen": chosen, "finalists": finalists, "steps": short, "final_steps": final,
                 "fit_batches": len(fit), "held_batches": len(held),
                 "evaluations": len(evaluator.errors) + len(finalists), "restored": restored, "checked_on": kind,
                 "half_checks": len(evaluator.saved) - len(evaluator.errors),  # swaps that lost on the first half
                 "guidance_scale": run.guidance.scale if kind == "trajectory" and run.guidance else 1.0,
                 "seconds": {"signals": signals_seconds, "fits": fit_seconds,
                             "checks": time.perf_counter() - started - fit_seconds}}
    return ImportanceTable(names, values, {name: float(name == base) for name in values},
                           {name: float(plans[chosen].index(name)) for name in names}, AUTO, [], selection)
