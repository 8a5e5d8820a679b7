"""A tracing forward pass: which watched modules ran, in what order, with which tensor shapes, fed by whom."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime.forward import forward_batch
from ..runtime.hooks import attached
from .signature import bind_inputs

RowKey = tuple[str, str]


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
    # for each input whose rows (mostly) came out of an earlier watched call: that call's name
    fed_by: dict[str, str] = field(default_factory=dict)
    # a summary of each tensor input's values: equal digests mean (almost surely) equal tensors
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class Trace:
    """The call records of the watched modules during one forward pass."""

    records: dict[str, CallRecord]
    # for each watched module: its submodules that the model called outside the module's own forward
    # (DiT's output layer calls ``transformer_blocks[0].norm1.emb``), outermost paths only
    called_outside: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def called_in_order(self, names: list[str]) -> bool:
        """Whether every module in ``names`` ran exactly once, in the given order."""
        if any(name not in self.records or self.records[name].calls != 1 for name in names):
            return False
        orders = [self.records[name].order for name in names]
        return orders == sorted(orders)

    def reaches(self, source: str, target: str) -> bool:
        """Whether values that ``source`` returned flow into ``target``, directly or through other watched calls."""
        pending, seen = list(self.records[target].fed_by.values()), set()
        while pending:
            name = pending.pop()
            if name == source:
                return True
            if name not in seen:
                seen.add(name)
                pending += self.records[name].fed_by.values()
        return False

    def inputs_fed_by(self, source: str, target: str) -> set[str]:
        """The inputs of ``target`` that carry values ``source`` returned (possibly reshaped, or via watched calls)."""
        return {
            name
            for name, producer in self.records[target].fed_by.items()
            if producer == source or self.reaches(source, producer)
        }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().float(), b.detach().flatten().float()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else 0.0


def _row_keys(t: torch.Tensor) -> list[RowKey]:
    """A key per row (vector along the last dimension) of a float tensor, the same wherever the row is moved.

    Rows survive the reshapes, permutations, slices and concatenations that models apply between
    blocks, so matching keys shows where an input's values came from. All-zero rows are left out.
    """
    if not t.is_floating_point() or t.dim() < 2:
        return []
    rows = t.detach().reshape(-1, t.shape[-1]).to(torch.float64)
    squares, sums = (rows * rows).sum(1).tolist(), rows.sum(1).tolist()
    return [(f"{q:.9e}", f"{s:.6e}") for q, s in zip(squares, sums) if q > 0]


def _digest(t: torch.Tensor) -> str:
    values = t.detach().to(torch.float64)
    return f"{tuple(t.shape)}:{float(values.sum()):.9e}:{float((values * values).sum()):.9e}"


def _summarise(order: int, bound: dict[str, Any], output: Any) -> CallRecord:
    tensors = {name: value for name, value in bound.items() if isinstance(value, torch.Tensor)}
    if isinstance(output, torch.Tensor):
        kind, items = "tensor", [output]
    elif isinstance(output, (tuple, list)):
        kind, items = "tuple", list(output)
    else:
        kind, items = type(output).__name__, []
    record = CallRecord(order, 1, {n: tuple(t.shape) for n, t in tensors.items()}, kind, [])
    record.digests = {name: _digest(value) for name, value in tensors.items()}
    for position, item in enumerate(items):
        record.outputs.append(tuple(item.shape) if isinstance(item, torch.Tensor) else None)
        if isinstance(item, torch.Tensor):
            for name, value in tensors.items():
                if value.shape == item.shape:
                    record.similarity[(position, name)] = _cosine(value, item)
    return record


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [item for item in value if isinstance(item, torch.Tensor)]
    return []


class _Tracer:
    """The hooks of one tracing pass, and what they collect."""

    def __init__(self) -> None:
        self.records: dict[str, CallRecord] = {}
        self.produced: dict[RowKey, str] = {}  # row key -> the latest watched call that returned that row
        self.running: set[str] = set()
        self.outside: dict[str, set[str]] = {}

    def producer(self, value: torch.Tensor) -> str | None:
        """The watched call that returned at least half of ``value``'s rows, if any."""
        keys = _row_keys(value)
        sources = Counter(self.produced[key] for key in keys if key in self.produced)
        if not sources:
            return None
        name, rows = sources.most_common(1)[0]
        return name if 2 * rows >= len(keys) else None

    def entry_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.running.add(name)

        return hook

    def submodule_hook(self, name: str, path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in self.running:
                self.outside.setdefault(name, set()).add(path)

        return hook

    def exit_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.running.discard(name)
            if name in self.records:
                self.records[name].calls += 1
            else:
                bound = bind_inputs(module, args, kwargs)
                record = self.records[name] = _summarise(len(self.records), bound, output)
                for input_name, value in bound.items():
                    source = self.producer(value) if isinstance(value, torch.Tensor) else None
                    if source is not None:
                        record.fed_by[input_name] = source
            for item in _tensors(output):
                self.produced.update(dict.fromkeys(_row_keys(item), name))

        return hook

    def trace(self) -> Trace:
        """What the pass saw; of the submodules called from outside a watched module, only the outermost."""
        called_outside = {
            name: tuple(sorted(p for p in paths if not any(p.startswith(f"{q}.") for q in paths)))
            for name, paths in self.outside.items()
        }
        return Trace(self.records, called_outside)


def trace_model(model: nn.Module, targets: list[str], batch: dict[str, Any]) -> Trace:
    """Run ``model`` on ``batch`` once and summarise every call of the modules at paths ``targets``.

    Each record also names, per input, the watched call that returned most of its rows (at least
    half), so that adapters can follow the data flow from block to block; submodules of a watched
    module that run outside its forward are collected in ``Trace.called_outside``.
    """
    tracer = _Tracer()
    pre_hooks = {}
    for name in targets:
        pre_hooks[name] = tracer.entry_hook(name)
        for path, _ in model.get_submodule(name).named_modules():
            if path:
                pre_hooks[f"{name}.{path}"] = tracer.submodule_hook(name, path)
    exit_hooks = {name: tracer.exit_hook(name) for name in targets}
    with attached(model, exit_hooks), attached(model, pre_hooks, pre=True):
        forward_batch(model, batch, 0)
    return tracer.trace()
