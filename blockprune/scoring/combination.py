"""Resolving ``importance=`` into metrics and weights, and combining metric values as the paper does."""

from __future__ import annotations

from collections.abc import Mapping

from .. import plugins
from ..errors import BlockpruneError
from .base import COSTS, Metric


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
