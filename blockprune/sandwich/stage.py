"""One sandwich stage: record the span, train LoRA and linear layers against the target, merge, report."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..config import SandwichConfig
from ..discovery.spec import Block
from ..plan import StageReport
from ..runtime import distributed
from ..runtime.forward import model_device, to_device
from .data import (
    ActivationStore,
    SpanCapture,
    record_block_outputs,
    record_span_inputs,
    same_samples,
)
from .lora import add_lora, lora_factors, merge_lora, remove_lora
from .span import sandwich_span
from .training import autocast, evaluate_span, span_forward, train_span

logger = logging.getLogger("blockprune")

Stores = tuple[ActivationStore, ActivationStore, ActivationStore, ActivationStore]


@dataclass
class _Span:
    """The blocks one stage trains, and what it takes to put them back as they were."""

    names: list[str]
    blocks: list[Block]
    modules: list[nn.Module]
    unreplaced: list[str]  # candidates for LoRA
    surrogates: list[str]
    snapshot: dict[str, dict[str, torch.Tensor]]
    requires_grad: dict[int, bool]
    dtypes: dict[str, torch.dtype]  # of the surrogates, which train in float32


def train_stage(
    model: nn.Module,
    adapter: Adapter,
    blocks: list[Block],
    replaced: set[str],
    new_block: str,
    train_batches: list[dict[str, Any]],
    held_batches: list[dict[str, Any]],
    originals: dict[str, nn.Module],
    options: SandwichConfig,
    seed: int = 0,
    spill_folder: Path | None = None,
    keep_spilled: bool = False,
    offload: Any = None,
    recorded: SpanCapture | None = None,
    free: frozenset[str] = frozenset(),
) -> tuple[StageReport, dict[str, Any], dict[str, Any]]:
    """Train the sandwich around ``new_block`` (already replaced) and merge the result into ``model``.

    ``originals`` holds CPU copies of the unpruned blocks that earlier stages changed; this stage adds the
    ones it changes. Activations past the budget spill to ``spill_folder`` (default: a temporary folder);
    LoRA initialisation and batch order draw only on ``seed``. Returns the report, the trained surrogate weights
    and the LoRA factors. Training is guarded (:mod:`blockprune.sandwich.guard`): the span ends on the weights
    with the lowest held-out error seen, its starting ones included. On any error (a NaN or Inf loss raises
    :class:`~blockprune.errors.SandwichDivergedError`) the span is put back as it was before the stage. With ``offload`` (an :class:`blockprune.runtime.offload.Offload`) only the span stays on the accelerator.
    ``recorded``, from :func:`span_capture`, holds the training batches' span samples if the least-squares pass
    recorded them along the way (checked on the first batch against the model as it is now). ``free``: the blocks
    whose outputs earlier stages left free (:func:`~blockprune.sandwich.span.free_outputs`), which the span runs past.
    """
    if offload is None:
        return _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals,
                            options, seed, spill_folder, keep_spilled, recorded, free)
    names = [b.name for b in blocks]
    with offload.pinned(sandwich_span(names, replaced, names.index(new_block), options.width, free)):
        return _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals,
                            options, seed, spill_folder, keep_spilled, recorded, free)


def span_capture(blocks: list[Block], replaced: set[str], new_block: str, train_batches: list[dict[str, Any]],
                 least_squares_batches: list[dict[str, Any]], options: SandwichConfig,
                 spill_folder: Path | None = None, free: frozenset[str] = frozenset()) -> SpanCapture | None:
    """What records the training batches' span samples while the least squares of ``new_block`` are recorded (both
    need the same forwards as far as ``new_block``, which the replacement does not change), for :func:`train_stage`;
    ``None`` unless the training batches are the least-squares batches, as by default (``sandwich_split=1``)."""
    if len(train_batches) != len(least_squares_batches) or any(
            a is not b for a, b in zip(train_batches, least_squares_batches)):
        return None
    names, by_name = [b.name for b in blocks], {b.name: b for b in blocks}
    span = [by_name[n] for n in sandwich_span(names, replaced | {new_block}, names.index(new_block), options.width,
                                              free)]
    return SpanCapture(span, least_squares_batches, ActivationStore(options.activation_budget, spill_folder))


def _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals, options, seed,
                 spill_folder, keep_spilled, recorded, free):
    started = time.perf_counter()
    device = model_device(model)
    span = _open_span(model, blocks, replaced, new_block, originals, options.width, free)
    total_train = len(train_batches)
    stores = _record(model, span, originals, distributed.shard(train_batches), distributed.shard(held_batches),
                     options, device, spill_folder, recorded)
    _, held_inputs, _, held_targets = stores
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_before, error_before = evaluate_span(span.modules, span.blocks, held_inputs, held_targets, device)
    lora_blocks, train_seconds, guard = _fit(model, adapter, span, stores, total_train, options, device, seed, new_block)
    if guard is not None and guard.reverted:  # the span exactly as it was: no merge, no dtype round trip
        _restore(model, span)
        loss_after, error_after = loss_before, error_before
        trained, lora = _harvest(model, span, [])
    else:
        loss_after, error_after = evaluate_span(span.modules, span.blocks, held_inputs, held_targets, device)
        trained, lora = _harvest(model, span, lora_blocks)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    spilled = sum(store.spilled for store in stores)
    if not (keep_spilled and spill_folder is not None):
        _close(stores)
    report = StageReport(new_block, span.names, lora_blocks, span.surrogates if options.train_surrogates else [],
                         options.steps, loss_before, loss_after, error_before, error_after,
                         time.perf_counter() - started, peak, spilled, train_seconds,
                         guard.best_step if guard else None, guard.steps_run if guard else None,
                         guard.lr if guard else None, guard.lr_errors if guard else {})
    return report, trained, lora


def _open_span(model, blocks, replaced, new_block, originals, width, free) -> _Span:
    """The span around ``new_block``, after keeping CPU copies of its blocks in ``originals`` (where missing)."""
    names = [b.name for b in blocks]
    span_names = sandwich_span(names, replaced, names.index(new_block), width, free)
    by_name = {b.name: b for b in blocks}
    modules = [model.get_submodule(n) for n in span_names]
    for name, module in zip(span_names, modules):
        if name not in originals:
            originals[name] = copy.deepcopy(module).to("cpu")
    surrogates = [n for n in span_names if n in replaced]
    return _Span(
        names=span_names,
        blocks=[by_name[n] for n in span_names],
        modules=modules,
        unreplaced=[n for n in span_names if n not in replaced],
        surrogates=surrogates,
        snapshot={n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for n, m in zip(span_names, modules)},
        requires_grad={id(p): p.requires_grad for m in modules for p in m.parameters()},
        dtypes={n: next(model.get_submodule(n).parameters()).dtype for n in surrogates},
    )


def _record(model, span: _Span, originals, train_batches, held_batches, options, device, spill_folder,
            recorded: SpanCapture | None) -> Stores:
    """(train inputs, held-out inputs, train targets, held-out targets) of the span, for this rank's batches."""
    budget = options.activation_budget
    train_inputs = _recorded_inputs(model, span, train_batches, recorded)
    if train_inputs is None:
        train_inputs = record_span_inputs(model, span.blocks, train_batches, budget, spill_folder)
    held_inputs = record_span_inputs(model, span.blocks, held_batches, budget, spill_folder)
    train_targets, held_targets = _targets(model, span, originals, train_batches, held_batches, train_inputs,
                                           held_inputs, options, device, spill_folder)
    return train_inputs, held_inputs, train_targets, held_targets


