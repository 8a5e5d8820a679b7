"""Resolving a model's residual blocks through an adapter, and checking them on a real forward pass."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapter import Adapter
from ..errors import BlockpruneError, NotResidualError
from .spec import Block, BlockSpec
from .trace import CallRecord, trace_model


def stream_shapes(name: str, spec: BlockSpec, record: CallRecord) -> dict[str, tuple[int, ...]]:
    """Each stream's shape, after checking that the block returns every stream at its input shape."""
    if isinstance(spec.outputs, str):
        positions = {0: spec.outputs}
        if record.output_kind != "tensor":
            raise NotResidualError(
                f"block {name} returns a {record.output_kind}, but its adapter declares a single tensor output"
            )
    else:
        positions = {i: s for i, s in enumerate(spec.outputs) if s is not None}
        if record.output_kind != "tuple" or len(record.outputs) != len(spec.outputs):
            raise NotResidualError(
                f"block {name} returns a {record.output_kind} of {len(record.outputs)} items, but its adapter "
                f"declares a tuple of {len(spec.outputs)} ({spec.outputs})"
            )
    shapes = {}
    for position, stream in positions.items():
        if stream not in record.inputs:
            raise BlockpruneError(
                f"block {name} received no tensor argument {stream!r}; its tensor inputs were "
                f"{', '.join(record.inputs) or 'none'}. Fix the adapter's stream names"
            )
        out_shape = record.outputs[position]
        if out_shape != record.inputs[stream]:
            raise NotResidualError(
                f"block {name} is not residual in stream {stream!r}: input shape {record.inputs[stream]}, "
                f"output[{position}] shape {out_shape}. blockprune replaces only blocks that map each stream "
                f"to its own shape"
            )
        shapes[stream] = record.inputs[stream]
    return shapes


def resolve_blocks(model: nn.Module, adapter: Adapter, batch: dict[str, Any]) -> list[Block]:
    """The model's residual blocks in the order they run, verified on one forward pass over ``batch``."""
    trace = trace_model(model, adapter.trace_targets(model), batch)
    blocks = []
    for name, spec in adapter.blocks(model, trace):
        record = trace.records.get(name)
        if record is None:
            raise BlockpruneError(
                f"block {name} did not run during the forward pass; the {adapter.name!r} adapter lists a block "
                f"that this model does not use"
            )
        for path in trace.called_outside.get(name, ()):
            if not any(path == kept or path.startswith(f"{kept}.") for kept in spec.kept_submodules):
                raise BlockpruneError(
                    f"{type(model).__name__}.forward calls {name}.{path} outside block {name}, so a surrogate in "
                    f"the block's place must keep that submodule; the {adapter.name!r} adapter should declare "
                    f"kept_submodules=({path!r},) for {name}"
                )
        kind = type(model.get_submodule(name)).__name__
        blocks.append(Block(name, kind, spec, stream_shapes(name, spec, record)))
    if not blocks:
        raise BlockpruneError(f"the {adapter.name!r} adapter found no residual blocks in {type(model).__name__}")
    # data-flow order is the order the blocks ran in; blocks of interleaved lists (Latte) alternate
    return sorted(blocks, key=lambda b: trace.records[b.name].order)
