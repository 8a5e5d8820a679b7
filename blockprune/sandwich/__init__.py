"""Sandwich training: local fine-tuning around each replaced block (paper §3.2)."""

from .options import SandwichOptions
from .span import sandwich_span
from .stage import StageLog, StageReport, run_stage

__all__ = ["SandwichOptions", "StageLog", "StageReport", "run_stage", "sandwich_span"]
