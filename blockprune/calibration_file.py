"""Calibration files: batches of forward keyword arguments as safetensors, their structure as JSON in its header.

A file holds one tensor per tensor of every batch, named ``"{batch}/{key}"`` (``"{batch}/{key}/{inner key}"``
inside a dict), and under the metadata key ``blockprune.calibration`` a JSON document: the format version,
each batch's structure (tensors by name; ``None``, booleans, numbers and strings as values; dicts, lists and
tuples of them) and ``info`` (how the batches were recorded: pipeline, prompts, steps, size, dtype). Reading
one runs no code: no pickle is involved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .calibration import prepare_calibration
from .errors import BlockpruneError
from .runtime.atomic import save_safetensors

METADATA_KEY = "blockprune.calibration"
FORMAT = 1
_SCALARS = (type(None), bool, int, float, str)
_WHAT = "tensors, None, bool, int, float and str, in dicts (str keys), lists and tuples"


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor], storages: set, dtype: torch.dtype | None) -> Any:
    """``value`` as JSON, each tensor stored in ``tensors`` under ``name`` (floating ones cast to ``dtype`` where
    given); anything else is an error."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        tag = "complex" if tensor.is_complex() else "tensor"
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = (torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor).contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # views of one buffer (shared positions, say): safetensors stores them apart
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        if name in tensors:  # a key holding "/" met a nested one of the same path
            raise BlockpruneError(f"calibration {name} names two tensors; rename a key so that no key holds '/'")
        tensors[name] = tensor
        return {tag: name}
    if isinstance(value, _SCALARS):
        return {"value": value}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise BlockpruneError(f"calibration {name} has a key of type {type(key).__name__}; a calibration file "
                                      f"holds {_WHAT}")
        return {"dict": {key: _encode(item, f"{name}/{key}", tensors, storages, dtype) for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{name}/{index}", tensors, storages, dtype) for index, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise BlockpruneError(f"calibration {name} is a {type(value).__module__}.{type(value).__qualname__}; a calibration "
                          f"file holds {_WHAT}")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> Any:
    """The inverse of :func:`_encode` (floating tensors cast to ``dtype`` where given); ``ValueError``,
    ``KeyError`` or ``TypeError`` on a malformed structure."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {str(node)[:80]}")
    ((tag, content),) = node.items()
    if tag in ("tensor", "complex"):
        tensor = tensors[content]
        if tag == "complex":
            return torch.view_as_complex(tensor)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if tag == "value":
        if not isinstance(content, _SCALARS):
            raise ValueError(f"unexpected value {str(content)[:80]}")
        return content
    if tag == "dict":
        return {str(key): _decode(item, tensors, dtype) for key, item in content.items()}
    if tag in ("list", "tuple"):
        items = [_decode(item, tensors, dtype) for item in content]
        return tuple(items) if tag == "tuple" else items
    raise ValueError(f"unknown tag {tag!r}")


def save_calibration(
    batches: Any, path: str | os.PathLike, info: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write calibration ``batches`` (a list of dicts of forward keyword arguments) to ``path`` as safetensors.

    ``info`` (JSON-ready: how they were recorded) is kept in the file; ``dtype`` casts the floating tensors.
    Returns the path; :func:`load_calibration` reads it back.
    """
    batches = prepare_calibration(batches)
    tensors: dict[str, torch.Tensor] = {}
    storages: set = set()
    structure = [_encode(batch, str(index), tensors, storages, dtype) for index, batch in enumerate(batches)]
    try:
        header = json.dumps({"format": FORMAT, "blockprune": __version__, "info": dict(info or {}), "batches": structure})
    except (TypeError, ValueError) as error:
        raise BlockpruneError(f"calibration info must be JSON-ready (str, numbers, lists, dicts): {error}") from error
    path = Path(path)
    if path.parent != Path() and not path.parent.is_dir():
        raise BlockpruneError(f"cannot write calibration file {path}: folder {path.parent} does not exist")
    save_safetensors(tensors, path, metadata={METADATA_KEY: header})
    return path


def _header(path: str | os.PathLike) -> dict[str, Any]:
    """The file's JSON header; a missing, foreign or damaged file is a clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BlockpruneError(f"calibration file {path} does not exist; record one with `blockprune calibrate "
                              f"PIPELINE -o {path.name}` or blockprune.record_calibration + save_calibration")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start[:2] == b"PK" or start[:1] == b"\x80":  # a torch.save zip or a raw pickle
        raise BlockpruneError(
            f"calibration file {path} was written by torch.save (a pickle), which blockprune does not read; convert "
            f"it once in Python: blockprune.save_calibration(torch.load({str(path)!r}, weights_only=True), "
            f"'calibration.safetensors')"
        )
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise BlockpruneError(f"cannot read calibration file {path}: not a safetensors file, or damaged ({error})") from error
    if METADATA_KEY not in metadata:
        raise BlockpruneError(f"{path} is a safetensors file but not a calibration file (no {METADATA_KEY!r} entry); "
                              f"write one with blockprune.save_calibration or `blockprune calibrate`")
    try:
        header = json.loads(metadata[METADATA_KEY])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
    except (ValueError, AttributeError) as error:
        raise BlockpruneError(f"calibration file {path} is damaged ({error}); record it again") from error
    return header


def load_calibration(path: str | os.PathLike, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """The batches saved by :func:`save_calibration` (or ``blockprune calibrate``), on the CPU; ``dtype`` casts
    the floating tensors (for a model loaded in that dtype)."""
    from safetensors.torch import load_file

    header = _header(path)
    try:
        tensors = load_file(path)
        batches = [_decode(node, tensors, dtype) for node in header["batches"]]
        return prepare_calibration(batches)
    except (KeyError, TypeError, ValueError, AttributeError, OSError, BlockpruneError) as error:
        raise BlockpruneError(f"calibration file {path} is damaged ({type(error).__name__}: {error}); record it "
                              f"again") from error


def calibration_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a calibration file says about how it was recorded (``info``), with its ``batches`` count and the
    ``blockprune`` version that wrote it."""
    header = _header(path)
    return {**header.get("info", {}), "batches": len(header.get("batches", [])), "blockprune": header.get("blockprune")}
