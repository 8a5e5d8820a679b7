"""Calibration batches: validation, device placement, running the model, recording from pipelines."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import BaseOutput
from torch import nn

from .adapter import bind_inputs
from .errors import BlockpruneError


class StopForward(Exception):
    """Raised by a recording hook once it has what it needs, to skip the rest of the forward."""


def prepare_calibration(calibration: Any) -> list[dict[str, Any]]:
    """Check that ``calibration`` is a non-empty iterable of dicts and return it as a list."""
    if calibration is None:
        raise BlockpruneError(
            "no calibration data: pass calibration=[{...}, ...], one dict of keyword arguments for the "
            "transformer's forward per batch (what a pipeline passes it at one denoising step), or pass a "
            "diffusers pipeline holding the transformer so that blockprune records them itself"
        )
    if isinstance(calibration, Mapping) or not isinstance(calibration, Iterable):
        raise BlockpruneError(
            f"calibration must be a list (or other iterable) of dicts, got {type(calibration).__name__}; "
            f"wrap a single batch as [batch]"
        )
    batches = list(calibration)
    if not batches:
        raise BlockpruneError("calibration is empty: pass at least one dict of forward keyword arguments")
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise BlockpruneError(
                f"calibration item {index} is a {type(batch).__name__}, not a dict; each item must be a dict "
                f"of keyword arguments for the transformer's forward"
            )
    return [dict(batch) for batch in batches]


def check_batch_keys(model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
    """Name any key the model's forward does not accept, and any required argument missing."""
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any:
        unknown = sorted(set(batch) - set(parameters))
        if unknown:
            raise BlockpruneError(
                f"calibration batch {index} has key {unknown[0]!r}, which {type(model).__name__}.forward does not "
                f"accept; accepted keys: {', '.join(parameters)}"
            )
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in batch
    ]
    if missing:
        raise BlockpruneError(
            f"calibration batch {index} lacks {missing[0]!r}, which {type(model).__name__}.forward requires"
        )


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside ``value`` (dicts, lists and tuples included) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def run_model(model: nn.Module, batch: Mapping[str, Any], index: int) -> Any:
    """Run the model on one calibration batch, stopping quietly where a hook raises :class:`StopForward`.

    Returns the model's output, or ``None`` when a hook stopped the forward early.
    """
    check_batch_keys(model, batch, index)
    batch = to_device(batch, model_device(model))
    try:
        with torch.no_grad():
            return model(**batch)
    except StopForward:
        return None
    except BlockpruneError:
        raise
    except Exception as error:
        raise BlockpruneError(
            f"{type(model).__name__}.forward rejected calibration batch {index} "
            f"(keys: {', '.join(batch)}): {type(error).__name__}: {error}"
        ) from error


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: ``.sample`` (else the first field) of a diffusers output, or the first item.

    A list of per-sample tensors (Z-Image returns one per image) is flattened into one tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, BaseOutput):
        sample = output.sample if "sample" in output else output.to_tuple()[0]
        if isinstance(sample, list) and sample and all(isinstance(item, torch.Tensor) for item in sample):
            return torch.cat([item.flatten() for item in sample])
        return sample
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BlockpruneError(f"cannot find the output tensor in a {type(output).__name__} returned by the model")


def _prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def bundled_prompts() -> list[str]:
    """The varied prompts shipped with blockprune for recording calibration from a pipeline."""
    return _prompt_lines(resources.files("blockprune").joinpath("data/prompts.txt").read_text(encoding="utf-8"))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines and ``#`` comments skipped); at least one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise BlockpruneError(f"cannot read prompts file {path}: {reason}; pass a UTF-8 text file, one prompt a line") from error
    prompts = _prompt_lines(text)
    if not prompts:
        raise BlockpruneError(f"prompts file {path} has no prompts; write one prompt a line (lines starting # are skipped)")
    return prompts


def _sampled_steps(num_steps: int, keep: int) -> set[int]:
    keep = max(1, min(keep, num_steps))
    return {round(i * (num_steps - 1) / max(keep - 1, 1)) for i in range(keep)}


def record_pipeline_calibration(
    pipe: Any,
    adapter: Any,
    prompts: list[str],
    num_inference_steps: int = 8,
    steps_per_prompt: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run ``pipe`` on ``prompts`` and keep the transformer's inputs at evenly spaced denoising steps (on CPU)."""
    keep = _sampled_steps(num_inference_steps, steps_per_prompt)
    recorded: list[dict[str, Any]] = []
    step = 0

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal step
        if step in keep:
            inputs = bind_inputs(module, args, kwargs)  # positional arguments get their parameter names
            recorded.append(to_device({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, torch.device("cpu")))
        step += 1

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, prompt in enumerate(prompts):
            step = 0
            generator = torch.Generator("cpu").manual_seed(seed + index)
            adapter.run_pipeline(pipe, prompt, generator, num_inference_steps)
    finally:
        handle.remove()
    if not recorded:
        raise BlockpruneError("the pipeline never called its transformer; cannot record calibration inputs")
    return recorded
