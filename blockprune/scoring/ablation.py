"""Scoring blocks with one or more metrics, and combining them as the paper does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from torch import nn

from ..brll.replacement import fit_surrogate
from ..brll.surrogate import LinearSurrogate
from ..discovery.spec import Block
from ..errors import BlockpruneError
from .base import Metric, ScoringContext

ABLATIONS = ("remove", "replace")


@contextlib.contextmanager
def ablated(
    model: nn.Module, block: Block, mode: str = "remove", batches: list[dict[str, Any]] | None = None,
    ridge: float = 1e-6, surrogate: nn.Module | None = None,
) -> Iterator[None]:
    """Inside the ``with`` body, ``block``'s residual branch is skipped (``remove``: ``Y = X``) or swapped for
    its least-squares surrogate (``replace``: ``surrogate``, or one fitted on ``batches``); afterwards the block
    is back."""
    original = model.get_submodule(block.name)
    if mode == "remove":
        stand_in = LinearSurrogate.for_block(original, block.spec, block.stream_dims)
    elif mode == "replace":
        stand_in = surrogate if surrogate is not None else fit_surrogate(model, block, batches or [], ridge)[0]
    else:
        raise BlockpruneError(f"unknown ablation {mode!r}; use one of {', '.join(ABLATIONS)}")
    model.set_submodule(block.name, stand_in)
    try:
        yield
    finally:
        model.set_submodule(block.name, original)


def score_blocks(
    context: ScoringContext,
    metrics: Mapping[str, Metric],
    blocks: list[Block] | None = None,
    ablation: str = "remove",
    on_block: Callable[[Block], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{metric: {block: value}}`` for each of ``blocks`` (default: all); ablating metrics see the block ablated."""
    if ablation not in ABLATIONS:
        raise BlockpruneError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    states = {name: metric.prepare(context) for name, metric in metrics.items()}
    values: dict[str, dict[str, float]] = {name: {} for name in metrics}
    context.scored = blocks if blocks is not None else context.blocks
    for block in context.scored:
        for name, metric in metrics.items():
            if not metric.ablates:
                values[name][block.name] = float(metric.evaluate(context, block, states[name]))
        ablating = {name: metric for name, metric in metrics.items() if metric.ablates}
        if ablating:
            context.current = block
            try:
                fitted = context.fitted(block)[0] if ablation == "replace" else None
                with ablated(context.model, block, ablation, surrogate=fitted):
                    for name, metric in ablating.items():
                        values[name][block.name] = float(metric.evaluate(context, block, states[name]))
            finally:
                context.current = None
                context.images.pop(block.name, None)
        if on_block is not None:
            on_block(block)
    return values
