"""One sandwich stage: record the span, train LoRA and linear layers against the target, merge, report."""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..adapter import Adapter
from ..brll.recording import stream_pairs
from ..config import SandwichConfig
from ..discovery.resolve import set_submodule
from ..discovery.signature import forward_signature
from ..discovery.spec import Block
from ..errors import SandwichDivergedError
from ..plan import StageReport
from ..runtime import distributed
from .data import (
    ActivationStore,
    SpanSample,
    moved,
    record_block_outputs,
    record_span_inputs,
)
from .span import sandwich_span

ADAPTER_NAME = "blockprune_sandwich"


def _call(module: nn.Module, arguments: dict[str, Any], use_checkpoint: bool) -> Any:
    parameters = forward_signature(module).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        arguments = {k: v for k, v in arguments.items() if k in parameters}
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, use_reentrant=False, **arguments)
    return module(**arguments)


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


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _training_attention(device: torch.device):
    """Attention kernels for sandwich training: every one but cuDNN's, whose bf16 backward gave NaN gradients (H100)
    or failed ("mha_graph.execute", H200) on small heads in torch 2.11 + CUDA 13."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _evaluate(modules, span, inputs: ActivationStore, targets: ActivationStore, device) -> tuple[float, float]:
    """(MSE, relative squared error) of the span against its targets, summed over every rank's batches."""
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), _autocast(device):
        for index in range(len(inputs)):
            outputs = span_forward(modules, span, moved(inputs[index], device))
            s, r, c = _errors(outputs, moved(targets[index], device))
            sums += torch.tensor([float(s), float(r), c], dtype=torch.float64)
    distributed.all_reduce_sum([sums])
    squared, reference, count = sums.tolist()
    return squared / max(count, 1), squared / reference if reference > 0 else squared


def _lora_factors(block: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    factors = {}
    for name, module in block.named_modules():
        if hasattr(module, "lora_A") and ADAPTER_NAME in getattr(module, "lora_A", {}):
            factors[name] = {
                "A": module.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                "B": (module.lora_B[ADAPTER_NAME].weight.detach().float() * module.scaling[ADAPTER_NAME]).cpu().clone(),
            }
    return factors


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
) -> tuple[StageReport, dict[str, Any], dict[str, Any]]:
    """Train the sandwich around ``new_block`` (already replaced) and merge the result into ``model``.

    ``originals`` holds CPU copies of the unpruned blocks that earlier stages changed; this stage adds the
    ones it changes. Activations past the budget spill to ``spill_folder`` (default: a temporary folder);
    LoRA initialisation and batch order draw only on ``seed``. Returns the report, the trained surrogate weights and the LoRA factors. On a NaN or
    Inf loss the span's weights from before the stage are restored and :class:`SandwichDivergedError` names
    the block. With ``offload`` (an :class:`blockprune.runtime.offload.Offload`) only the span stays on the accelerator.
    """
    if offload is None:
        return _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals,
                          options, seed, spill_folder, keep_spilled)
    names = [b.name for b in blocks]
    with offload.pinned(sandwich_span(names, replaced, names.index(new_block), options.width)):
        return _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals,
                          options, seed, spill_folder, keep_spilled)


