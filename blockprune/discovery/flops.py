"""FLOP counts from torch's FLOP counter, for the whole model and per block."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..errors import BlockpruneError
from ..runtime.forward import forward_batch
from ..runtime.hooks import attached

logger = logging.getLogger("blockprune")

_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_ATTENTION is not None and _CPU_ATTENTION not in flop_counter.flop_registry:
    # torch counts the GPU attention kernels but not the CPU one; count it the same way.
    @flop_counter.register_flop_formula(_CPU_ATTENTION)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, batch: dict[str, Any]) -> int | None:
    """FLOPs of one forward of ``model`` on ``batch``; ``None`` where torch's FLOP counter cannot run the model.

    Flex attention (Kandinsky 6) does not run under the counter. A forward that fails without the
    counter too is the model's own failure and raises.
    """
    counter = FlopCounterMode(display=False)
    if not _counted(model, batch, counter):
        return None
    return int(counter.get_total_flops())


def _counted(model: nn.Module, batch: dict[str, Any], counting: Any) -> bool:
    """Run the model on ``batch`` inside the ``counting`` context; ``False`` (with a warning) where torch's FLOP
    counter cannot run it."""
    try:
        with counting:
            forward_batch(model, batch, 0)
    except BlockpruneError as error:
        torch._dynamo.reset()  # a flex-attention compile that failed under the counter stays cached otherwise
        forward_batch(model, batch, 0)
        logger.warning("FLOPs not counted: torch's FLOP counter cannot run %s (%s)", type(model).__name__, error)
        return False
    return True


def block_flops(model: nn.Module, names: list[str], batch: dict[str, Any]) -> dict[str, int]:
    """FLOPs of each module in ``names`` on the inputs it receives during a forward on ``batch`` (empty where
    torch's FLOP counter cannot run the model).

    Each module runs once more on its own under the counter (its forward called directly, so hooks do
    not fire again), so a count never depends on how torch attributes ops to the module stack.
    """
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counter = FlopCounterMode(display=False)
            with counter:
                module.forward(*args, **kwargs)
            counts[name] = counts.get(name, 0) + int(counter.get_total_flops())

        return hook

    if not _counted(model, batch, attached(model, {name: make_hook(name) for name in names}, pre=True)):
        return {}
    return counts


def affine_flops(shape: tuple[int, ...]) -> int:
    """FLOPs that torch counts for one affine map ``x W^T + b`` over a stream of ``shape`` (``2·tokens·d²``)."""
    dim = shape[-1]
    tokens = math.prod(shape[:-1])
    return 2 * tokens * dim * dim


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())
