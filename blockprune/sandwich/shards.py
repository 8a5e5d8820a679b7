"""Activation shards: a recorded item written to safetensors with its structure as JSON metadata, and read back
without running any code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BlockpruneError


@dataclass
class SpanSample:
    """One calibration batch at the span: the first block's arguments and every later block's context."""

    inputs: dict[str, Any]
    contexts: list[dict[str, Any]]


STRUCTURE_KEY = "blockprune.activation"  # safetensors metadata entry: the item's structure, as JSON
SHARD_SUFFIX = ".safetensors"
_SCALARS = (type(None), bool, int, float, str)


def _encode(value: Any, tensors: list[torch.Tensor], seen: dict[int, int], where: str) -> Any:
    """``value`` as JSON: each tensor replaced by its index in ``tensors`` (a tensor found twice is stored once),
    plain values kept, containers tagged with their type. Refuses anything else, naming where it sits."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = len(tensors)
            tensors.append(torch.view_as_real(value.resolve_conj()) if value.is_complex() else value)
        return {"complex" if value.is_complex() else "tensor": seen[id(value)]}
    if isinstance(value, _SCALARS):
        return {"value": value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, SpanSample):
        return {"span_sample": [_encode(value.inputs, tensors, seen, f"{where}.inputs"),
                                _encode(value.contexts, tensors, seen, f"{where}.contexts")]}
    if isinstance(value, Mapping):
        pairs = []
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                raise BlockpruneError(
                    f"cannot spill the recorded activations to disk: {where} has a key of type "
                    f"{type(key).__qualname__} (only str, int, float, bool and None keys are stored); raise "
                    f"sandwich_activation_budget so that they stay in memory"
                )
            pairs.append([key, _encode(item, tensors, seen, f"{where}[{key!r}]")])
        return {"dict": pairs}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, seen, f"{where}[{i}]") for i, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise BlockpruneError(
        f"cannot spill the recorded activations to disk: {where} is a {type(value).__module__}."
        f"{type(value).__qualname__}, and shards store only tensors, None, bool, int, float, str, torch dtypes and "
        f"devices, in dicts, lists and tuples (no Python object is serialized); raise sandwich_activation_budget so "
        f"that they stay in memory"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`; ``KeyError``/``TypeError``/``ValueError`` on a malformed structure."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {str(node)[:80]}")
    ((tag, content),) = node.items()
    if tag == "tensor":
        return tensors[str(content)]
    if tag == "complex":  # stored as its real view, (..., 2) floats
        return torch.view_as_complex(tensors[str(content)])
    if tag == "value":
        if not isinstance(content, _SCALARS):
            raise ValueError(f"unexpected value {str(content)[:80]}")
        return content
    if tag == "dtype":
        dtype = getattr(torch, content)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{content} is not a torch dtype")
        return dtype
    if tag == "device":
        return torch.device(content)
    if tag == "span_sample":
        inputs, contexts = (_decode(part, tensors) for part in content)
        return SpanSample(inputs, contexts)
    if tag == "dict":
        return {key: _decode(item, tensors) for key, item in content}
    if tag in ("list", "tuple"):
        items = [_decode(item, tensors) for item in content]
        return tuple(items) if tag == "tuple" else items
    raise ValueError(f"unknown tag {tag!r}")


def _storable(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors takes them: dense, contiguous, none sharing memory with another."""
    result, storages = {}, set()
    for index, tensor in enumerate(tensors):
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.detach().contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage[1] != 0 and storage in storages:  # views of one buffer (rotary cos/sin, say): stored apart
            tensor = tensor.clone()
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
        storages.add(storage)
        result[str(index)] = tensor
    return result


def write_shard(item: Any, path: Path) -> None:
    """Write ``item`` (tensors, plain values, and dicts, lists, tuples and :class:`SpanSample` of them) to ``path``
    as safetensors, its structure as JSON in the metadata. Other values raise :class:`BlockpruneError`; no Python
    object is serialized."""
    tensors: list[torch.Tensor] = []
    structure = _encode(item, tensors, {}, "the item")
    try:
        save_file(_storable(tensors), path, metadata={STRUCTURE_KEY: json.dumps(structure)})
    except (ValueError, RuntimeError, KeyError, TypeError) as error:  # a dtype safetensors cannot store, say
        raise BlockpruneError(
            f"cannot spill the recorded activations to {path} as safetensors ({error}); raise "
            f"sandwich_activation_budget so that they stay in memory"
        ) from error


def read_shard(path: Path) -> Any:
    """The item written by :func:`write_shard` to ``path``; only safetensors and JSON are read, no code runs."""
    problem = (f"activation shard {path} is not a blockprune safetensors shard, or is damaged; delete {path.parent} "
               f"and run again")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()
            tensors = {key: handle.get_tensor(key) for key in names}
    except Exception as error:  # safetensors raises its own error type for a file that is not safetensors
        raise BlockpruneError(f"{problem} ({error})") from error
    if STRUCTURE_KEY not in metadata:
        raise BlockpruneError(f"{problem} (it has no {STRUCTURE_KEY} entry)")
    try:
        return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BlockpruneError(f"{problem} ({type(error).__name__}: {error})") from error
