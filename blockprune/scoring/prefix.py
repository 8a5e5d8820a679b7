"""Scoring an ablated block without running the blocks before it again: their outputs are the intact model's.

While block ``b`` is ablated, the blocks before it are passed through (no compute) and ``b`` is called with the
inputs it has in the intact model, kept from a pass that stops at ``b``; the blocks after it run as usual. On
``N`` blocks that spares about half of the ``N`` forwards per batch an ablating metric makes. It is exact when
what runs after ``b`` reads the blocks before it only through ``b``'s inputs (a chain of blocks, as in FLUX,
SD3 and DiT; not a model with long skips): :class:`Prefix` checks that on the first batch against the intact
model, stream by stream and block by block, and a model that fails the check is scored by whole forwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..brll.surrogate import LinearSurrogate
from ..discovery.spec import Block
from ..runtime.finite import tensors_in
from ..runtime.forward import StopForward, forward_batch, output_tensor

logger = logging.getLogger("blockprune")

Call = tuple[tuple, dict]  # a block's positional and keyword inputs


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_copied(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def _summary(value: Any) -> list[tuple]:
    """Shape, sum and sum of squares (float64) of every tensor in ``value``: equal inputs give equal summaries."""
    out = []
    for _, tensor in tensors_in(value, ""):
        t = tensor.detach().double()
        out.append((tuple(t.shape), float(t.sum()), float((t * t).sum())))
    return out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    if len(a) != len(b):
        return False
    for (shape_a, sum_a, sq_a), (shape_b, sum_b, sq_b) in zip(a, b):
        scale = math.sqrt(max(sq_a, sq_b)) * 1e-5 + 1e-12
        if shape_a != shape_b or not math.isclose(sq_a, sq_b, rel_tol=1e-5, abs_tol=1e-12) or abs(sum_a - sum_b) > scale:
            return False
    return True


class Prefix:
    """The intact-model inputs of one block at a time (the *frontier*) on every batch, moved forward block by block.

    ``blocks`` must be in the order the forward calls them; ``exact`` says whether the check on the first batch
    passed (otherwise :meth:`replayed` must not be used).
    """

    def __init__(self, model: nn.Module, blocks: list[Block], batches: list[dict[str, Any]]) -> None:
        self.model, self.blocks, self.batches = model, blocks, batches
        self.position = {b.name: i for i, b in enumerate(blocks)}
        self.at: int | None = None  # the block whose inputs ``inputs`` holds
        self.inputs: list[Call] = []
        self.passes: dict[str, nn.Module] = {}  # each block's pass-through, built once
        self.exact = len(blocks) > 1 and len(batches) > 0 and self._check()

    @contextlib.contextmanager
    def _skipping(self, start: int, call: Call | None) -> Iterator[None]:
        """Blocks before ``start`` passed through; block ``start`` called with ``call`` (if given)."""
        originals = {b.name: self.model.get_submodule(b.name) for b in self.blocks[:start]}
        handle = None
        try:
            for block in self.blocks[:start]:
                if block.name not in self.passes:
                    self.passes[block.name] = LinearSurrogate.for_block(originals[block.name], block.spec, {})
                self.model.set_submodule(block.name, self.passes[block.name])
            if call is not None:  # copies, so that nothing done in place downstream reaches the kept inputs
                handle = self.model.get_submodule(self.blocks[start].name).register_forward_pre_hook(
                    lambda module, args, kwargs: _copied(call), with_kwargs=True)
            yield
        finally:
            if handle is not None:
                handle.remove()
            for name, module in originals.items():
                self.model.set_submodule(name, module)

    def _inputs_at(self, target: int, index: int, start: int | None, call: Call | None) -> Call:
        """Block ``target``'s inputs on batch ``index``, the forward replayed from block ``start``'s ``call``."""
        caught: list[Call] = []

        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            caught.append((args, kwargs))
            raise StopForward

        handle = self.model.get_submodule(self.blocks[target].name).register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with self._skipping(start, call) if start is not None else contextlib.nullcontext():
                forward_batch(self.model, self.batches[index], index)
        finally:
            handle.remove()
        return caught[0]

    def _check(self) -> bool:
        """Whether, on the first batch, every block's inputs replayed from the one before are its intact inputs,
        and the output replayed from the last block is the intact output."""
        intact: list[list[tuple]] = []

        def note(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(intact) < len(self.blocks):
                intact.append(_summary((args, kwargs)))

        handles = [self.model.get_submodule(b.name).register_forward_pre_hook(note, with_kwargs=True)
                   for b in self.blocks]
        try:
            output = _summary(output_tensor(forward_batch(self.model, self.batches[0], 0)))
        finally:
            for handle in handles:
                handle.remove()
        call = self._inputs_at(0, 0, None, None)
        for target in range(1, len(self.blocks)):
            call = self._inputs_at(target, 0, target - 1, call)
            if not _same(_summary(call), intact[target]):
                logger.debug("block %s: its inputs replayed from %s differ from the intact model's; scoring by whole "
                             "forwards", self.blocks[target].name, self.blocks[target - 1].name)
                return False
        with self._skipping(len(self.blocks) - 1, call):
            replayed = _summary(output_tensor(forward_batch(self.model, self.batches[0], 0)))
        if not _same(replayed, output):
            logger.debug("the output replayed from the last block differs from the intact model's; scoring by whole "
                         "forwards")
            return False
        return True

    def advance(self, block: Block) -> None:
        """Hold ``block``'s intact inputs on every batch (blocks from the frontier up to it must be intact)."""
        target = self.position[block.name]
        if self.at == target:
            return
        if self.at is not None and self.at > target:
            self.at, self.inputs = None, []  # blocks scored out of order: start again from the model's inputs
        start, calls = self.at, self.inputs or [None] * len(self.batches)
        self.inputs = [self._inputs_at(target, i, start, calls[i]) for i in range(len(self.batches))]
        self.at = target

    def replayed(self, block: Block, index: int) -> contextlib.AbstractContextManager:
        """Inside, a forward of batch ``index`` skips the blocks before ``block`` (after :meth:`advance`)."""
        return self._skipping(self.position[block.name], self.inputs[index])
