"""Scoring blocks with one or more metrics, and combining them as the paper does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from torch import nn

from .. import plugins
from ..adapter import Block
from ..blocks import set_submodule
from ..errors import BlockpruneError
from ..replacement import fit_surrogate
from ..surrogate import LinearSurrogate
from .base import COSTS, Metric, ScoringContext

ABLATIONS = ("remove", "replace")


@contextlib.contextmanager
def ablated(
    model: nn.Module, block: Block, mode: str = "remove", batches: list[dict[str, Any]] | None = None, ridge: float = 1e-6
) -> Iterator[None]:
    """Inside the ``with`` body, ``block``'s residual branch is skipped (``remove``: ``Y = X``) or swapped for
    its least-squares surrogate fitted on ``batches`` (``replace``); afterwards the block is back."""
    original = model.get_submodule(block.name)
    if mode == "remove":
        stand_in = LinearSurrogate.for_block(original, block.spec, block.stream_dims)
    elif mode == "replace":
        stand_in, _ = fit_surrogate(model, block, batches or [], ridge)
    else:
        raise BlockpruneError(f"unknown ablation {mode!r}; use one of {', '.join(ABLATIONS)}")
    set_submodule(model, block.name, stand_in)
    try:
        yield
    finally:
        set_submodule(model, block.name, original)


def resolve_metrics(spec: str | list[str] | Mapping[str, float]) -> tuple[dict[str, float], dict[str, Metric]]:
    """``"name"``, a list of names (equal weights) or ``{name: weight}`` → (weights summing to 1, metrics)."""
    if isinstance(spec, str):
        weights = {spec: 1.0}
    elif isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        weights = dict.fromkeys(spec, 1.0)
    else:
        raise BlockpruneError(f"importance must be a metric name, a list of names or a dict name → weight, got {spec!r}")
    if not weights:
        raise BlockpruneError("importance names no metric; pass e.g. importance='output_mse'")
    known = plugins.metrics()
    for name, weight in weights.items():
        if name not in known:
            raise BlockpruneError(f"unknown importance metric {name!r}; known metrics: {', '.join(sorted(known))}")
        if not weight >= 0:
            raise BlockpruneError(f"importance weight of {name!r} is {weight}; weights must be ≥ 0")
        if known[name].cost not in COSTS:
            raise BlockpruneError(f"metric {name!r} declares cost {known[name].cost!r}; use one of {', '.join(COSTS)}")
    total = sum(weights.values())
    if total <= 0:
        raise BlockpruneError("importance weights sum to zero; give at least one metric a positive weight")
    return {name: weight / total for name, weight in weights.items()}, {name: known[name] for name in weights}


def combine_scores(
    values: Mapping[str, Mapping[str, float]], weights: Mapping[str, float], metrics: Mapping[str, Metric]
) -> dict[str, float]:
    """Importance ``s_i = −Σ_m w_m q_m,i``, each metric min-max normalised across blocks to a quality ``q`` in [0, 1].

    ``q`` is flipped for metrics where lower is better. Lower ``s_i`` means less important (replaced
    first). A metric constant across blocks gives every block quality 1 and so leaves the order alone.
    """
    blocks = list(next(iter(values.values())))
    scores = dict.fromkeys(blocks, 0.0)
    for name, weight in weights.items():
        column = values[name]
        low, high = min(column.values()), max(column.values())
        for block in blocks:
            if high == low:
                quality = 1.0
            else:
                normalised = (column[block] - low) / (high - low)
                quality = normalised if metrics[name].higher_is_better else 1.0 - normalised
            scores[block] -= weight * quality
    return scores


def score_blocks(
    context: ScoringContext,
    metrics: Mapping[str, Metric],
    blocks: list[Block] | None = None,
    ablation: str = "remove",
    on_block: Callable[[Block], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{metric: {block: value}}`` for each of ``blocks`` (default: all); ablating metrics see the block ablated."""
    if ablation not in ABLATIONS:
        raise BlockpruneError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    states = {name: metric.prepare(context) for name, metric in metrics.items()}
    values: dict[str, dict[str, float]] = {name: {} for name in metrics}
    ridge = context.options.get("ridge", 1e-6)
    for block in blocks if blocks is not None else context.blocks:
        for name, metric in metrics.items():
            if not metric.ablates:
                values[name][block.name] = float(metric.evaluate(context, block, states[name]))
        ablating = {name: metric for name, metric in metrics.items() if metric.ablates}
        if ablating:
            context.current = block
            try:
                with ablated(context.model, block, ablation, context.batches, ridge):
                    for name, metric in ablating.items():
                        values[name][block.name] = float(metric.evaluate(context, block, states[name]))
            finally:
                context.current = None
                context.images.pop(block.name, None)
        if on_block is not None:
            on_block(block)
    return values
