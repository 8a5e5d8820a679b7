"""Scoring every block with one or more metrics and combining them as the paper does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from torch import nn

from .. import plugins
from ..adapter import Block
from ..blocks import set_submodule
from ..errors import BlockpruneError
from ..surrogate import LinearSurrogate
from .base import Metric, ScoringContext


@contextlib.contextmanager
def ablated(model: nn.Module, block: Block) -> Iterator[None]:
    """Skip ``block``'s residual branch (``Y = X``) inside the ``with`` body, then put the block back."""
    original = model.get_submodule(block.name)
    set_submodule(model, block.name, LinearSurrogate.for_block(original, block.spec, block.stream_dims))
    try:
        yield
    finally:
        set_submodule(model, block.name, original)


def resolve_metric_weights(spec: str | list[str] | Mapping[str, float]) -> dict[str, float]:
    """``"name"``, a list of names (equal weights) or ``{name: weight}`` → weights summing to 1."""
    if isinstance(spec, str):
        weights = {spec: 1.0}
    elif isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        weights = {name: 1.0 for name in spec}
    else:
        raise BlockpruneError(f"importance must be a metric name, a list of names or a dict name → weight, got {spec!r}")
    if not weights:
        raise BlockpruneError("importance names no metric; pass e.g. importance='output_mse'")
    known = plugins.metrics()
    for name, weight in weights.items():
        if name not in known:
            raise BlockpruneError(f"unknown importance metric {name!r}; known metrics: {', '.join(sorted(known))}")
        if weight < 0:
            raise BlockpruneError(f"importance weight of {name!r} is {weight}; weights must be ≥ 0")
    total = sum(weights.values())
    if total <= 0:
        raise BlockpruneError("importance weights sum to zero; give at least one metric a positive weight")
    return {name: weight / total for name, weight in weights.items()}


def combine_scores(
    values: Mapping[str, Mapping[str, float]], weights: Mapping[str, float], metrics: Mapping[str, Metric]
) -> dict[str, float]:
    """Importance ``s_i = −Σ_m w_m q_m,i``: each metric min-max normalised to a quality ``q`` in [0, 1].

    Lower ``s_i`` means less important (replaced first). A metric constant across blocks gives every
    block the same quality (1) and so does not change the order.
    """
    blocks = list(next(iter(values.values())))
    scores = dict.fromkeys(blocks, 0.0)
    for name, weight in weights.items():
        column = values[name]
        low, high = min(column.values()), max(column.values())
        for block in blocks:
            normalised = (column[block] - low) / (high - low) if high > low else 1.0
            quality = normalised if metrics[name].higher_is_better or high == low else 1.0 - normalised
            scores[block] -= weight * quality
    return scores


def score_blocks(
    context: ScoringContext,
    weights: Mapping[str, float],
    blocks: list[Block] | None = None,
    on_block: Callable[[Block], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{metric: {block: value}}`` for every block of ``blocks`` (default: all), each ablated in turn."""
    known = plugins.metrics()
    metrics = {name: known[name] for name in weights}
    states = {name: metric.prepare(context) for name, metric in metrics.items()}
    values: dict[str, dict[str, float]] = {name: {} for name in metrics}
    for block in blocks if blocks is not None else context.blocks:
        with ablated(context.model, block):
            for name, metric in metrics.items():
                values[name][block.name] = float(metric.evaluate(context, states[name]))
        if on_block is not None:
            on_block(block)
    return values