def _recorded_inputs(model, span: _Span, train_batches, recorded: SpanCapture | None) -> ActivationStore | None:
    """``recorded``'s samples if it recorded this span on every training batch and its first sample equals what the
    model as it is now gives (a model whose block arguments depend on a replaced block's output would differ)."""
    if recorded is None:
        return None
    if not recorded.served or [b.name for b in recorded.span] != span.names or len(recorded.store) != len(train_batches):
        recorded.store.close()
        return None
    if not train_batches:  # this rank's share of a small calibration under a distributed launch
        return recorded.store
    first = record_span_inputs(model, span.blocks, train_batches[:1], recorded.store.budget)
    same = same_samples(recorded.store[0], first[0])
    first.close()
    if same:
        return recorded.store
    logger.info("sandwich %s: span inputs recorded with the least squares differ from the model's; recording again",
                "+".join(span.names))
    recorded.store.close()
    return None


def _targets(model, span: _Span, originals, train_batches, held_batches, train_inputs, held_inputs, options, device,
             spill_folder) -> tuple[ActivationStore, ActivationStore]:
    """What the span should output: the unpruned model's last span block ("global"), or the unpruned span
    blocks run on the recorded inputs ("local")."""
    if options.target == "global":
        current = {n: model.get_submodule(n) for n in originals}
        for name, original in originals.items():
            model.set_submodule(name, copy.deepcopy(original).to(device))
        try:
            return (record_block_outputs(model, span.blocks[-1], train_batches, options.activation_budget, spill_folder),
                    record_block_outputs(model, span.blocks[-1], held_batches, options.activation_budget, spill_folder))
        finally:
            for name, module in current.items():
                model.set_submodule(name, module)
    unpruned = [copy.deepcopy(originals[n]).to(device) if n in originals else model.get_submodule(n) for n in span.names]
    results = []
    for inputs in (train_inputs, held_inputs):
        store = ActivationStore(options.activation_budget, spill_folder)
        with torch.no_grad(), autocast(device):
            for index in range(len(inputs)):
                store.append(span_forward(unpruned, span.blocks, to_device(inputs[index], device)))
        results.append(store)
    return results[0], results[1]


