"""Short, stable digests of models and calibration data, for cache keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _update_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Hash ``tensor``'s shape, dtype and every byte of its values (any dtype: the raw bytes, not a cast)."""
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    if tensor.numel() == 0:
        return
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest.update(memoryview(raw.numpy()))


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's class, config, and every byte of every parameter and buffer."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        public = {k: v for k, v in config.items() if not k.startswith("_")}  # "_use_default_values" is unordered
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _update_tensor(digest, tensor)
    return digest.hexdigest()[:32]


def _update_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        _update_tensor(digest, value)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _update_value(digest, item)
    else:
        digest.update(repr(value).encode())


def data_fingerprint(batches: list[Mapping[str, Any]]) -> str:
    """A digest of every value in the calibration batches (tensors byte for byte)."""
    digest = hashlib.sha256()
    for batch in batches:
        _update_value(digest, batch)
    return digest.hexdigest()[:32]


def value_fingerprint(value: Any) -> str:
    """A digest of a metric setting: modules by their weights, functions by qualified name, objects by repr."""
    if isinstance(value, nn.Module):
        return f"{type(value).__qualname__}:{model_fingerprint(value)}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value):
        return f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"
    digest = hashlib.sha256()
    _update_value(digest, value)
    return digest.hexdigest()[:32]
