"""Importance metrics: how much a model suffers when one block is ablated."""

from .base import Metric, ScoringContext
from .scoring import ablated, combine_scores, resolve_metric_weights, score_blocks

__all__ = ["Metric", "ScoringContext", "ablated", "combine_scores", "resolve_metric_weights", "score_blocks"]
