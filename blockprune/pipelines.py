"""Saving and loading whole diffusers pipelines whose transformer is compressed.

A pipeline folder is what the pipeline's own ``save_pretrained`` writes (``model_index.json``, one folder per
component), with the transformer in blockprune's format, plus a ``blockprune.json`` naming the pipeline.
Loading builds only diffusers and transformers classes (found among those packages' exports, never imported by a
name a file gives) and reads only safetensors weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .brll.fusion import fuse as fuse_runs
from .errors import BlockpruneError
from .manifest import MANIFEST, damaged
from .native import attach_save_method, refuse_unsaveable
from .plan import plan, transformer_of
from .runtime import distributed
from .runtime.staging import staged_folder

PIPELINE_FORMAT_VERSION = 1
INDEX = "model_index.json"
TRANSFORMER = "transformer"
_LIBRARIES = ("diffusers", "transformers")


def is_diffusers_pipeline(model: Any) -> bool:
    """Whether ``model`` is a diffusers ``DiffusionPipeline``."""
    from diffusers import DiffusionPipeline

    return isinstance(model, DiffusionPipeline)


def is_pipeline_folder(directory: Path) -> bool:
    """Whether ``directory`` holds a pipeline whose transformer is saved in blockprune's format."""
    return (directory / INDEX).is_file() and (directory / TRANSFORMER / MANIFEST).is_file()


def save_pipeline(pipe: Any, directory: Path, max_shard_bytes: int, fuse: bool) -> None:
    """Write ``pipe`` with its own ``save_pretrained`` (the transformer in blockprune's format) and a pipeline
    ``blockprune.json``, all or nothing (see :func:`blockprune.save_pretrained`)."""
    transformer = transformer_of(pipe)
    compressed = plan(transformer)
    refuse_unsaveable(transformer)
    if fuse:
        fuse_runs(transformer)
    if not distributed.is_main():
        return
    if directory.exists() and not directory.is_dir():
        raise BlockpruneError(f"{directory} is a file; pass a folder to save the pipeline to")
    attach_save_method(transformer)
    with staged_folder(directory) as staging:
        pipe.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_bytes)
        if not (staging / TRANSFORMER / MANIFEST).is_file():
            raise BlockpruneError(
                f"{type(pipe).__name__}.save_pretrained did not write its transformer in blockprune's format; put the "
                f"compressed model in the pipeline's transformer slot (pipe.transformer = model)"
            )
        manifest = {"format_version": PIPELINE_FORMAT_VERSION, "contents": "pipeline",
                    "pipeline_class": type(pipe).__name__, "transformer": TRANSFORMER, "adapter": compressed.adapter,
                    "replaced": compressed.replaced_names}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _read_index(directory: Path) -> dict[str, Any]:
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(directory / INDEX, f"cannot be read ({error})") from error
    if not isinstance(index, dict):
        raise damaged(directory / INDEX, "is not a JSON object")
    return index


def _exported(library: str, name: Any, base: type | None, what: str, directory: Path) -> type:
    """The class ``name`` among ``library``'s exports (a subclass of ``base``), or a refusal naming the file."""
    import importlib

    module = importlib.import_module(library)  # one of _LIBRARIES, never a name read from the file
    found = getattr(module, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(found, type) or (base is not None and not issubclass(found, base)):
        raise BlockpruneError(
            f"{directory / INDEX} names the {what} {name!r}, which {library} does not export; blockprune loads only "
            f"diffusers and transformers classes and imports no module a saved file names: save the pipeline again "
            f"with blockprune.save_pretrained"
        )
    return found


def _pipeline_class(directory: Path, index: dict[str, Any]) -> type:
    """The pipeline class ``model_index.json`` names, after checking every component's library and class."""
    from diffusers import DiffusionPipeline

    cls = _exported("diffusers", index.get("_class_name"), DiffusionPipeline, "pipeline class", directory)
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
            continue
        library, name = (entry + [None, None])[:2]
        if library not in _LIBRARIES:
            raise BlockpruneError(
                f"{directory / INDEX} gives component {component!r} the library {library!r}; blockprune loads only "
                f"{' and '.join(_LIBRARIES)} components and imports no module a saved file names"
            )
        _exported(library, name, None, f"{component} class", directory)
    return cls


def load_pipeline(
    directory: Path, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """The pipeline saved in ``directory``: its transformer from blockprune's format, the other components by the
    pipeline's own ``from_pretrained`` (local files, safetensors only)."""
    from .serialization import load_model

    cls = _pipeline_class(directory, _read_index(directory))
    transformer = load_model(directory / TRANSFORMER, torch_dtype)
    kwargs: dict[str, Any] = {TRANSFORMER: transformer, "local_files_only": True, "use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    pipe = cls.from_pretrained(directory, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe
