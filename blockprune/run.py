"""What compress() and importance() share: options, calibration and block resolution."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import plugins
from .adapter import Adapter, Block
from .blocks import resolve_blocks
from .calibration import bundled_prompts, prepare_calibration, record_pipeline_calibration
from .errors import BlockpruneError
from .metrics.scoring import ABLATIONS
from .offload import Offload
from .plan import transformer_of
from .replacement import SURROGATES
from .sandwich.options import option_names

OPTIONS: dict[str, Any] = {
    "ridge": 1e-6,  # λ = ridge · trace(ZᵀZ)/(d+1)
    "surrogate": "linear",  # "linear": BRLL; "identity": Y = X, the block deleted (a baseline to compare with)
    "record_device": None,  # where the float64 accumulators live; default: the block's device
    "score_batches": None,  # how many calibration batches importance scoring uses; default: all
    "ablation": "remove",  # how a block is ablated for scoring: "remove" (Y = X) or "replace" (its LS surrogate)
    "rescore": "once",  # "once" (the paper) or "each": re-score the remaining blocks after each replacement
    "metric_options": None,  # options for metrics: feature_extractor, clip_scorer, clip_model_path, generation_*
    "cache_dir": None,  # importance score cache; default $BLOCKPRUNE_CACHE_DIR or ~/.cache/blockprune; False: off
    "calibration_prompts": None,  # prompts for recording calibration from a pipeline; default: bundled
    "calibration_steps": 8,  # denoising steps per prompt when recording from a pipeline
    "steps_per_prompt": 2,  # transformer calls kept per prompt, evenly spaced over the steps
    "offload": False,  # keep blocks on the CPU, moving each to the device only while it runs or trains
    "workdir": None,  # folder for resumable runs: scores and finished stages are written there atomically
    "keep_activations": False,  # keep spilled activation shards in the workdir after their stage
    "reuse_from": None,  # a folder or compressed model of a higher-ratio run: assemble from it, no training
    # sandwich training (see blockprune.sandwich.SandwichOptions for meanings and defaults)
    **dict.fromkeys(option_names()),
}


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in; an unknown name is an error that lists the known ones."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BlockpruneError(f"unknown option {unknown[0]!r}; options: {', '.join(OPTIONS)}")
    merged = {**OPTIONS, **options}
    if merged["ablation"] not in ABLATIONS:
        raise BlockpruneError(f"unknown ablation {merged['ablation']!r}; use one of {', '.join(ABLATIONS)}")
    if merged["surrogate"] not in SURROGATES:
        raise BlockpruneError(f"unknown surrogate {merged['surrogate']!r}; use one of {', '.join(SURROGATES)}")
    if merged["rescore"] not in ("once", "each"):
        raise BlockpruneError(f"rescore must be 'once' or 'each', got {merged['rescore']!r}")
    return merged


@dataclass
class Run:
    """A model made ready for scoring or compression."""

    transformer: nn.Module
    pipeline: Any
    adapter: Adapter
    batches: list[dict[str, Any]]
    blocks: list[Block]
    options: dict[str, Any]
    offload: Offload | None = None

    @property
    def scoring_batches(self) -> list[dict[str, Any]]:
        """The first ``score_batches`` calibration batches (all by default)."""
        count = self.options["score_batches"]
        return self.batches[:count] if count else self.batches

    @property
    def metric_options(self) -> dict[str, Any]:
        """Options handed to metrics (the ridge included, for ``replace`` ablations and ``fit_residual``)."""
        return {**(self.options["metric_options"] or {}), "ridge": self.options["ridge"]}


def prepare_run(
    model: Any,
    adapter: str,
    calibration: Any,
    device: str | torch.device | None,
    options: Mapping[str, Any],
    stack: contextlib.ExitStack | None = None,
) -> Run:
    """Resolve the transformer, adapter, calibration batches and blocks (verified on one forward pass).

    With the ``offload`` option the model is put under :class:`Offload` on ``device`` until ``stack`` closes.
    """
    transformer = transformer_of(model)
    pipeline = None if model is transformer else model
    options = check_options(options)
    chosen = plugins.get_adapter(transformer, adapter)
    offload = None
    if options["offload"]:
        if device is None or stack is None:
            raise BlockpruneError("offload=True needs device= (the accelerator that blocks visit), e.g. device='cuda'")
        offload = stack.enter_context(Offload(transformer, chosen.trace_targets(transformer), device))
    elif device is not None:
        transformer.to(device)
    if calibration is None and pipeline is not None:
        batches = record_pipeline_calibration(
            pipeline,
            chosen,
            options["calibration_prompts"] or bundled_prompts(),
            num_inference_steps=options["calibration_steps"],
            steps_per_prompt=options["steps_per_prompt"],
        )
    else:
        batches = prepare_calibration(calibration)
    blocks = resolve_blocks(transformer, chosen, batches[0])
    return Run(transformer, pipeline, chosen, batches, blocks, options, offload)
