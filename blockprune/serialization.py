"""Saving a compressed model as safetensors plus ``blockprune.json``, and rebuilding it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from .brll.fusion import fuse as fuse_runs
from .brll.surrogate import LinearSurrogate
from .discovery.spec import BlockSpec
from .errors import BlockpruneError
from .manifest import (
    FORMAT_VERSION,
    FUSED_FORMAT_VERSION,
    INDEX,
    MANIFEST,
    WEIGHTS,
    damaged,
    load_config,
    load_weights,
    model_class,
    read_manifest,
    saved_dtype,
)
from .native import attach_save_method, mark_config, refuse_unsaveable
from .pipelines import (
    is_diffusers_pipeline,
    is_pipeline_folder,
    load_pipeline,
    save_pipeline,
)
from .plan import PLAN_ATTRIBUTE, Plan, plan, transformer_of
from .runtime import distributed
from .runtime.atomic import save_safetensors
from .runtime.staging import staged_folder
from .sandwich.reuse import LOG_ATTRIBUTE, STAGES_FILE, load_stage_log, save_stage_log

DEFAULT_SHARD_BYTES = 10 * 2**30


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _earlier_files(directory: Path) -> list[str]:
    """Files of an earlier save into ``directory`` that a new save replaces or must delete: a stale index would win
    on load, stale shards would be read by ``reuse_from``, stale stages would be reused for the wrong run."""
    if not directory.is_dir():
        return []
    paths = [directory / INDEX, directory / WEIGHTS, directory / STAGES_FILE, *directory.glob("model-*-of-*.safetensors")]
    return [path.name for path in paths if path.exists()]


def save_pretrained(
    model: Any, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES, fuse: bool = False
) -> None:
    """Write a compressed transformer, or a whole diffusers pipeline holding one, to ``directory``.

    A transformer's files: the diffusers ``config.json`` of the base model (marked so that diffusers' own loaders
    refuse it by name), safetensors with the kept blocks' and the surrogates' weights (none of the replaced
    blocks'), sharded past ``max_shard_bytes``, ``blockprune.json`` (format version, adapter, replaced blocks with
    their stream shapes, dtype, plan), and, after sandwich training, ``stages.safetensors`` with each stage's
    trained components (for reuse). A ``DiffusionPipeline`` is written by its own ``save_pretrained`` (the
    transformer in ``transformer/``, in blockprune's format) plus a ``blockprune.json`` naming the pipeline;
    :func:`from_pretrained` returns it whole. Under a distributed launch rank 0 alone writes. Everything goes to a
    temporary folder first, so a failed save leaves ``directory`` as it was. A ``torch.compile``d model is saved
    as the model it wraps; quantized models and peft layers are refused before anything is written.
    With ``fuse=True`` the model is first fused in place (:func:`blockprune.fuse`, on every rank). The
    default keeps the per-block maps, which retraining and ``reuse_from`` need, and leaves the model as it is.
    """
    if is_diffusers_pipeline(model):
        save_pipeline(model, Path(directory), max_shard_bytes, fuse)
        return
    transformer = transformer_of(model)
    compressed = plan(transformer)
    if not hasattr(transformer, "save_config"):
        raise BlockpruneError(
            f"save_pretrained needs a diffusers model with a config (ConfigMixin); {type(transformer).__name__} has none"
        )
    refuse_unsaveable(transformer)
    if fuse:
        fuse_runs(transformer)
    if not distributed.is_main():  # under a distributed launch rank 0 alone writes
        return
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BlockpruneError(f"{directory} is a file; pass a folder to save the model to")
    with staged_folder(directory, stale=_earlier_files(directory)) as staging:
        transformer.save_config(staging)
        mark_config(staging / "config.json")
        _write_weights(transformer, staging, max_shard_bytes)
        (staging / MANIFEST).write_text(json.dumps(_manifest(transformer, compressed), indent=2))
        log = getattr(transformer, LOG_ATTRIBUTE, None)
        if log is not None and log.blocks:
            save_stage_log(log, staging)


def _write_weights(transformer: torch.nn.Module, directory: Path, max_shard_bytes: int) -> None:
    """The state dict as safetensors (tied tensors stored apart), sharded with an index past ``max_shard_bytes``."""
    seen: dict[int, str] = {}
    state = {}
    for key, tensor in transformer.state_dict().items():
        tensor = tensor.detach().contiguous().cpu()
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen[tensor.data_ptr()] = key
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_safetensors(shards[0], directory / WEIGHTS, metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, directory / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, filename))
        (directory / INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=2))


def _manifest(transformer: torch.nn.Module, compressed: Plan) -> dict[str, Any]:
    """What ``blockprune.json`` holds: format, adapter, model class, dtype, the replaced blocks and the plan."""
    replaced = []
    for entry in compressed.replaced:
        surrogate = transformer.get_submodule(entry.name)
        shapes = {s: list(linear.weight.shape) for s, linear in surrogate.linears.items()}
        replaced.append({"name": entry.name, "kind": entry.kind, "spec": entry.spec, "streams": shapes})
    return {
        "format_version": FUSED_FORMAT_VERSION if compressed.fused else FORMAT_VERSION,
        "adapter": compressed.adapter,
        "model_class": f"{type(transformer).__module__}:{type(transformer).__qualname__}",
        "dtype": _dtype_name(next(transformer.parameters()).dtype),
        "replaced": replaced,
        "plan": compressed.to_dict(),
    }


def _put_surrogate(model: torch.nn.Module, entry: dict[str, Any], directory: Path) -> None:
    """Replace the block ``entry`` of ``blockprune.json`` names by an empty surrogate of the recorded shape."""
    name = entry["name"]
    try:
        block = model.get_submodule(name)
    except AttributeError as error:
        raise BlockpruneError(
            f"{directory / MANIFEST} names the replaced block {name!r}, which the {type(model).__name__} built from "
            f"config.json lacks; the two files do not belong together, save the model again"
        ) from error
    if type(block).__name__ != entry["kind"]:
        raise BlockpruneError(
            f"{MANIFEST} says {name} is a {entry['kind']}, the model has a {type(block).__name__}"
        )
    try:
        dims = {s: int(shape[1]) for s, shape in entry["streams"].items()}
        surrogate = LinearSurrogate.for_block(block, BlockSpec.from_dict(entry["spec"]), dims)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        problem = f"has an unusable entry for {name} ({type(error).__name__}: {error})"
        raise damaged(directory / MANIFEST, problem) from error
    model.set_submodule(name, surrogate)


def _check_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing[:5])}" if missing else "", f"unexpected {', '.join(unexpected[:5])}" if unexpected else ""]
        raise BlockpruneError(
            f"the tensors in {directory} do not match its {MANIFEST}: {'; '.join(p for p in problems if p)}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BlockpruneError(
                f"tensor {key} in {directory} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )


def from_pretrained(
    directory: str | os.PathLike, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """Rebuild a model (or a whole pipeline) written by :func:`save_pretrained` or by the compressed model's own
    ``save_pretrained``, without materialising the replaced blocks' weights.

    A pipeline folder (``model_index.json`` with the transformer in blockprune's format) gives the pipeline; a model
    folder gives the model, which goes back into a pipeline with ``pipe.transformer = blockprune.from_pretrained(
    folder)``. Without ``torch_dtype`` the tensors keep the dtypes they were saved in, and buffers the files do not
    hold (non-persistent ones) take the saved dtype; with it, everything is loaded straight in ``torch_dtype``
    (except the modules the class keeps in float32, as diffusers does). Only diffusers (and, in a pipeline,
    transformers) classes are built, looked up by name among those packages' exports, and weights are read only
    from safetensors files inside ``directory``; a damaged or edited folder raises :class:`BlockpruneError`.
    """
    directory = Path(directory)
    if is_pipeline_folder(directory):
        return load_pipeline(directory, torch_dtype, device)
    return load_model(directory, torch_dtype, device)


def load_model(
    directory: Path, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> torch.nn.Module:
    """The compressed model saved in the model folder ``directory`` (see :func:`from_pretrained`)."""
    manifest = read_manifest(directory)
    cls = model_class(manifest["model_class"])
    dtype = saved_dtype(manifest, directory)
    config = load_config(cls, directory)
    with init_empty_weights():
        model = cls.from_config(config)
    for entry in manifest["replaced"]:
        _put_surrogate(model, entry, directory)
    state = load_weights(directory)
    _check_tensors(model, state, directory)
    if torch_dtype is not None:  # loaded straight into the asked dtype: no cast of the model afterwards
        keep = _kept_in_float32(cls)
        state = {k: v.to(torch.float32 if keep and any(m in k.split(".") for m in keep) else torch_dtype)
                 if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _cast_unsaved_buffers(model, set(state), torch_dtype if torch_dtype is not None else dtype)
    try:
        plan_ = Plan.from_dict(manifest["plan"])
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(directory / MANIFEST, f"has an unusable plan ({type(error).__name__}: {error})") from error
    if device is not None:
        model.to(device)
    setattr(model, PLAN_ATTRIBUTE, plan_)
    setattr(model, LOG_ATTRIBUTE, load_stage_log(directory))
    attach_save_method(model)
    return model.eval()


def _kept_in_float32(cls: type) -> list[str]:
    """The module names that diffusers keeps in float32 when it loads ``cls`` in another dtype."""
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    return [keep] if isinstance(keep, str) else list(keep)


def _cast_unsaved_buffers(model: torch.nn.Module, saved: set[str], dtype: torch.dtype) -> None:
    """Give the floating buffers that are not in the files (non-persistent ones, built by the model's constructor in
    the default dtype) ``dtype``; the loaded tensors keep the dtypes they were loaded in."""
    cast: dict[int, torch.Tensor] = {}  # a buffer shared by several modules stays shared
    for prefix, module in model.named_modules():
        for attribute, buffer in list(module.named_buffers(recurse=False)):
            name = f"{prefix}.{attribute}" if prefix else attribute
            if name in saved or not buffer.is_floating_point() or buffer.dtype == dtype:
                continue
            if id(buffer) not in cast:
                cast[id(buffer)] = buffer.to(dtype)
            setattr(module, attribute, cast[id(buffer)])
