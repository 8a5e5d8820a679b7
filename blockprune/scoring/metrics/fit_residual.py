"""The ``fit_residual`` metric: how much of a block's residual its least-squares linear fit leaves."""

from __future__ import annotations

from typing import Any

from ...discovery.spec import Block
from ...hookspecs import hookimpl
from ..base import Metric, ScoringContext


class FitResidual(Metric):
    """Relative least-squares residual ``‖R − ZΘ‖² / ‖R‖²`` of the block's linear fit, token-weighted over streams.

    It measures replaceability (what BRLL does) rather than removability; higher is worse.
    """

    name = "fit_residual"
    higher_is_better = False
    cost = "forward"
    ablates = False

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        _, reports = context.fitted(block)
        tokens = sum(r.tokens for r in reports.values())
        return sum(r.relative_error * r.tokens for r in reports.values()) / tokens

    def settings(self, context: ScoringContext) -> dict[str, Any]:
        return {"ridge": context.options.get("ridge", 1e-6)}


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(FitResidual())
