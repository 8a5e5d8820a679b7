"""A compressed model that keeps diffusers users' habits: its own ``save_pretrained`` writes blockprune's format,
diffusers' loaders refuse that format by name, and models blockprune cannot save or compress are refused early."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BlockpruneError

# A config.json key every diffusers loader reads before any weight: an unknown quantization method makes
# ModelMixin.from_pretrained (and so DiffusionPipeline.from_pretrained) stop with this text in its error.
MARKER_KEY = "quantization_config"
MARKER = {
    "quant_method": "blockprune: this folder holds a model compressed by blockprune, whose replaced blocks have no "
    "weights here; diffusers cannot load it, load it with blockprune.from_pretrained(folder) (for a pipeline "
    "folder: blockprune.from_pretrained(pipeline_folder), or pass transformer=blockprune.from_pretrained("
    "pipeline_folder + '/transformer') to the pipeline's from_pretrained)",
    "blockprune": True,
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
_QUANTIZATION_PACKAGES = ("optimum.quanto", "bitsandbytes", "torchao", "gguf", "modelopt", "auto_round", "sdnq",
                          "torch.ao.nn.quantized", "torch.nn.quantized")


def mark_config(path: Path) -> None:
    """Add the marker that diffusers' loaders stop at to the ``config.json`` at ``path``."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config[MARKER_KEY] = MARKER
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def unmark_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without blockprune's marker (a folder saved before the marker had none)."""
    marker = config.get(MARKER_KEY)
    if isinstance(marker, dict) and marker.get("blockprune") is True:
        config = {key: value for key, value in config.items() if key != MARKER_KEY}
    return config


def shard_bytes(size: int | str | None, default: int) -> int:
    """diffusers' ``max_shard_size`` (bytes, or a string such as ``"5GB"``) in bytes."""
    if size is None:
        return default
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if match is None or match.group(2) not in _UNITS:
        raise BlockpruneError(f"max_shard_size must be a number of bytes or a size such as '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _own_save_pretrained(
    self: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    push_to_hub: bool = False,
    fuse: bool = False,
) -> None:
    """Save this compressed model in blockprune's format (:func:`blockprune.save_pretrained`), so that
    ``blockprune.from_pretrained(save_directory)`` rebuilds it; a pipeline's ``save_pretrained`` calls this too."""
    from .serialization import DEFAULT_SHARD_BYTES, save_pretrained

    if not safe_serialization or variant is not None or push_to_hub:
        raise BlockpruneError(
            "a compressed model is saved as safetensors without a variant and is not pushed to the Hub by "
            "save_pretrained; drop safe_serialization=False, variant= and push_to_hub=True, and upload the folder "
            "yourself"
        )
    if is_main_process:
        save_pretrained(self, save_directory, max_shard_bytes=shard_bytes(max_shard_size, DEFAULT_SHARD_BYTES),
                        fuse=fuse)


def attach_save_method(transformer: nn.Module) -> None:
    """Make ``transformer.save_pretrained(folder)`` (and so a pipeline's) write blockprune's format; only a diffusers
    model (one with a config) has the method to replace."""
    if hasattr(transformer, "save_config"):
        transformer.save_pretrained = types.MethodType(_own_save_pretrained, transformer)


def adapter_layers(model: nn.Module) -> list[str]:
    """Names of the peft (LoRA) layers in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def refuse_unfused_lora(model: nn.Module) -> None:
    """Refuse to compress a model that still carries peft LoRA layers: compression would drop them."""
    wrapped = adapter_layers(model)
    if wrapped:
        raise BlockpruneError(
            f"the model carries LoRA (peft) layers, e.g. {wrapped[0]}, which compression would silently drop; fuse "
            f"the LoRA into the weights and unload it first (pipe.fuse_lora(); pipe.unload_lora_weights(), or "
            f"transformer.fuse_lora(); transformer.unload_lora()), or unload it to compress without it"
        )


def refuse_unsaveable(model: nn.Module) -> None:
    """Refuse, before anything is written, a model ``from_pretrained`` could not rebuild: one with peft layers, or
    a quantized one (diffusers' quantizers, optimum-quanto, torchao, bitsandbytes)."""
    wrapped = adapter_layers(model)
    if wrapped:
        raise BlockpruneError(
            f"the model has LoRA (peft) layers, e.g. {wrapped[0]}, which from_pretrained could not rebuild; merge them "
            f"first with model.fuse_lora() and model.unload_lora(), or save the adapter apart with save_lora_adapter()"
        )
    quantized = _quantized_part(model)
    if quantized:
        raise BlockpruneError(
            f"the model is quantized ({quantized}); blockprune saves plain floating-point tensors and could not load "
            f"these back: save the compressed model before quantizing it, and quantize it again after "
            f"blockprune.from_pretrained"
        )


def _quantized_part(model: nn.Module) -> str:
    """What marks ``model`` as quantized, or ``""``."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return f"diffusers' {getattr(model, 'quantization_method', None) or 'quantizer'}"
    for name, module in model.named_modules():
        if type(module).__module__.startswith(_QUANTIZATION_PACKAGES):
            return f"{name or 'the model'} is a {type(module).__module__}.{type(module).__name__}"
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if type(tensor) not in (torch.Tensor, nn.Parameter, nn.Buffer) or not (
            tensor.is_floating_point() or tensor.dtype in (torch.bool, torch.int64, torch.int32)
        ):
            return f"{name} is a {type(tensor).__name__} of {tensor.dtype}"
    return ""
