"""Global healing: after the last replacement, the whole compressed model trained to the unpruned model's output.

Beyond the paper (PPCL and TinyFusion heal a variant). LoRA goes on every kept block (or, with
``heal_kept="full"``, every weight of them trains) and the surrogates train in full, against the unpruned
model's final output.
The held-out batches guard it (:mod:`blockprune.sandwich.guard`), so healing never ends worse than it began
by that check: for rectified-flow models the latents of a short trajectory from noise (as
``importance="auto"`` checks plans; one-step outputs improved while sampled images got worse), otherwise
the one-step outputs. The error is each sample's relative error, geometric mean over samples (as ``auto``
ranks plans, and as a mean PSNR in dB weighs samples). The best weights seen then cool down (two check intervals
at a rate falling from theirs to zero, :data:`~blockprune.sandwich.guard.COOLDOWN_CHECKS`), and are replaced by
what that reaches when the check is lower still. The best weights are chosen on that check, so their
figure flatters them; they are kept only when they beat the start on each half of it and, confirmed on fresh
noise (twice the check's trajectories, from seeds it never draws), lower the samples' log error by more than its
noise. LoRA is merged afterwards, so inference costs nothing extra.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..config import SandwichConfig
from ..runtime import distributed
from ..runtime.forward import forward_batch, model_device, output_tensor, to_device
from ..runtime.offload import Offload
from ..scoring.guidance import Guidance
from .blockwise import blockwise_backward, checkpointed_blocks
from .guard import COOLDOWN_CHECKS, LR_GRID, guarded_training
from .heal_check import HeldCheck, HeldReference, fresh_check, guard_check
from .lora import add_lora, merge_lora, remove_lora
from .training import autocast, guard_settings, training_attention


@dataclass
class HealReport:
    """What healing did: steps, the held-out check's error before and after (each sample's relative error, geometric
    mean over samples), the rate, the kept step."""

    steps: int
    steps_run: int
    best_step: int
    relative_error_before: float
    relative_error_after: float
    lr: float | None  # the peak rate the kept weights trained at; None when healing was reverted
    halves_before: list[float] = field(default_factory=list)  # the check's error on each of its halves, at the start
    halves_after: list[float] = field(default_factory=list)  # and with the best healed weights (before a refusal)
    refused: bool = False  # the best healed weights won in sum but not on both halves or not on fresh noise: start kept
    lr_errors: dict[str, float] = field(default_factory=dict)
    checked_on: str = "outputs"  # the guard's check: "trajectory" (rectified flow) or one-step "outputs"
    lora_blocks: list[str] = field(default_factory=list)
    surrogates: list[str] = field(default_factory=list)
    seconds: float = 0.0
    guidance_scale: float = 1.0  # the guard's trajectory was guided with this scale (1: unguided)
    kept: str = "lora"  # how the kept blocks trained: "lora" or "full"
    fresh_error_before: float = 0.0  # the confirmation on fresh noise: the start's error
    fresh_error_after: float = 0.0  # and the best healed weights' (0 when training never beat the start)
    fresh_z: float = 0.0  # their signed-rank z there against the start (confirmed below -1.645; 0: not asked)
    cooled: bool = False  # the weights kept are those the cool-down from the best reached

    @property
    def reverted(self) -> bool:
        """Whether healing never beat the compressed model it started from, which was therefore kept."""
        return self.best_step == 0


# lr="auto" with heal_kept="full": a tenth of LoRA's grid. AdamW moves each trained weight by about the rate per
# step; a LoRA update starts at zero and is a rank-r product, a full weight is the trained model's own
FULL_LR_GRID = (1e-5, 3e-5, 1e-4)


def reference_outputs(model: nn.Module, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The model's output on each batch, on the CPU: the unpruned targets of healing."""
    return [output_tensor(forward_batch(model, batch, index)).detach().cpu() for index, batch in enumerate(batches)]


