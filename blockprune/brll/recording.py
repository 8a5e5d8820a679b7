"""Streaming normal-equation accumulators, fed by forward hooks on a block."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from torch import nn

from ..discovery.signature import bind_inputs
from ..discovery.spec import Block
from ..errors import NonFiniteActivationError
from ..runtime import distributed
from ..runtime.forward import StopForward, forward_batch, model_device
from ..runtime.hooks import attached


class StreamAccumulator:
    """Running sums for the least-squares fit of one stream: ``ZᵀZ`` and ``ZᵀR`` with ``Z = [X, 1]``, ``R = Y − X``.

    Memory is O(d²) whatever the number of tokens or batches; sums are kept in float64.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        kwargs = {"dtype": torch.float64, "device": device}
        self.dim = dim
        self.xtx = torch.zeros(dim, dim, **kwargs)
        self.xtr = torch.zeros(dim, dim, **kwargs)
        self.x_sum = torch.zeros(dim, **kwargs)
        self.r_sum = torch.zeros(dim, **kwargs)
        self.r_squared = torch.zeros((), **kwargs)
        self.tokens = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the tokens of one batch: ``x`` the block's input stream, ``y`` its output stream."""
        device = self.xtx.device
        x = x.detach().reshape(-1, self.dim).to(device=device, dtype=torch.float64)
        r = y.detach().reshape(-1, self.dim).to(device=device, dtype=torch.float64) - x
        self.xtx.addmm_(x.T, x)
        self.xtr.addmm_(x.T, r)
        self.x_sum += x.sum(0)
        self.r_sum += r.sum(0)
        self.r_squared += (r * r).sum()
        self.tokens += x.shape[0]

    def reduce_over_ranks(self) -> None:
        """Sum the accumulators of every rank of a distributed launch into each of them."""
        if distributed.active():
            tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.xtx.device)
            distributed.all_reduce_sum([self.xtx, self.xtr, self.x_sum, self.r_sum, self.r_squared, tokens])
            self.tokens = int(tokens.item())

    def normal_equations(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(ZᵀZ, ZᵀR, ‖R‖²)`` with the bias column last."""
        n = torch.tensor([[float(self.tokens)]], dtype=torch.float64, device=self.xtx.device)
        ztz = torch.cat([torch.cat([self.xtx, self.x_sum[:, None]], 1), torch.cat([self.x_sum[None], n], 1)], 0)
        ztr = torch.cat([self.xtr, self.r_sum[None]], 0)
        return ztz, ztr, float(self.r_squared)


def non_finite_error(stream: str, block: str, batch: int) -> NonFiniteActivationError:
    """The error for NaN or Inf in ``stream`` of ``block`` on calibration batch ``batch`` (kept in ``.where``)."""
    error = NonFiniteActivationError(
        f"NaN or Inf in stream {stream!r} of block {block} (calibration batch {batch}); check the calibration "
        f"inputs and the model's dtype (float16 overflows easily: try bfloat16)"
    )
    error.where = (stream, block, batch)
    return error


@contextlib.contextmanager
def numbered_as(indices: list[int]) -> Iterator[None]:
    """Inside, batches are recorded from a subset of the caller's list: a NaN found on batch ``i`` of the
    subset is reported as calibration batch ``indices[i]``, its index in the caller's list."""
    try:
        yield
    except NonFiniteActivationError as error:
        if error.where is not None:
            stream, block, batch = error.where
            renumbered = non_finite_error(stream, block, indices[batch])
            error.args, error.where = renumbered.args, renumbered.where
        raise


class Rider(Protocol):
    """Work that rides along the first recording pass over ``batches`` (:func:`riding`): forward pre-hooks by
    block path, called around each of this rank's forwards, and ``reached`` once it has what it needs from the
    current forward. The pass sets ``stop``, which the rider calls on reaching it, and ``served`` at its end."""

    batches: list[Any]
    reached: bool
    served: bool
    stop: Callable[[], None]

    def hooks(self) -> dict[str, Callable]: ...

    def begin(self) -> None: ...

    def end(self) -> None: ...


_rider: ContextVar[Rider | None] = ContextVar("blockprune_rider", default=None)


@contextlib.contextmanager
def riding(rider: Rider | None) -> Iterator[None]:
    """Inside, the first :func:`record_blocks` pass over exactly ``rider.batches`` (the same objects, in order)
    also runs ``rider``'s hooks and goes on until it is reached, so that one forward per batch serves both;
    ``rider.served`` tells whether that happened. ``None`` does nothing."""
    token = _rider.set(rider)
    try:
        yield
    finally:
        _rider.reset(token)


def _rides(batches: list[Any]) -> Rider | None:
    rider = _rider.get()
    if rider is None or rider.served or len(rider.batches) != len(batches):
        return None
    return rider if all(a is b for a, b in zip(rider.batches, batches)) else None


def stream_pairs(block: Block, bound: dict[str, Any], output: Any):
    """``(stream, input, output)`` for each stream of ``block`` in one call."""
    if isinstance(block.spec.outputs, str):
        yield block.spec.outputs, bound[block.spec.outputs], output
        return
    for position, stream in enumerate(block.spec.outputs):
        if stream is not None:
            yield stream, bound[stream], output[position]


def record_block(
    model: nn.Module,
    block: Block,
    batches: list[dict[str, Any]],
    device: torch.device | str | None = None,
    stop_early: bool = True,
) -> dict[str, StreamAccumulator]:
    """Run ``batches`` through ``model`` and accumulate the normal equations of every stream of ``block``.

    Under a distributed launch each rank records its share of the batches and the sums are all-reduced.

    Accumulators live on ``device`` (default: the model's device, where its first parameter is). With ``stop_early`` the forward stops
    right after the block, since nothing downstream is needed.
    """
    return record_blocks(model, [block], batches, device, stop_early)[block.name]


def record_blocks(
    model: nn.Module,
    blocks: list[Block],
    batches: list[dict[str, Any]],
    device: torch.device | str | None = None,
    stop_early: bool = True,
) -> dict[str, dict[str, StreamAccumulator]]:
    """:func:`record_block` for several blocks in one pass over ``batches`` (by block name, then stream); with
    ``stop_early`` each forward stops after the last of them to run."""
    if device is None:
        device = model_device(model)
    accumulators = {b.name: {s: StreamAccumulator(d, device) for s, d in b.stream_dims.items()} for b in blocks}
    current = {"batch": 0, "seen": set()}
    rider = _rides(batches)

    def stop() -> None:
        if stop_early and len(current["seen"]) == len(blocks) and (rider is None or rider.reached):
            raise StopForward

    def make_hook(block: Block):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if stop_early and block.name in current["seen"]:
                return  # a block run twice in one forward: its first run, as when it is recorded alone
            for stream, x, y in stream_pairs(block, bind_inputs(mod, args, kwargs), output):
                if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                    raise non_finite_error(stream, block.name, current["batch"])
                accumulators[block.name][stream].update(x, y)
            current["seen"].add(block.name)
            stop()

        return hook

    if rider is not None:
        rider.stop = stop
    with attached(model, {b.name: make_hook(b) for b in blocks}), \
            attached(model, rider.hooks() if rider is not None else {}, pre=True):
        for index, batch in distributed.shard(list(enumerate(batches))):
            current["batch"], current["seen"] = index, set()
            if rider is not None:
                rider.begin()
            forward_batch(model, batch, index)
            if rider is not None:
                rider.end()
    if rider is not None:
        rider.served = True
    for streams in accumulators.values():
        for accumulator in streams.values():
            accumulator.reduce_over_ranks()
    return accumulators
