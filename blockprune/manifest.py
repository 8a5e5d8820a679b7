"""Reading a saved folder safely: ``blockprune.json``, the weight files it lists, and the model class it names.

Nothing here imports a module or unpickles data that a file names: the class comes from diffusers' own
exports, weights from safetensors files inside the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import BlockpruneError

FORMAT_VERSION = 1
FUSED_FORMAT_VERSION = 2  # written for fused models, whose surrogates may hold maps for only some streams
READABLE_VERSIONS = (FORMAT_VERSION, FUSED_FORMAT_VERSION)
MANIFEST = "blockprune.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_REQUIRED = {"model_class": str, "dtype": str, "replaced": list, "plan": dict}
_REQUIRED_IN_ENTRY = {"name": str, "kind": str, "spec": dict, "streams": dict}


def damaged(path: Path, what: str) -> BlockpruneError:
    return BlockpruneError(
        f"{path} {what}; the folder is damaged, save the model again with blockprune.save_pretrained"
    )

def _check_keys(data: Any, required: dict[str, type], path: Path, where: str) -> None:
    if not isinstance(data, dict):
        raise damaged(path, f"holds a {type(data).__name__} {where}, not an object")
    for key, kind in required.items():
        if key not in data:
            raise damaged(path, f"lacks the key {key!r} {where}")
        if not isinstance(data[key], kind):
            raise damaged(path, f"has a {type(data[key]).__name__} for {key!r} {where}, not a {kind.__name__}")

def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise BlockpruneError(f"{directory} is not a folder; pass the folder written by blockprune.save_pretrained")
    path = directory / MANIFEST
    if not path.is_file():
        raise BlockpruneError(f"{directory} was not written by blockprune.save_pretrained: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BlockpruneError(f"{path} is not valid JSON ({error}); the folder is damaged") from error
    if isinstance(manifest, dict) and manifest.get("contents") == "pipeline":
        raise BlockpruneError(
            f"{directory} holds a whole pipeline saved by blockprune; load it with blockprune.from_pretrained, or pass "
            f"its transformer folder, {directory / 'transformer'}"
        )
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        raise BlockpruneError(
            f"{path} has format version {version}; this blockprune reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    _check_keys(manifest, _REQUIRED, path, "at the top level")
    for number, entry in enumerate(manifest["replaced"]):
        _check_keys(entry, _REQUIRED_IN_ENTRY, path, f"in replaced block {number}")
    return manifest

def saved_dtype(manifest: dict[str, Any], directory: Path) -> torch.dtype:
    """The dtype ``blockprune.json`` records (looked up among torch's dtypes, nothing else)."""
    dtype = getattr(torch, manifest["dtype"], None) if manifest["dtype"].isidentifier() else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise damaged(directory / MANIFEST, f"names dtype {manifest['dtype']!r}, which is not a torch floating dtype")
    return dtype

def weight_file(directory: Path, filename: Any) -> Path:
    """``directory / filename`` for a weight file the index names, refused when it lies outside ``directory``."""
    if not isinstance(filename, str) or not filename:
        raise damaged(directory / INDEX, f"names the weight file {filename!r}, which is not a file name")
    normalized = os.path.normpath(filename)
    if os.path.isabs(filename) or normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
        raise BlockpruneError(
            f"{directory / INDEX} names the weight file {filename!r}, which lies outside {directory}; blockprune "
            f"reads weights only from the folder itself, so the index was edited or the folder is damaged: save the "
            f"model again"
        )
    return directory / normalized

def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise damaged(index, f"is not a valid index ({type(error).__name__}: {error})") from error
        if not isinstance(weight_map, dict):
            raise damaged(index, "has a weight_map that is not an object")
        files = sorted({weight_file(directory, name) for name in weight_map.values()})
    else:
        files = [directory / WEIGHTS]
    state = {}
    for path in files:
        if not path.is_file():
            name = path.relative_to(directory)
            raise BlockpruneError(f"{directory} lacks {name}; the folder is incomplete, save the model again")
        try:
            state.update(load_file(path))
        except Exception as error:  # safetensors raises its own error type for a damaged file
            raise damaged(path, f"is not a readable safetensors file ({error})") from error
    return state

def model_class(name: Any) -> type:
    """The diffusers model class ``name`` (``diffusers.<module>:<Class>``, as written by :func:`save_pretrained`)
    names, found among diffusers' top-level exports; no module named in the file is imported."""
    import diffusers

    def refused(why: str) -> BlockpruneError:
        return BlockpruneError(
            f"{MANIFEST} names the model class {name!r}, {why}; blockprune loads only diffusers model classes "
            f"(diffusers.ModelMixin subclasses that the diffusers package exports) and imports no module a saved "
            f"file names: save the model again with blockprune.save_pretrained"
        )

    if not isinstance(name, str):
        raise refused("which is not a string")
    module_name, _, class_name = name.partition(":")
    if module_name != "diffusers" and not module_name.startswith("diffusers."):
        raise refused(f"whose module {module_name!r} is not part of diffusers")
    if not class_name.isidentifier():
        raise refused(f"in which {class_name!r} is not a class name")
    try:
        cls = getattr(diffusers, class_name)
    except (AttributeError, ImportError, RuntimeError) as error:
        raise refused(f"which diffusers {diffusers.__version__} does not export ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)
            and issubclass(cls, diffusers.ConfigMixin)):
        raise refused("which is not a diffusers model class (a subclass of diffusers.ModelMixin with a config)")
    return cls

def load_config(cls: type, directory: Path) -> dict[str, Any]:
    """The model's ``config.json``, without the marker that stops diffusers' own loaders."""
    from .native import unmark_config

    try:
        return unmark_config(cls.load_config(directory))
    except (OSError, ValueError) as error:  # diffusers: EnvironmentError for a missing or unparsable config.json
        problem = f"could not be read as the {cls.__name__} config ({error})"
        raise damaged(directory / "config.json", problem) from error
