"""Work split across the processes of a torch.distributed launch (torchrun, accelerate launch).

One process per GPU, each holding the whole model. Importance scoring is split by block, recording and
sandwich training by calibration batch; sums are all-reduced so that every rank ends with the same model,
equal to the single-process result up to float rounding. Without a launcher everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_state = threading.local()


def init_from_environment() -> None:
    """Start the process group when a launcher set ``WORLD_SIZE`` > 1 and nobody started it yet."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    """Whether collectives apply here: a process group of several ranks, outside :func:`local`."""
    return (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not getattr(_state, "local", False)
    )


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a launcher)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def default_device() -> torch.device | None:
    """This rank's GPU under a launcher (``LOCAL_RANK`` set, even for a single process), else ``None``."""
    if not torch.cuda.is_available():
        return None
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside, every rank works alone (no collectives): for work already split, such as scoring a block."""
    previous = getattr(_state, "local", False)
    _state.local = True
    try:
        yield
    finally:
        _state.local = previous


def shard(items: list[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from its rank on."""
    return items[rank() :: world_size()] if active() else items


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (through this rank's GPU when the backend is NCCL)."""
    if not active():
        return
    through = default_device() if dist.get_backend() == "nccl" else None
    for tensor in tensors:
        if through is not None and tensor.device != through:
            staged = tensor.to(through)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank."""
    if active():
        dist.barrier()
