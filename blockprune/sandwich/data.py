"""Recording a span's inputs and targets: kept in RAM up to a budget, spilled to disk past it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..brll.recording import stream_pairs
from ..discovery.signature import bind_inputs
from ..discovery.spec import Block
from ..runtime.forward import StopForward, forward_batch, to_device
from ..runtime.hooks import attached


@dataclass
class SpanSample:
    """One calibration batch at the span: the first block's arguments and every later block's context."""

    inputs: dict[str, Any]
    contexts: list[dict[str, Any]]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, SpanSample):
        return _nbytes(value.inputs) + _nbytes(value.contexts)
    return 0


class ActivationStore:
    """A list of recorded items on CPU: in RAM up to ``budget`` bytes, then as shard files in ``folder``
    (a temporary folder by default)."""

    def __init__(self, budget: int, folder: Path | None = None) -> None:
        self.budget = budget
        self.items: list[Any] = []
        self.in_memory = 0
        self.folder = folder
        self.owns_folder = folder is None

    def append(self, item: Any) -> None:
        """Keep ``item`` (moved to CPU)."""
        item = to_device(item, "cpu")
        size = _nbytes(item)
        if self.in_memory + size <= self.budget:
            self.items.append(item)
            self.in_memory += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="blockprune-activations-"))
        path = self.folder / f"{os.getpid()}-{id(self)}-{len(self.items)}.pt"
        torch.save(item, path)
        self.items.append(path)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        return torch.load(item, weights_only=False) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    @property
    def spilled(self) -> int:
        """How many items live on disk."""
        return sum(isinstance(item, Path) for item in self.items)

    def close(self) -> None:
        """Delete the shard files (the folder too, if the store made it)."""
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        if self.owns_folder and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def record_span_inputs(
    model: nn.Module, span: list[Block], batches: list[dict[str, Any]], budget: int, folder: Path | None = None
) -> ActivationStore:
    """For each batch, the first span block's arguments and the context of every later span block."""
    store = ActivationStore(budget, folder)
    current: dict[str, Any] = {}

    def make_hook(position: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = dict(bind_inputs(module, args, kwargs))
            if position == 0:
                current["inputs"], current["contexts"] = bound, []
            else:
                carried = span[position - 1].spec.streams
                current["contexts"].append({k: v for k, v in bound.items() if k not in carried})
            if position == len(span) - 1:
                raise StopForward

        return hook

    with attached(model, {block.name: make_hook(i) for i, block in enumerate(span)}, pre=True):
        for index, batch in enumerate(batches):
            forward_batch(model, batch, index)
            store.append(SpanSample(current["inputs"], current["contexts"]))
    return store


def record_block_outputs(
    model: nn.Module, block: Block, batches: list[dict[str, Any]], budget: int, folder: Path | None = None
) -> ActivationStore:
    """For each batch, ``block``'s output streams in ``model``."""
    store = ActivationStore(budget, folder)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        store.append({s: y for s, _, y in stream_pairs(block, bind_inputs(module, args, kwargs), output)})
        raise StopForward

    with attached(model, {block.name: hook}):
        for index, batch in enumerate(batches):
            forward_batch(model, batch, index)
    return store
