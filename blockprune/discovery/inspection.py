"""``inspect``: a model's residual blocks with their streams, parameters and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import plugins
from ..calibration import prepare_calibration
from ..plan import transformer_of
from .flops import block_flops, count_parameters
from .resolve import resolve_blocks


@dataclass
class BlockInfo:
    """One residual block as ``inspect`` reports it."""

    name: str
    kind: str
    streams: dict[str, tuple[int, ...]]
    parameters: int
    flops: int


def inspect(model: Any, adapter: str = "auto", example_inputs: dict[str, Any] | None = None) -> list[BlockInfo]:
    """The model's residual blocks in data-flow order, with stream shapes, parameters and FLOPs for ``example_inputs``.

    ``example_inputs`` is one dict of keyword arguments for the transformer's forward.
    """
    transformer = transformer_of(model)
    chosen = plugins.get_adapter(transformer, adapter)
    batch = prepare_calibration(None if example_inputs is None else [example_inputs])[0]
    blocks = resolve_blocks(transformer, chosen, batch)
    flops = block_flops(transformer, [b.name for b in blocks], batch)
    return [
        BlockInfo(
            b.name, b.kind, dict(b.stream_shapes), count_parameters(transformer.get_submodule(b.name)), flops.get(b.name, 0)
        )
        for b in blocks
    ]
