"""LoRA on a sandwich's unreplaced neighbour blocks, through peft's public API: add, read, merge, remove."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ADAPTER_NAME = "blockprune_sandwich"


def add_lora(block: nn.Module, targets: Iterable[str], rank: int, alpha: float) -> nn.Module:
    """Wrap ``block``'s ``targets`` submodules in place in LoRA layers of rank ``rank`` (scaling ``alpha / rank``,
    no dropout); only the new LoRA factors require gradients afterwards, in float32 whatever the block's dtype
    (AdamW's state underflows in fp16). Returns ``block``."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    inject_adapter_in_model(config, block, adapter_name=ADAPTER_NAME)
    for parameter in block.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return block


def lora_factors(block: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The trained factors of every LoRA layer :func:`add_lora` put in ``block``, as float32 CPU copies keyed by
    module name: ``A`` and ``B`` with the scaling folded in, so that the layer's weight delta is ``B @ A``."""
    config = block.peft_config[ADAPTER_NAME]
    scaling = config.lora_alpha / config.r
    state = get_peft_model_state_dict(block, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    suffix = ".lora_A.weight"
    factors = {}
    for key, down in state.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            up = state[f"{name}.lora_B.weight"]
            factors[name] = {
                "A": down.detach().float().cpu().clone(),
                "B": (up.detach().float() * scaling).cpu().clone(),
            }
    return factors


def _lora_layers(block: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """The outermost peft layers in ``block`` that carry this package's adapter."""
    layers: list[tuple[str, BaseTunerLayer]] = []
    for name, module in block.named_modules():
        if (isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.active_adapters
                and not any(name.startswith(f"{outer}.") for outer, _ in layers)):
            layers.append((name, module))
    return layers


def _unwrap(block: nn.Module, merge: bool) -> None:
    for name, layer in _lora_layers(block):
        if merge:
            layer.merge(adapter_names=[ADAPTER_NAME])
        block.set_submodule(name, layer.get_base_layer())
    if hasattr(block, "peft_config"):
        del block.peft_config  # set by inject_adapter_in_model; no peft layer is left


def merge_lora(block: nn.Module) -> None:
    """Add each LoRA layer's delta to its base layer's weight and put the base layer back in its place."""
    _unwrap(block, merge=True)


def remove_lora(block: nn.Module) -> None:
    """Put each LoRA layer's base layer back in its place, dropping the LoRA factors unmerged."""
    _unwrap(block, merge=False)
