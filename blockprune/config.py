"""Sandwich-training options, validated once."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .brll.replacement import SURROGATES
from .errors import BlockpruneError
from .scoring.ablation import ABLATIONS

TARGETS = ("local", "global")
WIDTHS = (1, 3, 5)


@dataclass(frozen=True)
class SandwichConfig:
    """How each sandwich stage trains; passed to ``compress`` as ``sandwich_<field>`` (``lora_*`` as is)."""

    width: int = 3  # 1: linear layers alone; 3: + nearest unreplaced neighbours (paper); 5: two per side
    steps: int = 100  # optimizer steps per stage
    lr: float = 1e-4  # AdamW learning rate
    batch_size: int = 1  # calibration batches per optimizer step (gradients accumulated)
    split: float = 0.5  # share of calibration batches for training; the rest fit the least squares
    held_out: float = 0.25  # share of the training batches held out for the before/after report
    target: str = "local"  # "local": original blocks on the span's input; "global": unpruned model's activation
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # module names inside a block; default: the adapter's
    gradient_checkpointing: bool = False
    train_surrogates: bool = True  # train the span's linear layers in full; False: they keep their fit (or Y = X)
    activation_budget: int = 8 * 2**30  # bytes of recorded activations kept in RAM before spilling to disk

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SandwichConfig:
        """Build from ``compress`` options (``sandwich_width`` → ``width``; ``lora_rank`` etc. keep their names)."""
        values = {}
        for field in fields(cls):
            for key in (f"sandwich_{field.name}", field.name):
                if key in options and options[key] is not None:
                    values[field.name] = options[key]
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values).validated()

    def validated(self) -> SandwichConfig:
        """Check every field; a bad value is an error that names the option."""
        if self.width not in WIDTHS:
            raise BlockpruneError(f"sandwich_width must be 1, 3 or 5, got {self.width!r}")
        for name in ("steps", "batch_size", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BlockpruneError(f"{_option(name)} must be a positive integer, got {value!r}")
        for name in ("lr", "lora_alpha", "activation_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise BlockpruneError(f"{_option(name)} must be a positive number, got {value!r}")
        for name in ("split", "held_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
                raise BlockpruneError(f"{_option(name)} must be strictly between 0 and 1, got {value!r}")
        for name in ("gradient_checkpointing", "train_surrogates"):
            if not isinstance(getattr(self, name), bool):
                raise BlockpruneError(f"{_option(name)} must be True or False, got {getattr(self, name)!r}")
        if self.target not in TARGETS:
            raise BlockpruneError(f"sandwich_target must be 'local' or 'global', got {self.target!r}")
        return self


def _option(name: str) -> str:
    return name if name.startswith("lora_") else f"sandwich_{name}"


def option_names() -> list[str]:
    """The ``compress`` option names that configure sandwich training."""
    return [_option(field.name) for field in fields(SandwichConfig)]


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
    # sandwich training (see blockprune.sandwich.SandwichConfig for meanings and defaults)
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
