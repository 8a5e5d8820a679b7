"""The metric interface and what a metric sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..brll.replacement import fit_surrogates
from ..discovery.spec import Block

COSTS = ("forward", "generation")
FIT_GROUP_BYTES = 2 * 2**30  # float64 normal equations of the blocks recorded in one pass (FLUX.1-dev: 7 blocks)


def _equations_bytes(block: Block) -> int:
    return sum(2 * d * d * 8 for d in block.stream_dims.values())  # ZᵀZ and ZᵀR per stream


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
    surrogates: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)
    scored: list[Block] | None = None  # the blocks being scored, in order (default: ``blocks``)

    def fitted(self, block: Block) -> tuple[nn.Module, dict[str, Any]]:
        """``block``'s least-squares surrogate on ``batches`` and its per-stream fit reports, fitted on the intact
        model once: ``fit_residual``, the ``replace`` ablation and ``auto``'s plan checks share ``surrogates``.

        The blocks scored after it are recorded in the same pass, as many as ``FIT_GROUP_BYTES`` of float64
        normal equations hold: one forward per batch for a group instead of one per block."""
        if block.name not in self.surrogates:
            order = self.scored if self.scored is not None else self.blocks
            names = [b.name for b in order]
            after = order[names.index(block.name) + 1:] if block.name in names else []
            group, size = [block], _equations_bytes(block)
            for other in after:
                if other.name in self.surrogates or size + _equations_bytes(other) > FIT_GROUP_BYTES:
                    break
                group.append(other)
                size += _equations_bytes(other)
            self.surrogates.update(fit_surrogates(self.model, group, self.batches, self.options.get("ridge", 1e-6)))
        return self.surrogates[block.name]

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
