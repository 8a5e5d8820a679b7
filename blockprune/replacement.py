"""Fitting a block's linear surrogate on the model as it is now, and swapping it in."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapter import Block
from .blocks import set_submodule
from .fit import fit_affine
from .flops import affine_flops
from .plan import ReplacedBlock, StreamReport
from .recording import record_block
from .surrogate import LinearSurrogate


def fit_surrogate(
    model: nn.Module, block: Block, batches: list[dict[str, Any]], ridge: float = 1e-6, device: Any = None
) -> tuple[LinearSurrogate, dict[str, StreamReport]]:
    """Record ``block``'s streams on ``batches`` and fit its surrogate by least squares."""
    accumulators = record_block(model, block, batches, device=device)
    surrogate = LinearSurrogate.for_block(model.get_submodule(block.name), block.spec, block.stream_dims)
    reports = {}
    for stream, accumulator in accumulators.items():
        fit = fit_affine(accumulator, ridge, name=f"{block.name}/{stream}")
        surrogate.set_affine(stream, fit.weight, fit.bias)
        reports[stream] = StreamReport(accumulator.dim, fit.relative_error, fit.condition_number, fit.tokens,
                                       affine_flops(block.stream_shapes[stream]))
    return surrogate, reports


def replace_block(
    model: nn.Module, block: Block, batches: list[dict[str, Any]], ridge: float = 1e-6, device: Any = None
) -> ReplacedBlock:
    """Fit ``block``'s surrogate on the model as it is now and put it in the block's place."""
    surrogate, reports = fit_surrogate(model, block, batches, ridge, device)
    set_submodule(model, block.name, surrogate)
    return ReplacedBlock(block.name, block.kind, block.spec.to_dict(), reports)
