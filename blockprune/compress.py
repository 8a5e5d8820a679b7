"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL)."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import plugins
from .adapter import Adapter, Block
from .blocks import resolve_blocks, set_submodule
from .calibration import bundled_prompts, prepare_calibration, record_pipeline_calibration
from .errors import BlockpruneError
from .fit import fit_affine
from .flops import count_flops, count_parameters
from .metrics import ScoringContext, combine_scores, resolve_metric_weights, score_blocks
from .plan import PLAN_ATTRIBUTE, Plan, ReplacedBlock, StreamReport, transformer_of
from .recording import record_block
from .report import print_plan, progress_bars
from .surrogate import LinearSurrogate

logger = logging.getLogger("blockprune")

OPTIONS = {
    "ridge": 1e-6,  # λ = ridge · trace(ZᵀZ)/(d+1)
    "record_device": None,  # where the float64 accumulators live; default: the block's device
    "score_batches": None,  # how many calibration batches importance scoring uses; default: all
    "calibration_prompts": None,  # prompts for recording calibration from a pipeline; default: bundled
    "calibration_steps": 8,  # denoising steps per prompt when recording from a pipeline
    "steps_per_prompt": 2,  # transformer calls kept per prompt, evenly spaced over the steps
}
ORDERS = ("importance", "start2end", "end2start")


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BlockpruneError(f"unknown compress option {unknown[0]!r}; options: {', '.join(OPTIONS)}")
    return {**OPTIONS, **options}


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
        raise BlockpruneError(f"ratio must be a number strictly between 0 and 1 (the share of blocks to replace), got {ratio!r}")
    return float(ratio)


def _calibration(model: Any, transformer: nn.Module, adapter: Adapter, calibration: Any, options: dict) -> list[dict]:
    if calibration is None and model is not transformer:
        return record_pipeline_calibration(
            model,
            adapter,
            options["calibration_prompts"] or bundled_prompts(),
            num_inference_steps=options["calibration_steps"],
            steps_per_prompt=options["steps_per_prompt"],
        )
    return prepare_calibration(calibration)


def block_order(
    blocks: list[Block], order: str | list[str], scores: Mapping[str, float] | None = None
) -> list[str]:
    """Block names in replacement order: ascending importance, data flow, reverse data flow, or as listed."""
    names = [b.name for b in blocks]
    if isinstance(order, str):
        if order == "importance":
            return sorted(names, key=lambda name: scores[name])  # stable: ties keep data-flow order
        if order == "start2end":
            return names
        if order == "end2start":
            return names[::-1]
        raise BlockpruneError(f"unknown order {order!r}; use one of {', '.join(ORDERS)} or a list of block names")
    listed = list(order)
    for name in listed:
        if name not in names:
            raise BlockpruneError(f"order names block {name!r}, which does not exist; blocks: {', '.join(names)}")
    if len(set(listed)) != len(listed):
        raise BlockpruneError("order names a block more than once")
    return listed


def replace_block(model: nn.Module, block: Block, batches: list[dict], ridge: float, device: Any) -> ReplacedBlock:
    """Record ``block`` on the model as it is now, fit its surrogate by least squares and swap it in."""
    accumulators = record_block(model, block, batches, device=device)
    original = model.get_submodule(block.name)
    surrogate = LinearSurrogate.for_block(original, block.spec, block.stream_dims)
    streams = {}
    for stream, accumulator in accumulators.items():
        fit = fit_affine(accumulator, ridge, name=f"{block.name}/{stream}")
        surrogate.set_affine(stream, fit.weight, fit.bias)
        streams[stream] = StreamReport(accumulator.dim, fit.relative_error, fit.condition_number, fit.tokens)
    set_submodule(model, block.name, surrogate)
    return ReplacedBlock(block.name, block.kind, block.spec.to_dict(), streams)


def compress(
    model: Any,
    adapter: str = "auto",
    ratio: float = 0.2,
    calibration: Any = None,
    *,
    order: str | list[str] = "importance",
    importance: str | list[str] | Mapping[str, float] = "output_mse",
    sandwich: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> Any:
    """Replace ``round(ratio × blocks)`` residual blocks by fitted linear layers, in place; return ``model``.

    ``model`` is a diffusers transformer or a pipeline holding one as ``.transformer``. ``calibration``
    is a list of dicts of keyword arguments for the transformer's forward; with a pipeline it may be
    left out and is then recorded from the pipeline on bundled prompts. Blocks are replaced one at a
    time in ``order``, each fitted on activations of the model as it is after the earlier replacements.
    See ``OPTIONS`` for the keyword options.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    options = _check_options(options)
    if sandwich:
        raise NotImplementedError(
            "sandwich training is not implemented yet; pass sandwich=False to replace blocks by least squares alone"
        )
    if hasattr(transformer, PLAN_ATTRIBUTE):
        raise BlockpruneError("this model is already compressed; compress the original model instead")
    chosen = plugins.get_adapter(transformer, adapter)
    weights = resolve_metric_weights(importance) if order == "importance" else {}
    torch.manual_seed(seed)
    if device is not None:
        transformer.to(device)
    batches = _calibration(model, transformer, chosen, calibration, options)
    blocks = resolve_blocks(transformer, chosen, batches[0])
    count = round(ratio * len(blocks))
    if count == 0:
        raise BlockpruneError(
            f"ratio {ratio} of {len(blocks)} blocks rounds to 0 blocks; use ratio ≥ {0.5 / len(blocks):.3f}"
        )
    names = block_order(blocks, order, scores={}) if order != "importance" else None
    if names is not None and len(names) < count:
        raise BlockpruneError(f"order lists {len(names)} blocks but ratio {ratio} replaces {count}; list more blocks")
    flops_before = count_flops(transformer, batches[0])
    result = Plan(chosen.name, ratio, order, [b.name for b in blocks], seed=seed, importance=dict(weights))
    result.params_before = count_parameters(transformer)
    by_name = {b.name: b for b in blocks}
    with progress_bars(progress) as bars:
        if names is None:
            task = bars.add_task("scoring blocks", total=len(blocks))
            scoring_batches = batches[: options["score_batches"]] if options["score_batches"] else batches
            context = ScoringContext(transformer, chosen, blocks, scoring_batches)
            result.metric_values = score_blocks(context, weights, on_block=lambda b: bars.advance(task))
            result.scores = combine_scores(result.metric_values, weights, plugins.metrics())
            names = block_order(blocks, "importance", result.scores)
        task = bars.add_task("replacing blocks", total=count)
        for name in names[:count]:
            replaced = replace_block(transformer, by_name[name], batches, options["ridge"], options["record_device"])
            replaced.score = result.scores.get(name)
            result.replaced.append(replaced)
            logger.info("replaced %s (fit errors %s)", name, {s: r.relative_error for s, r in replaced.streams.items()})
            bars.advance(task)
    result.params_after = count_parameters(transformer)
    result.flops_after = count_flops(transformer, batches[0])
    result.flops_before = flops_before
    setattr(transformer, PLAN_ATTRIBUTE, result)
    if progress:
        print_plan(result)
    return model
