"""Recording a span's inputs and targets: kept in RAM up to a budget, spilled to disk past it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..brll.recording import stream_pairs
from ..discovery.signature import bind_inputs
from ..discovery.spec import Block
from ..errors import BlockpruneError
from ..runtime.forward import StopForward, forward_batch, to_device
from ..runtime.hooks import attached
from .shards import SHARD_SUFFIX, SpanSample, read_shard, write_shard


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
    """A list of recorded items on CPU: in RAM up to ``budget`` bytes, then as safetensors shard files in
    ``folder`` (a temporary folder by default); see :func:`write_shard` for what an item may hold."""

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
        path = self.folder / f"{os.getpid()}-{id(self)}-{len(self.items)}{SHARD_SUFFIX}"
        write_shard(item, path)
        self.items.append(path)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        return read_shard(item) if isinstance(item, Path) else item

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


class SpanCapture:
    """Records a span's samples (:class:`SpanSample`: the first span block's arguments, every later block's context)
    into ``store``, one per forward between :meth:`begin` and :meth:`end`; on reaching the last span block it calls
    ``stop``. On its own it is :func:`record_span_inputs`; it can also ride along a least-squares recording pass
    over the same ``batches`` (:func:`blockprune.brll.recording.riding`), which then serves both."""

    def __init__(self, span: list[Block], batches: list[dict[str, Any]], store: ActivationStore) -> None:
        self.span, self.batches, self.store = span, batches, store
        self.current: dict[str, Any] = {}
        self.reached = self.served = False
        self.stop: Callable[[], None] = _stop_forward

    def hooks(self) -> dict[str, Callable]:
        """Forward pre-hooks by block path."""
        return {block.name: self._hook(position) for position, block in enumerate(self.span)}

    def _hook(self, position: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = dict(bind_inputs(module, args, kwargs))
            if position == 0:
                self.current["inputs"], self.current["contexts"] = bound, []
            else:
                carried = self.span[position - 1].spec.streams
                self.current["contexts"].append({k: v for k, v in bound.items() if k not in carried})
            if position == len(self.span) - 1:
                self.reached = True
                self.stop()

        return hook

    def begin(self) -> None:
        """Before a forward."""
        self.current, self.reached = {}, False

    def end(self) -> None:
        """After a forward: keep its sample."""
        if not self.reached:
            raise BlockpruneError(f"the forward never reached {self.span[-1].name}, the span's last block")
        self.store.append(SpanSample(self.current["inputs"], self.current["contexts"]))


def _stop_forward() -> None:
    raise StopForward


def record_span_inputs(
    model: nn.Module, span: list[Block], batches: list[dict[str, Any]], budget: int, folder: Path | None = None
) -> ActivationStore:
    """For each batch, the first span block's arguments and the context of every later span block."""
    capture = SpanCapture(span, batches, ActivationStore(budget, folder))
    with attached(model, capture.hooks(), pre=True):
        for index, batch in enumerate(batches):
            capture.begin()
            forward_batch(model, batch, index)
            capture.end()
    return capture.store


def same_samples(first: Any, second: Any) -> bool:
    """Whether two recorded items hold equal tensors (bit for bit) and equal plain values, in the same structure."""
    if isinstance(first, SpanSample) and isinstance(second, SpanSample):
        return same_samples(first.inputs, second.inputs) and same_samples(first.contexts, second.contexts)
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.dtype == second.dtype and first.shape == second.shape and torch.equal(first, second)
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(same_samples(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(same_samples(a, b) for a, b in zip(first, second))
    return type(first) is type(second) and first == second


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
