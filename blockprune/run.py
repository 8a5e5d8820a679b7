"""A run: one ``compress`` or ``importance`` call's model, adapter, calibration batches, blocks and config."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import plugins
from .adapter import Adapter
from .calibration import (
    bundled_prompts,
    prepare_calibration,
    record_pipeline_calibration,
)
from .config import CompressConfig
from .discovery.resolve import resolve_blocks
from .discovery.spec import Block
from .errors import BlockpruneError
from .plan import transformer_of
from .progress import progress_bars
from .runtime.offload import Offload
from .scoring.guidance import Guidance, guidance_scale, resolve_guidance
from .scoring.sampling import sampling_steps


@dataclass
class Run:
    """A model made ready for scoring or compression."""

    transformer: nn.Module
    pipeline: Any
    adapter: Adapter
    batches: list[dict[str, Any]]
    blocks: list[Block]
    config: CompressConfig
    offload: Offload | None = None
    recorded: bool = False  # the calibration was recorded from the pipeline (on config.calibration_prompts)

    @property
    def scoring_batches(self) -> list[dict[str, Any]]:
        """The first ``score_batches`` calibration batches (32 by default)."""
        count = self.config.scoring.score_batches
        return self.batches[:count] if count else self.batches

    @functools.cached_property
    def guidance(self) -> Guidance | None:
        """The guidance the trajectory checks step with (``None``: unguided, or no trajectory to check, the adapter not
        being a rectified-flow one); resolved once, on first use."""
        if self.adapter.flow_time_scale is None:
            return None
        return resolve_guidance(self.adapter, self.pipeline, self.config.guidance_scale,
                                self.config.calibration_call_options)

    @property
    def guidance_scale(self) -> float:
        """The scale the trajectory checks would step with (1: unguided), found without running the pipeline."""
        if self.adapter.flow_time_scale is None:
            return 1.0
        return guidance_scale(self.adapter, self.pipeline, self.config.guidance_scale, self.config.calibration_call_options)

    @property
    def sampling_steps(self) -> int:
        """The denoising steps the user samples with (:mod:`blockprune.scoring.sampling`)."""
        return sampling_steps(self.pipeline, self.config.sampling_steps)

    @property
    def metric_options(self) -> dict[str, Any]:
        """Options handed to metrics (the ridge included, for ``replace`` ablations and ``fit_residual``)."""
        return {**(self.config.scoring.metric_options or {}), "ridge": self.config.ridge}


def prepare_run(
    model: Any,
    adapter: str,
    calibration: Any,
    device: str | torch.device | None,
    config: CompressConfig,
    stack: contextlib.ExitStack | None = None,
    progress: bool = False,
) -> Run:
    """Resolve the transformer, adapter, calibration batches and blocks (verified on one forward pass).

    With the ``offload`` option the model is put under :class:`Offload` on ``device`` until ``stack`` closes.
    With ``progress``, recording calibration from a pipeline shows a bar.
    """
    transformer = transformer_of(model)
    _check_not_meta(transformer)
    pipeline = None if model is transformer else model
    chosen = plugins.get_adapter(transformer, adapter)
    offload = None
    if config.offload:
        if device is None or stack is None:
            raise BlockpruneError("offload=True needs device= (the accelerator that blocks visit), e.g. device='cuda'")
        offload = stack.enter_context(Offload(transformer, chosen.trace_targets(transformer), device,
                                              max_gpu_memory=config.max_gpu_memory))
    elif device is not None:
        transformer.to(device)
    if calibration is None and pipeline is not None:
        with progress_bars(progress) as bars:
            batches = record_pipeline_calibration(
                pipeline,
                chosen,
                list(config.calibration_prompts or bundled_prompts()),
                num_inference_steps=config.calibration_steps,
                steps_per_prompt=config.steps_per_prompt,
                pipeline_options=config.calibration_call_options,
                bars=bars,
            )
    else:
        batches = prepare_calibration(calibration)
    blocks = resolve_blocks(transformer, chosen, batches[0])
    recorded = calibration is None and pipeline is not None
    return Run(transformer, pipeline, chosen, batches, blocks, config, offload, recorded)


def _check_not_meta(model: nn.Module) -> None:
    """Refuse a model whose weights were never loaded (on the meta device) before any work."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise BlockpruneError(
                f"{type(model).__name__} has weights on the meta device ({name} and maybe more): they were never "
                f"loaded (init_empty_weights, device_map, or diffusers' enable_sequential_cpu_offload put them "
                f"there); load the model with its weights, and use compress(offload=True, device=...) to save memory"
            )
