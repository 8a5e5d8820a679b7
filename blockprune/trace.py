"""A tracing forward pass: which watched modules ran, in what order, with which tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import bind_inputs
from .calibration import run_model
from .hooks import attached


@dataclass
class CallRecord:
    """What one watched module saw in its first call: tensor inputs and outputs, without the tensors."""

    order: int
    calls: int
    inputs: dict[str, tuple[int, ...]]
    output_kind: str  # "tensor", "tuple" or the unsupported type's name
    outputs: list[tuple[int, ...] | None]
    # cosine similarity between output position and same-shaped input, used to infer streams
    similarity: dict[tuple[int, str], float] = field(default_factory=dict)


@dataclass
class Trace:
    """The call records of the watched modules during one forward pass."""

    records: dict[str, CallRecord]

    def called_in_order(self, names: list[str]) -> bool:
        """Whether every module in ``names`` ran exactly once, in the given order."""
        if any(name not in self.records or self.records[name].calls != 1 for name in names):
            return False
        orders = [self.records[name].order for name in names]
        return orders == sorted(orders)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().float(), b.detach().flatten().float()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else 0.0


def _summarise(order: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> CallRecord:
    bound = bind_inputs(module, args, kwargs)
    tensors = {name: value for name, value in bound.items() if isinstance(value, torch.Tensor)}
    if isinstance(output, torch.Tensor):
        kind, items = "tensor", [output]
    elif isinstance(output, (tuple, list)):
        kind, items = "tuple", list(output)
    else:
        kind, items = type(output).__name__, []
    record = CallRecord(order, 1, {n: tuple(t.shape) for n, t in tensors.items()}, kind, [])
    for position, item in enumerate(items):
        record.outputs.append(tuple(item.shape) if isinstance(item, torch.Tensor) else None)
        if isinstance(item, torch.Tensor):
            for name, value in tensors.items():
                if value.shape == item.shape:
                    record.similarity[(position, name)] = _cosine(value, item)
    return record


def trace_model(model: nn.Module, targets: list[str], batch: dict[str, Any]) -> Trace:
    """Run ``model`` on ``batch`` once and summarise every call of the modules at paths ``targets``."""
    records: dict[str, CallRecord] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name in records:
                records[name].calls += 1
            else:
                records[name] = _summarise(len(records), module, args, kwargs, output)

        return hook

    with attached(model, {name: make_hook(name) for name in targets}):
        run_model(model, batch, 0)
    return Trace(records)
