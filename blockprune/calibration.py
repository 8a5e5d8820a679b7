"""Calibration batches: validation, prompts, recording them from a pipeline (files: :mod:`.calibration_file`)."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .discovery.signature import bind_inputs
from .errors import BlockpruneError
from .option_checks import SET_BY_BLOCKPRUNE, check_call_options
from .runtime.finite import check_finite_batches
from .runtime.forward import to_device


def prepare_calibration(calibration: Any) -> list[dict[str, Any]]:
    """Check that ``calibration`` is a non-empty iterable of dicts without NaN or Inf; return it as a list."""
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
    batches = [dict(batch) for batch in batches]
    # before any work: least squares, sandwich training and its held-out check each see only a subset
    check_finite_batches(batches, fix="every value must be finite: fix or drop that batch")
    return batches


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


def _check_pipeline_options(adapter: Any, options: Mapping[str, Any]) -> None:
    """Pipeline keyword arguments (``height``, ``width``) need an adapter whose ``call_pipeline`` takes them."""
    if not options:
        return
    parameters = inspect.signature(adapter.call_pipeline).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    refused = sorted(set(options) - set(parameters))
    if refused:
        raise BlockpruneError(
            f"the {adapter.name!r} adapter's call_pipeline takes no {', '.join(refused)}; leave "
            f"{'them' if len(refused) > 1 else 'it'} out (the pipeline's default size), or give the adapter's "
            f"call_pipeline a **options argument that it passes to the pipeline"
        )


def _check_pipeline_arguments(pipe: Any, options: Mapping[str, Any]) -> None:
    """Each of ``options`` must be an argument of the pipeline's call (unless it takes ``**kwargs``)."""
    parameters = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [key for key in options if key not in parameters]
    if unknown:
        accepted = [name for name, p in parameters.items() if name not in SET_BY_BLOCKPRUNE
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BlockpruneError(
            f"{type(pipe).__name__} takes no argument {', '.join(map(repr, unknown))}{hint}; the calibration call "
            f"options must be among its arguments: {', '.join(accepted)}"
        )


def record_pipeline_calibration(
    pipe: Any,
    adapter: Any,
    prompts: list[str],
    num_inference_steps: int = 8,
    steps_per_prompt: int = 2,
    seed: int = 0,
    *,
    pipeline_options: Mapping[str, Any] | None = None,
    bars: Any = None,
) -> list[dict[str, Any]]:
    """Run ``pipe`` on ``prompts`` and keep the transformer's inputs at evenly spaced denoising steps (on CPU).

    ``pipeline_options`` (``height``, ``width``, ``guidance_scale`` ..., arguments of the pipeline's call) go to
    the adapter's ``call_pipeline``; ``bars`` (a rich ``Progress``) gets a bar advanced once per prompt.
    """
    options = dict(pipeline_options or {})
    _check_pipeline_options(adapter, options)
    _check_pipeline_arguments(pipe, options)
    keep = _sampled_steps(num_inference_steps, steps_per_prompt)
    recorded: list[dict[str, Any]] = []
    step = 0

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal step
        if step in keep:
            inputs = bind_inputs(module, args, kwargs)  # positional arguments get their parameter names
            recorded.append(to_device({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, torch.device("cpu")))
        step += 1

    task = None if bars is None else bars.add_task(
        f"recording calibration ({num_inference_steps} steps a prompt)", total=len(prompts))
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, prompt in enumerate(prompts):
            step = 0
            generator = torch.Generator("cpu").manual_seed(seed + index)
            adapter.call_pipeline(pipe, prompt, generator, num_inference_steps, **options)
            if task is not None:
                bars.advance(task)
    finally:
        handle.remove()
    if not recorded:
        raise BlockpruneError("the pipeline never called its transformer; cannot record calibration inputs")
    check_finite_batches(recorded, "recorded calibration batch", fix="the pipeline computed it: check its dtype "
                         "(float16 overflows easily: try bfloat16) or pass calibration= yourself")
    return recorded


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BlockpruneError(f"{name} must be a positive integer, got {value!r}")


def record_calibration(
    pipe: Any,
    prompts: list[str] | None = None,
    *,
    adapter: str = "auto",
    num_inference_steps: int = 8,
    steps_per_prompt: int = 2,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    progress: bool = True,
    call_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Calibration batches recorded from a pipeline: it runs on each prompt (default: the bundled ones) for
    ``num_inference_steps`` steps at ``height`` × ``width`` (default: the pipeline's), and the transformer's
    forward keyword arguments at ``steps_per_prompt`` evenly spaced steps are kept, on the CPU.
    ``call_options`` are more keyword arguments of the pipeline call (``guidance_scale``, ``max_sequence_length`` ...).

    What a batch holds depends on the model (``Adapter.describe_batch()``, docs/api.md); save the batches with
    :func:`blockprune.save_calibration` and pass them as ``compress(transformer, calibration=...)``.
    """
    from . import plugins
    from .plan import transformer_of
    from .progress import progress_bars

    for name, value in (("num_inference_steps", num_inference_steps), ("steps_per_prompt", steps_per_prompt),
                        ("height", height), ("width", width)):
        _positive(name, value)
    transformer = transformer_of(pipe)
    if transformer is pipe:
        raise BlockpruneError(f"record_calibration runs a pipeline, but got a bare {type(pipe).__name__}; pass the "
                              f"pipeline that holds it (its .transformer)")
    prompts = list(bundled_prompts() if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise BlockpruneError("prompts must be a non-empty list of strings (or None for the bundled prompts)")
    chosen = plugins.get_adapter(transformer, adapter)
    options = check_call_options({} if call_options is None else call_options, "call_options")
    options.update({key: value for key, value in (("height", height), ("width", width)) if value is not None})
    with progress_bars(progress) as bars:
        return record_pipeline_calibration(pipe, chosen, prompts, num_inference_steps, steps_per_prompt, seed,
                                           pipeline_options=options, bars=bars)
