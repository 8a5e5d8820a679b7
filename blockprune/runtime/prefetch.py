"""Offload's prefetch: while one block runs, the next blocks' weights are copied to the GPU on a side CUDA stream.

The order is learned: each forward records which offloaded modules ran, in what order; the next forward copies
the modules that followed the one now running. The first forward under :class:`~blockprune.runtime.offload.Offload`
therefore copies as before (and measures how much memory a forward needs, for the budget rule below).

Copies are exact, so results are bit-identical to copying each block when it starts. Each copy is made on the
side stream, the compute stream waits for its event before the block runs, and ``record_stream`` keeps the
caching allocator from handing its memory to the side stream again before the compute stream is done with it.

How far ahead: one block by default. With ``budget`` (bytes of GPU memory the run may hold), as many blocks as
fit (at most ``MAX_AHEAD``): while a block of ``c`` bytes runs, a copy of ``n`` bytes starts only if
``allocated − c + n + forward_need ≤ budget``. ``forward_need`` is the peak the first forward reached above what
was allocated when it began, i.e. a block plus its activations (read from ``torch.cuda.max_memory_allocated``,
so an earlier, higher peak only makes the rule more careful). The bound is on memory allocated by torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MAX_AHEAD = 8  # blocks copied ahead at most, whatever the budget


@dataclass
class _Copy:
    module: nn.Module
    tensors: list[torch.Tensor]
    event: torch.cuda.Event


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers that move with ``module``, in a fixed order."""
    return [*module.parameters(), *module.buffers()]


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers."""
    return sum(t.nbytes for t in module_tensors(module))


class Prefetcher:
    """Copies of upcoming blocks, made on a side stream of the CUDA ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device, budget: int | None = None) -> None:
        self.device = device
        self.budget = budget
        self.stream = torch.cuda.Stream(device)
        self.order: list[int] = []  # ids of the offloaded modules in the order of the longest recent forward
        self.running: list[int] = []  # ... of the forward now running
        self.ahead: dict[int, _Copy] = {}
        self.forward_need: int | None = None
        self._measure_from: int | None = None

    def begin_forward(self) -> None:
        """A model forward starts: learn the order of the previous one; drop copies it did not use."""
        if self._measure_from is not None:
            self.forward_need = torch.cuda.max_memory_allocated(self.device) - self._measure_from
            self._measure_from = None
        if self.running and self.running != self.order[:len(self.running)]:
            self.order = self.running
        self.running = []
        self.ahead.clear()
        if self.forward_need is None and self.budget is not None:
            self._measure_from = torch.cuda.memory_allocated(self.device)

    def take(self, module: nn.Module) -> tuple[list[torch.Tensor], bool]:
        """Device copies of ``module``'s tensors, and whether they were prefetched (else they are copied now)."""
        self.running.append(id(module))
        copy = self.ahead.pop(id(module), None)
        if copy is None or copy.module is not module:
            return [t.data.to(self.device, non_blocking=True) for t in module_tensors(module)], False
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copy.event)
        for tensor in copy.tensors:
            tensor.record_stream(current)
        return copy.tensors, True

    def prefetch_after(self, module: nn.Module, lookup: Callable[[int], nn.Module | None]) -> None:
        """Start copies of the modules that followed ``module`` in the learned order; ``lookup`` turns an id into
        the module, or ``None`` when it no longer moves (pinned, or swapped out)."""
        try:
            position = self.order.index(id(module))
        except ValueError:
            return
        running = module_bytes(module)
        for key in self.order[position + 1:position + 1 + MAX_AHEAD]:
            if key in self.ahead:
                continue
            upcoming = lookup(key)
            if upcoming is None:
                continue
            nbytes = module_bytes(upcoming)
            if not self._fits(nbytes, running):
                return
            with torch.cuda.stream(self.stream):
                tensors = [t.data.to(self.device, non_blocking=True) for t in module_tensors(upcoming)]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ahead[key] = _Copy(upcoming, tensors, event)

    def _fits(self, nbytes: int, running: int) -> bool:
        if self.budget is None:
            return not self.ahead
        if self.forward_need is None:
            return False
        return torch.cuda.memory_allocated(self.device) - running + nbytes + self.forward_need <= self.budget

    def settle(self) -> None:
        """Wait until every copy started has finished (before host memory they read from is written)."""
        self.stream.synchronize()

    def close(self) -> None:
        """Drop the copies not used, once every copy has finished."""
        self.settle()
        self.ahead.clear()
