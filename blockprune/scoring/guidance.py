"""Classifier-free guidance for the trajectory checks: plans and healing are checked as the user will sample.

A sampler with guidance scale ``s`` steps with ``v = v(∅) + s · (v(text) − v(∅))``, where ``v(∅)`` is the
velocity for the empty prompt. Guidance amplifies the difference between the two, and with it the error a
surrogate makes on either: measured on ``sd3-small`` (guidance 2), two plans swapped order between unguided
and guided images (``docs/results.md``). So when the user's pipeline samples with guidance, the trajectory
checks of ``importance="auto"`` and of the heal guard step with it too.

The scale is the ``guidance_scale`` option, else the one the pipeline samples with by default (its call's
argument named by the adapter's :meth:`~blockprune.Adapter.guidance_argument`, as given in
``calibration_call_options`` or the call's default, else the pipeline config's; 1 or less is unguided, as in
diffusers' pipelines). The empty prompt's text
inputs come from the pipeline itself: one denoising step on ``""``, the transformer's inputs recorded as
calibration is, and the adapter's :attr:`~blockprune.Adapter.text_inputs` kept.
"""

from __future__ import annotations

import inspect
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration import record_pipeline_calibration
from ..errors import BlockpruneError

logger = logging.getLogger("blockprune")


@dataclass(frozen=True)
class Guidance:
    """``scale`` and the empty prompt's text inputs (``empty``: one row per forward argument, on the CPU)."""

    scale: float
    empty: dict[str, torch.Tensor]

    def unconditional(self, batch: Mapping[str, Any], index: int) -> dict[str, Any]:
        """``batch`` with its text inputs replaced by the empty prompt's, one row per sample."""
        swapped = dict(batch)
        for key, row in self.empty.items():
            value = batch.get(key)
            if not isinstance(value, torch.Tensor) or value.shape[1:] != row.shape[1:]:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise BlockpruneError(
                    f"calibration batch {index} has {key!r} {got}, but the pipeline's empty prompt gives "
                    f"{tuple(row.shape)}: the guided check needs calibration recorded with the pipeline's own text "
                    f"settings (e.g. max_sequence_length); record it from the pipeline, or pass guidance_scale=1"
                )
            swapped[key] = row.to(value.device, value.dtype).expand(value.shape[0], *row.shape[1:])
        return swapped

    def combine(self, conditional: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
        """The guided velocity ``v(∅) + scale · (v(text) − v(∅))``, in float32."""
        return unconditional.float() + self.scale * (conditional.float() - unconditional.float())


def pipeline_guidance_scale(adapter: Any, pipeline: Any, call_options: Mapping[str, Any] | None) -> float:
    """The classifier-free guidance scale ``pipeline`` samples with when called as calibration was: 1 when unknown."""
    argument = adapter.guidance_argument(pipeline)
    if argument is None:
        return 1.0
    scale = (call_options or {}).get(argument)
    if scale is None:
        parameter = inspect.signature(pipeline.__call__).parameters.get(argument)
        scale = None if parameter is None else parameter.default
    if not isinstance(scale, numbers.Real):
        scale = getattr(getattr(pipeline, "config", None), argument, None)
    return float(scale) if isinstance(scale, numbers.Real) and not isinstance(scale, bool) else 1.0


def check_guidance_source(guidance_scale: float | None, pipeline: Any) -> None:
    """Refuse a guidance scale above 1 without a pipeline to encode the empty prompt with (before any work)."""
    if pipeline is None and guidance_scale is not None and guidance_scale != 1:
        raise BlockpruneError(f"guidance_scale={guidance_scale:g} needs the pipeline, to encode the empty prompt "
                              "that guidance steers away from: pass the pipeline to compress, not its transformer")


def guidance_scale(adapter: Any, pipeline: Any, option: float | None, call_options: Mapping[str, Any] | None) -> float:
    """The scale the trajectory checks step with: the ``guidance_scale`` option, else the pipeline's; 1 (unguided)
    without a pipeline, and for a pipeline's scale of 1 or less, which diffusers' pipelines sample unguided."""
    check_guidance_source(option, pipeline)
    if option is not None:
        return float(option)
    if pipeline is None:
        return 1.0
    scale = pipeline_guidance_scale(adapter, pipeline, call_options)
    return scale if scale > 1 else 1.0


def resolve_guidance(adapter: Any, pipeline: Any, option: float | None,
                     call_options: Mapping[str, Any] | None) -> Guidance | None:
    """What the trajectory checks guide with: ``None`` for unguided sampling (see the module docstring)."""
    explicit = option is not None
    scale = guidance_scale(adapter, pipeline, option, call_options)
    if scale == 1:
        return None
    if not adapter.text_inputs:
        if explicit:
            raise BlockpruneError(f"guidance_scale={scale:g}: the {adapter.name!r} adapter names no text_inputs to swap "
                                  "for the empty prompt's; set its text_inputs, or pass guidance_scale=1")
        logger.info("the pipeline samples with guidance %g, but the %r adapter names no text_inputs: plans are "
                    "checked without guidance", scale, adapter.name)
        return None
    (recorded, *_) = record_pipeline_calibration(pipeline, adapter, [""], num_inference_steps=1, steps_per_prompt=1,
                                                 pipeline_options=call_options)
    missing = [key for key in adapter.text_inputs if not isinstance(recorded.get(key), torch.Tensor)]
    if missing:
        raise BlockpruneError(f"the transformer's inputs for the empty prompt hold no tensor {', '.join(map(repr, missing))}"
                              f" of the {adapter.name!r} adapter's text_inputs; fix its text_inputs, or pass "
                              "guidance_scale=1")
    return Guidance(scale, {key: recorded[key][:1].clone() for key in adapter.text_inputs})
