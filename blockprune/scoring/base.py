"""The metric interface and what a metric sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..discovery.spec import Block

COSTS = ("forward", "generation")


@dataclass
class ScoringContext:
    """What metrics see: the model, its blocks and data, and (while one is ablated) the current block.

    ``pipeline`` is the pipeline that holds ``model``, or ``None``; generation metrics need one (or an
    adapter that can sample from the bare model). ``images`` caches generated images per ablated block
    so that several generation metrics share one set of generations.
    """

    model: nn.Module
    adapter: Adapter
    blocks: list[Block]
    batches: list[dict[str, Any]]
    pipeline: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    current: Block | None = None
    images: dict[str | None, torch.Tensor] = field(default_factory=dict)

    @property
    def generator(self) -> Any:
        """What the adapter samples from: the pipeline if there is one, else the model."""
        return self.pipeline if self.pipeline is not None else self.model


class Metric:
    """A per-block importance signal.

    ``name`` is what users pass as ``importance=``; ``higher_is_better`` is the direction of the value
    as a measure of the model's quality (``False`` for damage measures such as errors and distances);
    ``cost`` is ``"forward"`` (forward passes on recorded inputs) or ``"generation"`` (images).
    With ``ablates`` (the default) :meth:`evaluate` runs with ``context.current`` ablated; otherwise on
    the intact model (signals such as ``block_influence`` that read the block itself).
    :meth:`prepare` runs once on the intact model; its result is passed to every :meth:`evaluate`.
    """

    name: str = ""
    higher_is_better: bool = False
    cost: str = "forward"
    ablates: bool = True

    def prepare(self, context: ScoringContext) -> Any:
        """Compute the reference (for example the intact model's outputs)."""
        return None

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        """The metric's value for ``block`` (ablated in ``context.model`` when ``ablates``)."""
        raise NotImplementedError

    def settings(self, context: ScoringContext) -> dict[str, Any]:
        """The options this metric's value depends on, for the score cache key."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
