"""What the commands read and write: a model (a folder or a small model's name), calibration, output folders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import plugins
from ..errors import BlockpruneError
from ..serialization import MANIFEST
from ..toy.small_models import SMALL_MODELS, SmallModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BlockpruneError(f"cannot read {path}: {error}") from error


def load_folder(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """A model from a folder written by ``save_pretrained``: blockprune's (``blockprune.json``), or diffusers'
    of a pipeline (``model_index.json``) or of a model (``config.json``), built with the class named there."""
    if (folder / MANIFEST).is_file():
        from ..serialization import from_pretrained

        return from_pretrained(folder, torch_dtype=dtype)
    for filename in ("model_index.json", "config.json"):
        if (folder / filename).is_file():
            class_name = _read_json(folder / filename).get("_class_name")
            break
    else:
        raise BlockpruneError(
            f"{folder} has no model_index.json, config.json or {MANIFEST}; pass a folder written by a diffusers "
            f"pipeline's or model's save_pretrained, or by blockprune.save_pretrained"
        )
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise BlockpruneError(f"{folder / filename} names class {class_name!r}, which diffusers does not provide")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = cls.from_pretrained(folder, **kwargs)
    if hasattr(model, "set_progress_bar_config"):
        model.set_progress_bar_config(disable=True)  # blockprune shows its own progress
    return model


@dataclass
class ModelSource:
    """A model named on the command line: a folder, or one of the project's small models."""

    text: str
    folder: Path | None = None
    small: SmallModel | None = None

    def load(self, dtype: torch.dtype | None = None) -> Any:
        """The transformer or pipeline, in ``dtype`` where given."""
        if self.small is not None:
            model = self.small.build()
            return model if dtype is None else model.to(dtype=dtype)  # a ToyPipeline's first argument is the device
        return load_folder(self.folder, dtype)


def model_source(text: str) -> ModelSource:
    """Resolve a folder or small-model name without loading anything; a missing one is an error."""
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(text, folder=path)
    if path.exists():
        raise BlockpruneError(f"{text} is a file; pass a model folder (written by save_pretrained) or a small model name")
    if text in SMALL_MODELS:
        return ModelSource(text, small=SMALL_MODELS[text])
    known = ", ".join(sorted(SMALL_MODELS))
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        raise BlockpruneError(f"model folder {text} does not exist; pass a folder written by save_pretrained, or a "
                              f"small model name ({known})")
    raise BlockpruneError(f"unknown small model {text!r} (and no folder of that name); known small models: {known}")


def is_pipeline(model: Any) -> bool:
    """Whether ``model`` is a pipeline holding a transformer rather than the transformer itself."""
    return not isinstance(model, nn.Module)


def check_adapter_name(name: str) -> str:
    """``name`` if it is ``auto`` or a registered adapter; otherwise an error listing the known ones."""
    known = plugins.adapters()
    if name != "auto" and name not in known:
        raise BlockpruneError(f"unknown adapter {name!r}; known adapters: auto, {', '.join(sorted(known))}")
    return name


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """An output file; one that exists is refused unless ``overwrite``, and a folder is refused."""
    file = Path(path)
    if file.is_dir():
        raise BlockpruneError(f"output {file} is a folder; pass a file name, e.g. {file / 'calibration.safetensors'}")
    if file.exists() and not overwrite:
        raise BlockpruneError(f"output file {file} exists; pass --overwrite to replace it, or choose another name")
    return file


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder; one that exists and is not empty is refused unless ``overwrite``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise BlockpruneError(f"output {folder} is a file; pass a folder to save the model to")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise BlockpruneError(
            f"output folder {folder} exists and is not empty; pass --overwrite to write into it, or choose another folder"
        )
    return folder
