"""Fitting a block's linear surrogate on the model as it is now, and swapping it in."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..discovery.flops import affine_flops
from ..discovery.resolve import set_submodule
from ..discovery.spec import Block
from ..errors import BlockpruneError
from ..plan import ReplacedBlock, StreamReport
from .fit import fit_affine
from .recording import record_block
from .surrogate import LinearSurrogate

SURROGATES = ("linear", "identity")



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


def identity_surrogate(model: nn.Module, block: Block) -> tuple[LinearSurrogate, dict[str, StreamReport]]:
    """``Y = X``: the block's residual branch skipped (block deletion, the baseline BRLL is compared with).

    Its maps stay zero (sandwich training leaves them so); the fit error of ``Y = X`` is 1 by definition.
    """
    surrogate = LinearSurrogate.for_block(model.get_submodule(block.name), block.spec, block.stream_dims)
    reports = {stream: StreamReport(block.stream_dims[stream], 1.0, float("nan"), 0, affine_flops(block.stream_shapes[stream]))
               for stream in block.stream_dims}
    return surrogate, reports


def replace_block(
    model: nn.Module,
    block: Block,
    batches: list[dict[str, Any]],
    ridge: float = 1e-6,
    device: Any = None,
    surrogate: str = "linear",
) -> ReplacedBlock:
    """Put a surrogate in ``block``'s place: fitted on the model as it is now (``"linear"``) or ``Y = X`` (``"identity"``)."""
    if surrogate not in SURROGATES:
        raise BlockpruneError(f"unknown surrogate {surrogate!r}; use one of {', '.join(SURROGATES)}")
    if surrogate == "identity":
        module, reports = identity_surrogate(model, block)
    else:
        module, reports = fit_surrogate(model, block, batches, ridge, device)
    set_submodule(model, block.name, module)
    return ReplacedBlock(block.name, block.kind, block.spec.to_dict(), reports)