def heal(model: nn.Module, adapter: Adapter, kept: list[str], surrogates: list[str], train: list[dict],
         train_targets: list[torch.Tensor], held: list[dict], held_reference: HeldReference,
         options: SandwichConfig, seed: int, offload: Offload | None = None,
         guidance: Guidance | None = None) -> HealReport:
    """Train LoRA on the ``kept`` blocks (every weight with ``heal_kept="full"``) and the ``surrogates`` in full
    to ``train_targets``, guarded by :func:`guard_check` against ``held_reference`` (:func:`reference_check` of
    the unpruned model); merge; report.

    Under ``offload`` the backward runs one resident block at a time (:mod:`blockprune.sandwich.blockwise`).
    On any error the model is put back as it was before healing.
    """
    started = time.perf_counter()
    device = model_device(model)
    modules = {name: model.get_submodule(name) for name in kept + surrogates}
    full = kept if options.heal_kept == "full" else []
    before = _Before(model, {name: modules[name] for name in surrogates + full})
    world, rank = distributed.world_size(), distributed.rank() if distributed.active() else 0
    kind, measure = guard_check(model, adapter, held, guidance)
    check = HeldCheck(measure, fresh_check(model, adapter, held, guidance), held_reference, device)

    def step_loss(index: int) -> torch.Tensor | None:
        if index % world != rank:
            return None
        with torch.enable_grad(), autocast(device), training_attention(device):
            got = output_tensor(model(**to_device(train[index], device))).float()
            return ((got - train_targets[index].to(device).float()) ** 2).mean()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            model.requires_grad_(False)
            lora_blocks = _make_trainable(modules, adapter, kept, surrogates, options)
            trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
            settings = guard_settings(options, steps=options.heal_steps, grid=FULL_LR_GRID if full else LR_GRID,
                                      cooldown_checks=COOLDOWN_CHECKS)
            with _backward_memory(offload, trainable, list(modules.values()), options, device), \
                    _float32_calls({modules[name]: before.dtypes[name] for name in full}):
                check.measure_fresh_start()
                result = guarded_training(trainable, step_loss, check.error, len(train), settings, seed,
                                          "global healing", accept=check.accepts)
        except BaseException:
            for name in [] if full else kept:
                remove_lora(modules[name])
            before.put_back()
            raise
    for name in lora_blocks:
        merge_lora(modules[name])
    before.cast_back()
    return HealReport(options.heal_steps, result.steps_run, result.best_step, result.error_before, result.error_after,
                      result.lr, check.halves_before, check.halves_after, result.refused, result.lr_errors,
                      kind, lora_blocks, list(surrogates) if options.train_surrogates else [],
                      time.perf_counter() - started, guidance.scale if guidance and kind == "trajectory" else 1.0,
                      options.heal_kept, check.fresh_error(check.fresh_before), check.fresh_error(check.fresh_after),
                      check.fresh_z(), result.cooled)


class _Before:
    """What healing changes, as it was: the weights and dtypes of the modules trained in full (cast to float32 for
    it) and every parameter's ``requires_grad``."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model, self.modules = model, modules
        self.weights = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
        self.tensor_dtypes = {name: {k: t.dtype for k, t in _tensors(m)} for name, m in modules.items()}
        self.dtypes = {name: next(m.parameters()).dtype for name, m in modules.items()}
        self.requires_grad = {id(p): p.requires_grad for p in model.parameters()}

    def cast_back(self) -> None:
        """Each tensor back to its dtype (a float32 norm inside a bf16 block stays float32), gradients as before."""
        for name, module in self.modules.items():
            for key, tensor in _tensors(module):
                tensor.data = tensor.data.to(self.tensor_dtypes[name][key])
        for parameter in self.model.parameters():
            parameter.requires_grad_(self.requires_grad.get(id(parameter), True))

    def put_back(self) -> None:
        """The weights as they were, then :meth:`cast_back`."""
        for name, module in self.modules.items():
            module.load_state_dict(self.weights[name])
        self.cast_back()


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _backward_memory(offload: Offload | None, trainable: list[torch.Tensor], blocks: list[nn.Module],
                     options: SandwichConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """How the backward fits: one resident block at a time under offload, else each block recomputed with
    ``gradient_checkpointing``, else the whole graph kept."""
    if offload is not None:
        return blockwise_backward(offload, trainable)
    if options.gradient_checkpointing:
        return checkpointed_blocks(blocks, device)
    return contextlib.nullcontext()


def _make_trainable(modules: dict[str, nn.Module], adapter: Adapter, kept: list[str], surrogates: list[str],
                    options: SandwichConfig) -> list[str]:
    """Surrogates in float32 (trainable unless ``train_surrogates`` is off) and LoRA on the kept blocks, or with
    ``heal_kept="full"`` the kept blocks in float32, every weight trainable; returns the blocks that got LoRA."""
    for name in surrogates:
        modules[name].float().requires_grad_(options.train_surrogates)
    if options.heal_kept == "full":
        for name in kept:
            modules[name].float().requires_grad_(True)
        return []
    lora_blocks = []
    for name in kept:
        targets = list(options.lora_targets or adapter.lora_targets(modules[name]))
        if targets:
            add_lora(modules[name], targets, options.lora_rank, options.lora_alpha)
            lora_blocks.append(name)
    return lora_blocks


@contextlib.contextmanager
def _float32_calls(blocks: dict[nn.Module, torch.dtype]) -> Iterator[None]:
    """Each block, trained in float32, takes float32 inputs and returns its own dtype's outputs (as autocast does on
    CUDA, but not on the CPU), so that the blocks around it see what they saw before."""
    handles = []
    for block, dtype in blocks.items():
        if dtype != torch.float32:
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs: _cast((args, kwargs), torch.float32), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, args, output, dtype=dtype: _cast(output, dtype)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value``'s floating tensors (inside tuples, lists and dicts too) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
