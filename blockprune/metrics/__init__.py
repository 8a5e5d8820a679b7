"""Importance metrics: per-block signals of how much the model needs each block."""

from .base import Metric, ScoringContext
from .scoring import ABLATIONS, ablated, combine_scores, resolve_metrics, score_blocks

__all__ = ["ABLATIONS", "Metric", "ScoringContext", "ablated", "combine_scores", "resolve_metrics", "score_blocks"]
