"""The metric interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..adapter import Adapter, Block


@dataclass
class ScoringContext:
    """What a metric sees: the model (with one block ablated during :meth:`Metric.evaluate`) and its data."""

    model: nn.Module
    adapter: Adapter
    blocks: list[Block]
    batches: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)


class Metric:
    """A per-block importance signal, computed on the model with that one block ablated.

    ``name`` is what users pass as ``importance=``; ``higher_is_better`` gives its direction;
    ``cost`` is ``"forward"`` (forward passes on recorded inputs) or ``"generation"`` (images).
    :meth:`prepare` runs once on the intact model and returns state that :meth:`evaluate` receives.
    """

    name: str = ""
    higher_is_better: bool = False
    cost: str = "forward"

    def prepare(self, context: ScoringContext) -> Any:
        """Compute the reference (for example the intact model's outputs); the result goes to :meth:`evaluate`."""
        return None

    def evaluate(self, context: ScoringContext, state: Any) -> float:
        """The metric's value for ``context.model``, which currently has one block ablated."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
