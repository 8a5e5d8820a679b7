"""Sandwich training: local fine-tuning around each replaced block (paper §3.2)."""

from .span import sandwich_span
from .stage import train_stage

__all__ = ["sandwich_span", "train_stage"]
