"""Reuse (paper §3.2): assemble a lower-ratio model from a higher-ratio run's trained components."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..brll.surrogate import LinearSurrogate
from ..discovery.spec import Block
from ..errors import BlockpruneError
from ..manifest import MANIFEST, load_weights, read_manifest
from ..plan import StageLog
from ..runtime.atomic import save_safetensors

logger = logging.getLogger("blockprune")

STAGES_FILE = "stages.safetensors"
LOG_ATTRIBUTE = "_blockprune_stage_log"


def components_to_tensors(surrogates: dict, lora: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """One stage's components as flat tensors keyed ``prefix + kind/block/item/part``."""
    tensors = {}
    for kind, components in (("surrogate", surrogates), ("lora", lora)):
        for block, items in components.items():
            for item, parts in items.items():
                for part, tensor in parts.items():
                    tensors[f"{prefix}{kind}/{block}/{item}/{part}"] = tensor.contiguous()
    return tensors


def tensors_to_components(tensors: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
    """The inverse of :func:`components_to_tensors`: ``(surrogates, lora)``."""
    found: dict[str, dict] = {"surrogate": {}, "lora": {}}
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            kind, block, item, part = key[len(prefix) :].split("/")
            found[kind].setdefault(block, {}).setdefault(item, {})[part] = tensor
    return found["surrogate"], found["lora"]


def save_stage_log(log: StageLog, directory: Path) -> None:
    """Write every stage's components to ``stages.safetensors`` (keys ``stage/kind/block/item/part``)."""
    tensors = {}
    for stage, (surrogates, lora) in enumerate(zip(log.surrogates, log.lora)):
        tensors.update(components_to_tensors(surrogates, lora, prefix=f"{stage}/"))
    save_safetensors(tensors, directory / STAGES_FILE, metadata={"blocks": json.dumps(log.blocks)})


def load_stage_log(directory: Path) -> StageLog:
    """Read ``stages.safetensors`` back (an empty log when the run had no sandwich training)."""
    path = directory / STAGES_FILE
    if not path.is_file():
        return StageLog()
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        blocks = json.loads(handle.metadata()["blocks"])
    tensors = load_file(path)
    log = StageLog(blocks=blocks)
    for stage in range(len(blocks)):
        surrogates, lora = tensors_to_components(tensors, prefix=f"{stage}/")
        log.surrogates.append(surrogates)
        log.lora.append(lora)
    return log


def _check_unfused(plan: Any) -> None:
    if plan.fused:
        raise BlockpruneError(
            "reuse_from was fused (blockprune.fuse): its per-block linear maps are gone; reuse from the model "
            "before fusing, or from a folder saved without fuse=True"
        )


def _source(reuse_from: Any) -> tuple[list[str], dict[str, dict[str, torch.Tensor]], StageLog, Any]:
    """(replaced block order, final surrogate tensors by block, stage log, plan) of a higher-ratio run."""
    from ..plan import PLAN_ATTRIBUTE, Plan, transformer_of

    if isinstance(reuse_from, (str, os.PathLike)):
        directory = Path(reuse_from)
        if not (directory / MANIFEST).is_file():
            raise BlockpruneError(f"reuse_from={str(reuse_from)!r} is not a folder written by blockprune.save_pretrained")
        plan = Plan.from_dict(read_manifest(directory)["plan"])
        _check_unfused(plan)
        weights = load_weights(directory)
        finals = {name: {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(f"{name}.linears.")}
                  for name in plan.replaced_names}
        return plan.replaced_names, finals, load_stage_log(directory), plan
    transformer = transformer_of(reuse_from)
    plan = getattr(transformer, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise BlockpruneError("reuse_from must be a folder saved by blockprune or a model compressed by blockprune")
    _check_unfused(plan)
    finals = {name: {k: v.detach().cpu() for k, v in transformer.get_submodule(name).state_dict().items()
                     if k.startswith("linears.")} for name in plan.replaced_names}
    return plan.replaced_names, finals, getattr(transformer, LOG_ATTRIBUTE, None) or StageLog(), plan


def _check_same_model(plan: Any, by_name: dict[str, Block], fingerprint: str | None) -> None:
    """Refuse a higher run made on another model: other block names, stream widths, or weights."""
    for entry in plan.replaced:
        if entry.name not in by_name:
            raise BlockpruneError(f"reuse_from replaced block {entry.name!r}, which this model does not have")
        dims = by_name[entry.name].stream_dims
        for stream, report in entry.streams.items():
            if dims.get(stream) != report.dim:
                raise BlockpruneError(
                    f"reuse_from was made on another model: its block {entry.name} has stream {stream!r} of width "
                    f"{report.dim}, this model's has {dims.get(stream)}; reuse only from a run on this same model"
                )
    if plan.model_fingerprint is None:
        logger.warning("reuse_from records no model fingerprint (saved by an older blockprune): it cannot be "
                       "checked to come from this model's weights")
    elif fingerprint is not None and plan.model_fingerprint != fingerprint:
        raise BlockpruneError(
            "reuse_from was made on a model with other weights (its model fingerprint differs from this model's); "
            "reuse only from a run on this same model, or compress this one without reuse_from"
        )


def assemble(model: nn.Module, blocks: list[Block], count: int, reuse_from: Any,
             fingerprint: str | None = None) -> tuple[Any, StageLog]:
    """Replace the first ``count`` blocks of the higher run by its final surrogates and merge the LoRA deltas of
    its first ``count`` stages into the blocks kept here. No training. Returns the higher run's plan and the
    log of the stages reused. A higher run made on another model (other blocks, widths, or, when
    ``fingerprint`` is given, another :func:`~blockprune.runtime.fingerprint.model_fingerprint`) is refused."""
    order, finals, log, plan = _source(reuse_from)
    if count > len(order):
        raise BlockpruneError(
            f"reuse_from replaced {len(order)} blocks; this ratio needs {count}: reuse only from a higher ratio"
        )
    by_name = {b.name: b for b in blocks}
    _check_same_model(plan, by_name, fingerprint)
    chosen = order[:count]
    for name in chosen:
        block = by_name[name]
        surrogate = LinearSurrogate.for_block(model.get_submodule(name), block.spec, block.stream_dims)
        state = {k.removeprefix("linears."): v for k, v in finals[name].items()}
        for stream in block.spec.streams:
            surrogate.set_affine(stream, state[f"{stream}.weight"], state[f"{stream}.bias"])
        model.set_submodule(name, surrogate)
    with torch.no_grad():
        for stage_lora in log.lora[:count]:
            for block_name, modules in stage_lora.items():
                if block_name in chosen:
                    continue
                block_module = model.get_submodule(block_name)
                for module_name, factors in modules.items():
                    linear = block_module.get_submodule(module_name)
                    delta = factors["B"].to(torch.float32) @ factors["A"].to(torch.float32)
                    linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    reused = StageLog(log.surrogates[:count], log.lora[:count], log.blocks[:count])
    return plan, reused
