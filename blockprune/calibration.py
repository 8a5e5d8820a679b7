"""Calibration batches: validation, device placement, running the model, recording from pipelines."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .discovery.signature import bind_inputs
from .errors import BlockpruneError
from .runtime.forward import (
    to_device,
)


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
            adapter.call_pipeline(pipe, prompt, generator, num_inference_steps)
    finally:
        handle.remove()
    if not recorded:
        raise BlockpruneError("the pipeline never called its transformer; cannot record calibration inputs")
    return recorded
