"""Saving a compressed model as safetensors plus ``blockprune.json``, and rebuilding it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

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
from .plan import PLAN_ATTRIBUTE, Plan, plan, transformer_of
from .runtime import distributed
from .sandwich.reuse import LOG_ATTRIBUTE, STAGES_FILE, load_stage_log, save_stage_log


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


def _remove_earlier_weights(directory: Path) -> None:
    """Delete weight files of an earlier save into ``directory``: a stale index would win on load, and stale
    shards would be read by ``reuse_from``."""
    for path in [directory / INDEX, directory / WEIGHTS, *directory.glob("model-*-of-*.safetensors")]:
        path.unlink(missing_ok=True)


def _refuse_adapter_layers(model: torch.nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if wrapped:
        raise BlockpruneError(
            f"the model has LoRA (peft) layers, e.g. {wrapped[0]}, which from_pretrained could not rebuild; merge them "
            f"first with model.fuse_lora() and model.unload_lora(), or save the adapter apart with save_lora_adapter()"
        )


def save_pretrained(
    model: Any, directory: str | os.PathLike, max_shard_bytes: int = 10 * 2**30, fuse: bool = False
) -> None:
    """Write a compressed transformer (or a pipeline's) to ``directory``.

    Files: the diffusers ``config.json`` of the base model, safetensors with the kept blocks' and the
    surrogates' weights (none of the replaced blocks'), sharded past ``max_shard_bytes``, and
    ``blockprune.json`` (format version, adapter, replaced blocks with their stream shapes, dtype, plan),
    written by rank 0 alone under a distributed launch,
    and, after sandwich training, ``stages.safetensors`` with each stage's trained components (for reuse).
    With ``fuse=True`` the model is first fused in place (:func:`blockprune.fuse`, on every rank). The
    default keeps the per-block maps, which retraining and ``reuse_from`` need, and leaves the model as it is.
    """
    transformer = transformer_of(model)
    compressed = plan(transformer)
    if fuse:
        fuse_runs(transformer)
    if not distributed.is_main():  # under a distributed launch rank 0 alone writes
        return
    if not hasattr(transformer, "save_config"):
        raise BlockpruneError(
            f"save_pretrained needs a diffusers model with a config (ConfigMixin); {type(transformer).__name__} has none"
        )
    _refuse_adapter_layers(transformer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_config(directory)
    _write_weights(transformer, directory, max_shard_bytes)
    (directory / MANIFEST).write_text(json.dumps(_manifest(transformer, compressed), indent=2))
    log = getattr(transformer, LOG_ATTRIBUTE, None)
    if log is not None and log.blocks:
        save_stage_log(log, directory)
    else:
        (directory / STAGES_FILE).unlink(missing_ok=True)  # an earlier run's stages must not be reused for this one


def _write_weights(transformer: torch.nn.Module, directory: Path, max_shard_bytes: int) -> None:
    """The state dict as safetensors (tied tensors stored apart), sharded with an index past ``max_shard_bytes``."""
    seen: dict[int, str] = {}
    state = {}
    for key, tensor in transformer.state_dict().items():
        tensor = tensor.detach().contiguous().cpu()
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen[tensor.data_ptr()] = key
    shards = _shards(state, max_shard_bytes)
    _remove_earlier_weights(directory)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS, metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / filename, metadata={"format": "pt"})
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
) -> torch.nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, without materialising the replaced blocks' weights.

    Put it back into a pipeline with ``pipe.transformer = blockprune.from_pretrained(folder)``. Without
    ``torch_dtype`` the tensors keep the dtypes they were saved in, and buffers the files do not hold (non-persistent
    ones) take the saved dtype; with it, everything is loaded in ``torch_dtype``. Only a diffusers model class is
    built, looked up by name among diffusers' exports, and weights are read only from safetensors files inside
    ``directory``; a damaged or edited folder raises :class:`BlockpruneError`.
    """
    directory = Path(directory)
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
    if torch_dtype is not None:  # loaded straight into the asked dtype
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if torch_dtype is not None:
        model.to(torch_dtype)
    else:
        _cast_unsaved_buffers(model, set(state), dtype)
    try:
        plan_ = Plan.from_dict(manifest["plan"])
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(directory / MANIFEST, f"has an unusable plan ({type(error).__name__}: {error})") from error
    if device is not None:
        model.to(device)
    setattr(model, PLAN_ATTRIBUTE, plan_)
    setattr(model, LOG_ATTRIBUTE, load_stage_log(directory))
    return model.eval()


def _cast_unsaved_buffers(model: torch.nn.Module, saved: set[str], dtype: torch.dtype) -> None:
    """Give the floating buffers that are not in the files (non-persistent ones, built by the model's constructor in
    the default dtype) the saved model's ``dtype``; the saved tensors keep the dtypes they were written in."""
    cast: dict[int, torch.Tensor] = {}  # a buffer shared by several modules stays shared
    for prefix, module in model.named_modules():
        for attribute, buffer in list(module.named_buffers(recurse=False)):
            name = f"{prefix}.{attribute}" if prefix else attribute
            if name in saved or not buffer.is_floating_point() or buffer.dtype == dtype:
                continue
            if id(buffer) not in cast:
                cast[id(buffer)] = buffer.to(dtype)
            setattr(module, attribute, cast[id(buffer)])
