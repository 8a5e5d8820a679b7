"""Importance metrics: per-block signals of how much the model needs each block."""

from .ablation import ABLATIONS, ablated, score_blocks
from .base import Metric, ScoringContext
from .combination import combine_scores, resolve_metrics

__all__ = ["ABLATIONS", "Metric", "ScoringContext", "ablated", "combine_scores", "resolve_metrics", "score_blocks"]
