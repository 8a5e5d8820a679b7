"""Backpropagation through offloaded blocks, one block on the accelerator at a time (healing with ``offload=True``).

Healing trains every block at once, so a plain backward would need all of them on the accelerator. Under
:func:`blockwise_backward` each offloaded block runs forward without keeping its activations (its weights visit
the accelerator as in inference, prefetched); its backward copies the weights in again, recomputes the block
from its saved inputs and backpropagates through it, then lets the weights go. This is activation
checkpointing at block granularity whose recompute also brings the block's weights back. The trainable
tensors (LoRA, surrogates) stay on the accelerator throughout, with their gradients and optimizer state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..runtime.offload import Offload
from .training import checkpointed, training_attention


class _RecomputedBlock(torch.autograd.Function):
    """Outputs of ``forward`` computed without a graph; the backward recomputes them with one, block resident."""

    @staticmethod
    def forward(ctx: Any, call: Callable[[list], Any], resident: Callable, spill: bool, shape: dict,
                anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.call, ctx.resident, ctx.device = call, resident, anchor.device
        ctx.autocast = torch.is_autocast_enabled(anchor.device.type), torch.get_autocast_dtype(anchor.device.type)
        ctx.spilled = [t.detach().to("cpu") for t in tensors] if spill else None
        if not spill:
            ctx.save_for_backward(*tensors)  # its version check refuses inputs changed in place since
        ctx.input_devices = [t.device for t in tensors]
        ctx.set_materialize_grads(False)
        leaves, shape["spec"] = tree_flatten(call(list(tensors)))
        shape["leaves"] = leaves
        outputs = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
        ctx.mark_non_differentiable(*(t for t in outputs if not t.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[5:]
        saved = ctx.spilled if ctx.spilled is not None else ctx.saved_tensors
        inputs = [t.detach().to(d).requires_grad_(need and t.is_floating_point())
                  for t, d, need in zip(saved, ctx.input_devices, needs)]
        enabled, dtype = ctx.autocast
        with ctx.resident(), torch.enable_grad(), training_attention(ctx.device), \
                torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            leaves, _ = tree_flatten(ctx.call(inputs))
            outputs = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.spilled = None
        return (None,) * 5 + tuple(t.grad if t.requires_grad else None for t in inputs)


def _wrapped(offload: Offload, module: nn.Module, original: Callable, spill: bool) -> Callable:
    resident = functools.partial(offload.visiting, module)  # weights unchanged: only trainable ones change

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        # without the tensors: the autograd node keeps ``call``, and must not keep the device inputs through it
        template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def call(tensors: list[torch.Tensor]) -> Any:
            filled = list(template)
            for position, tensor in zip(positions, tensors):
                filled[position] = tensor
            inner_args, inner_kwargs = tree_unflatten(filled, spec)
            return original(*inner_args, **inner_kwargs)

        anchor = torch.zeros((), device=offload.device, requires_grad=True)  # so that every block's backward runs
        shape: dict = {}
        outputs = iter(_RecomputedBlock.apply(call, resident, spill, shape, anchor, *(leaves[i] for i in positions)))
        return tree_unflatten([next(outputs) if isinstance(leaf, torch.Tensor) else leaf
                               for leaf in shape["leaves"]], shape["spec"])

    return forward


@contextlib.contextmanager
def _forwards_wrapped(modules: list[nn.Module], wrap: Callable[[nn.Module, Callable], Callable]) -> Iterator[None]:
    """Inside: each module's forward is ``wrap(module, forward)``; on exit its own forward is back."""
    own = [module.__dict__.get("forward") for module in modules]  # a forward set on the instance, e.g. by a hook
    for module in modules:
        module.forward = wrap(module, module.forward)
    try:
        yield
    finally:
        for module, forward in zip(modules, own):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@contextlib.contextmanager
def blockwise_backward(offload: Offload, trainable: list[torch.Tensor]) -> Iterator[None]:
    """Inside: gradients flow through ``offload``'s blocks one resident block at a time (module docstring), and
    ``trainable`` sits on the accelerator. With the offload's ``max_gpu_memory`` set, each block's saved inputs
    wait in host memory for the backward. On exit the trainable tensors are back on the CPU, gradients dropped."""
    spill = offload.max_gpu_memory is not None
    modules = [offload.model.get_submodule(name) for name in offload.blocks]
    for tensor in trainable:
        tensor.data = tensor.data.to(offload.device)
    offload.recomputed_backward = True
    try:
        with _forwards_wrapped(modules, lambda module, forward: _wrapped(offload, module, forward, spill)):
            yield
    finally:
        offload.recomputed_backward = False
        for tensor in trainable:
            tensor.grad = None
            tensor.data = tensor.data.to("cpu")


def checkpointed_blocks(modules: list[nn.Module], device: torch.device) -> contextlib.AbstractContextManager:
    """Inside: each of ``modules`` run with gradients keeps no activations, its backward recomputes them (healing
    in memory with ``sandwich_gradient_checkpointing``: the whole model's activations need not fit at once)."""

    def wrap(module: nn.Module, forward: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpointed(forward, device, *args, **kwargs)

        return run

    return _forwards_wrapped(modules, wrap)