def _train_stage(model, adapter, blocks, replaced, new_block, train_batches, held_batches, originals, options, seed,
               spill_folder, keep_spilled):
    started = time.perf_counter()
    names = [b.name for b in blocks]
    span_names = sandwich_span(names, replaced, names.index(new_block), options.width)
    by_name = {b.name: b for b in blocks}
    span = [by_name[n] for n in span_names]
    modules = [model.get_submodule(n) for n in span_names]
    device = next(model.parameters()).device
    lora_blocks = [n for n in span_names if n not in replaced]
    surrogates = [n for n in span_names if n in replaced]
    for name, module in zip(span_names, modules):
        if name not in originals:
            originals[name] = copy.deepcopy(module).to("cpu")
    snapshot = {n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for n, m in zip(span_names, modules)}
    requires_grad = {id(p): p.requires_grad for m in modules for p in m.parameters()}

    budget = options.activation_budget
    total_train = len(train_batches)
    train_batches, held_batches = distributed.shard(train_batches), distributed.shard(held_batches)
    train_inputs = record_span_inputs(model, span, train_batches, budget, spill_folder)
    held_inputs = record_span_inputs(model, span, held_batches, budget, spill_folder)
    train_targets, held_targets = _targets(model, span, span_names, originals, train_batches, held_batches,
                                           train_inputs, held_inputs, options, device, spill_folder)
    stores = (train_inputs, held_inputs, train_targets, held_targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_before, error_before = _evaluate(modules, span, held_inputs, held_targets, device)

    dtypes = {n: next(model.get_submodule(n).parameters()).dtype for n in surrogates}
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    rng.__enter__()
    torch.manual_seed(seed)
    lora_models = []
    for module in modules:
        module.requires_grad_(False)
    for name in surrogates:
        model.get_submodule(name).float().requires_grad_(options.train_surrogates)
    for name in lora_blocks:
        targets = list(options.lora_targets or adapter.lora_targets(model.get_submodule(name)))
        if targets:
            config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, target_modules=targets, lora_dropout=0.0)
            lora_models.append((name, LoraModel(model.get_submodule(name), config, ADAPTER_NAME)))
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    try:
        train_started = time.perf_counter()
        if trainable:
            _train(modules, span, train_inputs, train_targets, total_train, trainable, options, device, seed, new_block)
    except SandwichDivergedError:
        _restore(model, span_names, snapshot, lora_models, dtypes, requires_grad)
        for store in stores:
            store.close()
        raise
    finally:
        rng.__exit__(None, None, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_started
    loss_after, error_after = _evaluate(modules, span, held_inputs, held_targets, device)
    trained = {n: {s: {"weight": l.weight.detach().cpu().clone(), "bias": l.bias.detach().cpu().clone()}
                   for s, l in model.get_submodule(n).linears.items()} for n in surrogates}
    lora = {name: _lora_factors(model.get_submodule(name)) for name, _ in lora_models}
    for name, lora_model in lora_models:
        set_submodule(model, name, lora_model.merge_and_unload())
    for name in surrogates:
        model.get_submodule(name).to(dtypes[name])
    for module in (model.get_submodule(n) for n in span_names):
        for parameter in module.parameters():
            parameter.requires_grad_(requires_grad.get(id(parameter), True))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    spilled = sum(store.spilled for store in stores)
    if not (keep_spilled and spill_folder is not None):
        for store in stores:
            store.close()
    report = StageReport(new_block, span_names, [n for n, _ in lora_models], surrogates if options.train_surrogates else [], options.steps, loss_before,
                         loss_after, error_before, error_after, time.perf_counter() - started, peak, spilled,
                         train_seconds)
    return report, trained, lora


def _targets(model, span, span_names, originals, train_batches, held_batches, train_inputs, held_inputs, options, device,
             spill_folder):
    if options.target == "global":
        current = {n: model.get_submodule(n) for n in originals}
        for name, original in originals.items():
            set_submodule(model, name, copy.deepcopy(original).to(device))
        try:
            return (record_block_outputs(model, span[-1], train_batches, options.activation_budget, spill_folder),
                    record_block_outputs(model, span[-1], held_batches, options.activation_budget, spill_folder))
        finally:
            for name, module in current.items():
                set_submodule(model, name, module)
    unpruned = [copy.deepcopy(originals[n]).to(device) if n in originals else model.get_submodule(n) for n in span_names]
    results = []
    for inputs in (train_inputs, held_inputs):
        store = ActivationStore(options.activation_budget, spill_folder)
        with torch.no_grad(), _autocast(device):
            for index in range(len(inputs)):
                store.append(span_forward(unpruned, span, moved(inputs[index], device)))
        results.append(store)
    return tuple(results)


def _train(modules, span, inputs, targets, total, trainable, options, device, seed, block_name) -> None:
    """AdamW on MSE. Each step takes ``batch_size`` batches from a seeded permutation of all ``total`` training
    batches; under a launcher each rank runs the ones it recorded (every ``world_size``-th) and gradients are
    summed over ranks, which is the single-process accumulation up to float rounding."""
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    world, rank = distributed.world_size(), distributed.rank() if distributed.active() else 0
    order: list[int] = []
    for step in range(options.steps):
        optimizer.zero_grad(set_to_none=False)
        for parameter in trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        finite = torch.ones(1, dtype=torch.float64)
        for _ in range(options.batch_size):
            if not order:
                order = torch.randperm(total, generator=generator).tolist()
            index = order.pop()
            if index % world != rank:
                continue
            with torch.enable_grad(), _autocast(device), _training_attention(device):
                outputs = span_forward(modules, span, moved(inputs[index // world], device), options.gradient_checkpointing)
                squared, _, count = _errors(outputs, moved(targets[index // world], device))
                loss = squared / count
            if not torch.isfinite(loss):
                finite.zero_()
                break
            (loss / options.batch_size).backward()
        distributed.all_reduce_sum([finite, *[p.grad for p in trainable]])
        if finite.item() < world:
            raise SandwichDivergedError(
                f"sandwich training of block {block_name} diverged (NaN or Inf loss at step {step}); the stage "
                f"was rolled back: lower sandwich_lr (now {options.lr}) or check the calibration data"
            )
        optimizer.step()


def _restore(model, span_names, snapshot, lora_models, dtypes, requires_grad) -> None:
    for name, lora_model in lora_models:
        set_submodule(model, name, lora_model.unload())
    for name in dtypes:
        model.get_submodule(name).to(dtypes[name])
    for name in span_names:
        module = model.get_submodule(name)
        module.load_state_dict(snapshot[name])
        for parameter in module.parameters():
            parameter.requires_grad_(requires_grad.get(id(parameter), True))
