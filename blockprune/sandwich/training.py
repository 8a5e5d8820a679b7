"""Running a span on recorded samples, measuring its error, and the sandwich training loop."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..brll.recording import stream_pairs
from ..discovery.signature import forward_signature
from ..discovery.spec import Block
from ..runtime import distributed
from ..runtime.forward import to_device
from . import guard
from .data import ActivationStore, SpanSample
from .guard import GuardResult, GuardSettings, check_interval, guarded_training


def _call(module: nn.Module, arguments: dict[str, Any], use_checkpoint: bool) -> Any:
    parameters = forward_signature(module).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        arguments = {k: v for k, v in arguments.items() if k in parameters}
    if use_checkpoint and torch.is_grad_enabled():
        return checkpointed(module, next(module.parameters()).device, **arguments)
    return module(**arguments)


def checkpointed(call: Callable[..., Any], device: torch.device, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` under torch's non-reentrant checkpoint: its activations are recomputed in the
    backward, which must pick the forward's attention kernels again (:func:`training_attention`)."""

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        with training_attention(device):
            return call(*inner_args, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def span_forward(modules: list[nn.Module], span: list[Block], sample: SpanSample, use_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Run the span's modules in order on a recorded sample; the last block's output streams."""
    state: dict[str, torch.Tensor] = {}
    for position, (module, block) in enumerate(zip(modules, span)):
        arguments = dict(sample.inputs) if position == 0 else {**sample.contexts[position - 1], **state}
        output = _call(module, arguments, use_checkpoint)
        state = {s: y for s, _, y in stream_pairs(block, arguments, output)}
    return state


def _errors(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    squared = sum(((outputs[s].float() - targets[s].float()) ** 2).sum() for s in targets)
    reference = sum((targets[s].float() ** 2).sum() for s in targets)
    count = sum(targets[s].numel() for s in targets)
    return squared, reference, count


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_attention(device: torch.device):
    """Attention kernels for training (sandwich spans, healing): every one but cuDNN's, whose bf16 backward gave NaN
    gradients (H100) or failed ("mha_graph.execute", then an illegal memory access; H200, on small heads and on
    FLUX.1-dev's 24 heads of 128 at 1024²) in torch 2.11 + CUDA 13."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def evaluate_span(modules, span, inputs: ActivationStore, targets: ActivationStore, device) -> tuple[float, float]:
    """(MSE, relative squared error) of the span against its targets, summed over every rank's batches."""
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), autocast(device):
        for index in range(len(inputs)):
            outputs = span_forward(modules, span, to_device(inputs[index], device))
            s, r, c = _errors(outputs, to_device(targets[index], device))
            sums += torch.tensor([float(s), float(r), c], dtype=torch.float64)
    distributed.all_reduce_sum([sums])
    squared, reference, count = sums.tolist()
    return squared / max(count, 1), squared / reference if reference > 0 else squared


def train_span(modules, span, inputs, targets, held_inputs, held_targets, total, trainable, options, device, seed,
               block_name) -> GuardResult:
    """AdamW on MSE, guarded by the held-out relative error (:mod:`blockprune.sandwich.guard`). Each step takes
    ``batch_size`` batches from a seeded permutation of all ``total`` training batches; under a launcher each
    rank runs the ones it recorded (every ``world_size``-th) and gradients are summed over ranks, which is the
    single-process accumulation up to float rounding."""
    world, rank = distributed.world_size(), distributed.rank() if distributed.active() else 0

    def step_loss(index: int) -> torch.Tensor | None:
        if index % world != rank:
            return None
        with torch.enable_grad(), autocast(device), training_attention(device):
            outputs = span_forward(modules, span, to_device(inputs[index // world], device), options.gradient_checkpointing)
            squared, _, count = _errors(outputs, to_device(targets[index // world], device))
            return squared / count

    def held_error() -> float:
        return evaluate_span(modules, span, held_inputs, held_targets, device)[1]

    return guarded_training(trainable, step_loss, held_error, total, guard_settings(options), seed,
                            f"sandwich training of block {block_name}")


def guard_settings(options: Any, steps: int | None = None, grid: tuple[float, ...] | None = None,
                   cooldown_checks: int = 0) -> GuardSettings:
    """The guard's settings from a :class:`~blockprune.config.SandwichConfig` (``steps``: other than its own;
    ``grid``: the rates ``lr="auto"`` probes, :data:`~blockprune.sandwich.guard.LR_GRID` if left out;
    ``cooldown_checks``: check intervals of a final decay from the best weights)."""
    steps = options.steps if steps is None else steps
    grid = guard.LR_GRID if grid is None else grid
    interval = check_interval(options.eval_every, steps)
    return GuardSettings(steps, options.lr, options.batch_size, interval, options.patience, grid=grid,
                         cooldown=cooldown_checks * interval)