def _fit(model, adapter, span: _Span, stores: Stores, total, options, device, seed, block_name):
    """Train the span under a seeded RNG; returns the blocks that got LoRA, the training seconds and the guard's
    result (``None`` with nothing to train). On any error the span is rolled back and the stores closed before
    the error propagates."""
    train_inputs, held_inputs, train_targets, held_targets = stores
    guard = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        train_started = time.perf_counter()
        try:
            lora_blocks = _make_trainable(model, adapter, span, options)
            trainable = [p for m in span.modules for p in m.parameters() if p.requires_grad]
            if trainable:
                guard = train_span(span.modules, span.blocks, train_inputs, train_targets, held_inputs, held_targets,
                                   total, trainable, options, device, seed, block_name)
        except BaseException:  # divergence, a bad lora_targets name, out of memory, a second Ctrl-C ...
            _restore(model, span)
            _close(stores)
            raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return lora_blocks, time.perf_counter() - train_started, guard


def _make_trainable(model, adapter, span: _Span, options) -> list[str]:
    """Freeze the span, unfreeze its surrogates (in float32) if asked, add LoRA to its unreplaced blocks; returns
    the blocks that got LoRA (those with target modules)."""
    for module in span.modules:
        module.requires_grad_(False)
    for name in span.surrogates:
        model.get_submodule(name).float().requires_grad_(options.train_surrogates)
    lora_blocks = []
    for name in span.unreplaced:
        block = model.get_submodule(name)
        targets = list(options.lora_targets or adapter.lora_targets(block))
        if targets:
            add_lora(block, targets, options.lora_rank, options.lora_alpha)
            lora_blocks.append(name)
    return lora_blocks


def _harvest(model, span: _Span, lora_blocks: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trained surrogate weights and LoRA factors; then LoRA is merged and dtypes and gradient flags restored."""
    trained = {n: {s: {"weight": l.weight.detach().cpu().clone(), "bias": l.bias.detach().cpu().clone()}
                   for s, l in model.get_submodule(n).linears.items()} for n in span.surrogates}
    lora = {name: lora_factors(model.get_submodule(name)) for name in lora_blocks}
    for name in lora_blocks:
        merge_lora(model.get_submodule(name))
    for name in span.surrogates:
        model.get_submodule(name).to(span.dtypes[name])
    for name in span.names:
        _reset_requires_grad(model.get_submodule(name), span.requires_grad)
    return trained, lora


def _restore(model, span: _Span) -> None:
    """Put the span back as it was before the stage: LoRA removed unmerged, dtypes, weights and gradient flags."""
    for name in span.unreplaced:
        remove_lora(model.get_submodule(name))
    for name in span.dtypes:
        model.get_submodule(name).to(span.dtypes[name])
    for name in span.names:
        module = model.get_submodule(name)
        module.load_state_dict(span.snapshot[name])
        _reset_requires_grad(module, span.requires_grad)


def _reset_requires_grad(module: nn.Module, requires_grad: dict[int, bool]) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(requires_grad.get(id(parameter), True))


def _close(stores: Stores) -> None:
    for store in stores:
        store.close()
