"""Typed settings of a compression: :class:`CompressConfig` with its :class:`ScoringConfig` and :class:`SandwichConfig`.

Keyword options of :func:`blockprune.compress` build them (``ridge=``, ``ablation=``, ``sandwich_steps=``,
``lora_rank=`` ...); each is validated once, when it is made. Fields whose ``metadata`` says
``resume_key=False`` do not change the result (where files go, memory budgets), so a work directory made
with other values of them still resumes.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import BlockpruneError
from .option_checks import (
    boolean,
    cfg_scale,
    check_call_options,
    folder,
    memory_size,
    non_negative_int,
    one_of,
    positive_int,
    positive_number,
)

ABLATIONS = ("remove", "replace")
RESCORE = ("once", "each")
TARGETS = ("local", "global")
HEAL_KEPT = ("lora", "full")  # how healing trains the kept blocks
HEAL_STATES = ("auto", "trajectory", "calibration")  # what healing trains on (blockprune.sandwich.heal_states)
WIDTHS = (1, 3, 5)
OUTSIDE_KEY = {"resume_key": False}


@dataclass(frozen=True)
class ScoringConfig:
    """How blocks are scored for ``order="importance"`` (which metrics: ``compress(importance=...)``)."""

    ablation: str = "remove"  # how a block is ablated for scoring: "remove" (Y = X) or "replace" (its LS surrogate)
    rescore: str = "once"  # "once" (the paper) or "each": re-score the remaining blocks after each replacement
    # how many calibration batches scoring uses (the first ones): a bound, as scoring (and auto's checks) cost forwards
    # per block and batch; the project's measurements used 32. Pass a larger number to score on more
    score_batches: int | None = 32
    metric_options: Mapping[str, Any] | None = None  # for metrics: feature_extractor, clip_scorer, generation_* ...
    # score cache; default $BLOCKPRUNE_CACHE_DIR or ~/.cache/blockprune; False: off
    cache_dir: str | os.PathLike | bool | None = field(default=None, metadata=OUTSIDE_KEY)
    auto_held_out: float = 0.25  # importance="auto": share of the scoring batches kept out to check each plan
    auto_refine: int = 1  # importance="auto": rounds of greedy block swaps after the best candidate (0: none)
    # importance="auto": check candidates on sampled "images" (needs a pipeline), a latent "trajectory" (rectified
    # flow), one-step "outputs", or "auto" (images with a pipeline, else trajectory where the adapter allows)
    auto_check: str = "auto"
    auto_check_batches: int = 8  # importance="auto": held-out batches a trajectory or outputs check runs on
    # importance="auto": noise draws a trajectory check makes at least (its batches repeated with fresh noise)
    auto_check_samples: int = 32
    # importance="auto": the best plans by the short check that are re-checked over the sampling steps (0: none)
    auto_finalists: int = 3

    def __post_init__(self) -> None:
        one_of("ablation", self.ablation, ABLATIONS)
        if isinstance(self.auto_held_out, bool) or not isinstance(self.auto_held_out, numbers.Real) or not (
            0 < self.auto_held_out < 1
        ):
            raise BlockpruneError(f"auto_held_out must be strictly between 0 and 1, got {self.auto_held_out!r}")
        non_negative_int("auto_refine", self.auto_refine, "rounds of greedy swaps")
        one_of("rescore", self.rescore, RESCORE)
        one_of("auto_check", self.auto_check, ("auto", "images", "trajectory", "outputs"))
        positive_int("auto_check_batches", self.auto_check_batches)
        positive_int("auto_check_samples", self.auto_check_samples)
        non_negative_int("auto_finalists", self.auto_finalists, "plans re-checked over the sampling steps")
        if self.score_batches is not None:
            positive_int("score_batches", self.score_batches)
        if self.metric_options is not None and not isinstance(self.metric_options, Mapping):
            raise BlockpruneError(f"metric_options must be a dict of metric settings, got {self.metric_options!r}")
        folder("cache_dir", self.cache_dir, allow_false=True)


@dataclass(frozen=True)
class SandwichConfig:
    """How each sandwich stage trains; passed to ``compress`` as ``sandwich_<field>`` (``lora_*`` as is)."""

    width: int = 3  # 1: linear layers alone; 3: + nearest unreplaced neighbours (paper); 5: two per side
    steps: int = 1000  # optimizer steps per stage at most (the held-out guard may stop it earlier)
    lr: float | str = "auto"  # AdamW peak rate, or "auto": the best-landing short probe of each LR_GRID rate
    batch_size: int = 1  # calibration batches per optimizer step (gradients accumulated)
    split: float = 1.0  # share of the batches not held out that train; the least squares fit on all of them
    held_out: float = 0.2  # share of the calibration batches held out: the guard's check and the report
    eval_every: int | str = "auto"  # steps between held-out checks, or "auto" (guard.check_interval); best weights kept
    patience: int = 3  # checks in a row without improvement before the stage stops early
    # global healing after the last stage: steps at most, then a cool-down of two check intervals (0: off, the default:
    # docs/results.md), or "auto": AUTO_HEAL_STEPS where it trains on the model's own trajectory, else off
    heal_steps: int | str = 0
    # how healing trains the kept blocks: "lora" (rank lora_rank, merged after), or "full" (every weight, in float32,
    # its gradient, AdamW's two moments and the guard's copies: about 24 bytes per parameter on top of the model)
    heal_kept: str = "lora"
    # what healing trains on: "trajectory" (the compressed model's own sampling), "calibration" (the batches), or
    # "auto": the trajectory for rectified-flow models without offload, else the calibration
    heal_states: str = "auto"
    target: str = "local"  # "local": original blocks on the span's input; "global": unpruned model's activation
    lora_rank: int = 16  # rank of the LoRA on the span's unreplaced blocks
    lora_alpha: float = 16.0  # LoRA scaling numerator (the update is scaled by alpha / rank)
    lora_targets: tuple[str, ...] | None = None  # module names inside a block; default: the adapter's
    gradient_checkpointing: bool = False  # recompute block activations in the backward (sandwich spans, healing)
    train_surrogates: bool = True  # train the span's linear layers in full; False: they keep their fit (or Y = X)
    # bytes of recorded activations kept in RAM before spilling to disk
    activation_budget: int = field(default=8 * 2**30, metadata=OUTSIDE_KEY)

    def __post_init__(self) -> None:
        if self.width not in WIDTHS:
            raise BlockpruneError(f"sandwich_width must be 1, 3 or 5, got {self.width!r}")
        for name in ("steps", "batch_size", "lora_rank", "patience"):
            positive_int(_sandwich_option(name), getattr(self, name))
        if self.eval_every != "auto":
            positive_int(_sandwich_option("eval_every"), self.eval_every)
        steps = self.heal_steps
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise BlockpruneError(f"heal_steps must be 'auto' or an integer ≥ 0 (0 turns healing off), got {steps!r}")
        if self.lr != "auto":
            positive_number(_sandwich_option("lr"), self.lr)
        for name in ("lora_alpha", "activation_budget"):
            positive_number(_sandwich_option(name), getattr(self, name))
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, numbers.Real) or not 0 < self.held_out < 1:
            raise BlockpruneError(f"sandwich_held_out must be strictly between 0 and 1, got {self.held_out!r}")
        if isinstance(self.split, bool) or not isinstance(self.split, numbers.Real) or not 0 < self.split <= 1:
            raise BlockpruneError(f"sandwich_split must be in (0, 1] (1: every batch not held out trains), got "
                                  f"{self.split!r}")
        for name in ("gradient_checkpointing", "train_surrogates"):
            boolean(_sandwich_option(name), getattr(self, name))
        if self.target not in TARGETS:
            raise BlockpruneError(f"sandwich_target must be 'local' or 'global', got {self.target!r}")
        if self.heal_kept not in HEAL_KEPT:
            raise BlockpruneError(f"heal_kept must be 'lora' (LoRA on the kept blocks) or 'full' (every weight of "
                                  f"them trained), got {self.heal_kept!r}")
        if self.heal_states not in HEAL_STATES:
            raise BlockpruneError(f"heal_states must be 'auto', 'trajectory' (the compressed model's own sampling) or "
                                  f"'calibration' (the calibration batches), got {self.heal_states!r}")
        if self.lora_targets is not None:
            targets = self.lora_targets
            if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
                raise BlockpruneError(
                    f"lora_targets must be a list of module names inside a block, e.g. ['to_q', 'to_v'], got {targets!r}"
                )
            object.__setattr__(self, "lora_targets", tuple(targets))


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``compress`` takes besides the model, adapter, ratio, calibration, order, importance and seed."""

    ridge: float = 1e-6  # λ = ridge · trace(ZᵀZ)/(d+1)
    surrogate: str = "linear"  # a registered surrogate kind: "linear" (BRLL), "identity" (the block deleted)
    record_device: str | None = None  # where the float64 accumulators live; default: the block's device
    # recording calibration from a pipeline (the recorded batches enter the resume key themselves)
    calibration_prompts: tuple[str, ...] | None = field(default=None, metadata=OUTSIDE_KEY)  # default: bundled
    calibration_steps: int = field(default=8, metadata=OUTSIDE_KEY)  # denoising steps per prompt
    steps_per_prompt: int = field(default=2, metadata=OUTSIDE_KEY)  # transformer calls kept per prompt
    # more keyword arguments of the pipeline call: height, width, guidance_scale, max_sequence_length ...
    calibration_call_options: Mapping[str, Any] | None = field(default=None, metadata=OUTSIDE_KEY)
    # the classifier-free guidance scale the model will sample with: the trajectory checks of importance="auto"
    # and of the heal guard step with it (1: unguided). Default: the pipeline's own; unguided without a pipeline
    guidance_scale: float | None = None
    # the denoising steps the model will sample with: importance="auto" re-checks its best plans over this many.
    # Default: the pipeline's own; 28 (diffusers' FLUX.1-dev and SD3 default) without a pipeline
    sampling_steps: int | None = None
    # keep blocks on the CPU, moving each to the device only while it runs or trains
    offload: bool = field(default=False, metadata=OUTSIDE_KEY)
    # with offload on a CUDA GPU: the GPU memory the run may hold (bytes, or "8GiB"); more blocks are prefetched
    # while one runs when they fit. Default: one block ahead.
    max_gpu_memory: int | str | None = field(default=None, metadata=OUTSIDE_KEY)
    # folder for resumable runs: scores and finished stages are written there atomically
    workdir: str | os.PathLike | None = field(default=None, metadata=OUTSIDE_KEY)
    # keep spilled activation shards in the workdir after their stage
    keep_activations: bool = field(default=False, metadata=OUTSIDE_KEY)
    # a folder or compressed model of a higher-ratio run: assemble from it, no training
    reuse_from: Any = field(default=None, metadata=OUTSIDE_KEY)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    sandwich: SandwichConfig = field(default_factory=SandwichConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, numbers.Real) or not (
            self.ridge >= 0 and math.isfinite(self.ridge)
        ):
            raise BlockpruneError(f"ridge must be a finite number ≥ 0 (1e-6 by default), got {self.ridge!r}")
        if not isinstance(self.surrogate, str):
            raise BlockpruneError(f"surrogate must be the name of a surrogate kind, got {self.surrogate!r}")
        for name in ("calibration_steps", "steps_per_prompt"):
            positive_int(name, getattr(self, name))
        for name in ("offload", "keep_activations"):
            boolean(name, getattr(self, name))
        cfg_scale(self.guidance_scale)
        if self.sampling_steps is not None:
            positive_int("sampling_steps", self.sampling_steps)
        folder("workdir", self.workdir)
        if self.offload and self.sandwich.heal_steps not in (0, "auto") and self.sandwich.heal_kept == "full":
            raise BlockpruneError("heal_kept='full' trains every weight of the kept blocks, which offload=True does not "
                                  "hold on the GPU: use heal_kept='lora' with offload")
        if self.offload and self.sandwich.heal_steps and self.sandwich.heal_states == "trajectory":
            auto = (" and a number of heal_steps (100, say: heal_steps='auto' does not heal under offload), or drop "
                    "heal_states to compress without healing") if self.sandwich.heal_steps == "auto" else ""
            raise BlockpruneError("heal_states='trajectory' puts the unpruned blocks back on the GPU for its targets, "
                                  f"which offload=True does not hold: use heal_states='calibration' with offload{auto}")
        if self.max_gpu_memory is not None:
            if not self.offload:
                raise BlockpruneError("max_gpu_memory bounds what offload=True keeps on the GPU; pass offload=True "
                                      "with it, or drop max_gpu_memory (without offload the whole model sits there)")
            object.__setattr__(self, "max_gpu_memory", memory_size("max_gpu_memory", self.max_gpu_memory))
        if self.calibration_prompts is not None:
            prompts = self.calibration_prompts
            if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
                raise BlockpruneError(f"calibration_prompts must be a non-empty list of prompts, got {prompts!r}")
            object.__setattr__(self, "calibration_prompts", tuple(prompts))
        if self.calibration_call_options is not None:
            object.__setattr__(self, "calibration_call_options", check_call_options(self.calibration_call_options))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], base: CompressConfig | None = None) -> CompressConfig:
        """``base`` (default: the defaults) with the keyword options of ``compress`` applied.

        An unknown option is an error that names the closest valid one.
        """
        base = base if base is not None else cls()
        check_option_names(options)
        own = {f.name for f in fields(cls)} - {"scoring", "sandwich"}
        scoring = {f.name for f in fields(ScoringConfig)}
        sandwich = {_sandwich_option(f.name): f.name for f in fields(SandwichConfig)}
        given = {k: v for k, v in options.items() if v is not None}
        return replace(
            base,
            **{k: v for k, v in given.items() if k in own},
            scoring=replace(base.scoring, **{k: v for k, v in given.items() if k in scoring}),
            sandwich=replace(base.sandwich, **{sandwich[k]: v for k, v in given.items() if k in sandwich}),
        )

    def resume_key(self, sandwich: bool) -> dict[str, Any]:
        """The fields that decide the result, JSON-ready (the work directory's key)."""
        from .runtime.fingerprint import value_fingerprint

        def kept(config: Any) -> dict[str, Any]:
            return {f.name: getattr(config, f.name) for f in fields(config)
                    if f.metadata.get("resume_key", True) and f.name not in ("scoring", "sandwich")}

        scoring = kept(self.scoring)
        scoring["metric_options"] = value_fingerprint(dict(self.scoring.metric_options or {}))
        return {**kept(self), "scoring": scoring, "sandwich": kept(self.sandwich) if sandwich else None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the settings (objects such as ``reuse_from`` models or metric helpers by name)."""
        return _json_ready(asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return type(value).__name__


# what the adapter's call_pipeline passes the pipeline itself, with the option that sets it (if any)
def _sandwich_option(name: str) -> str:
    return name if name.startswith(("lora_", "heal_")) else f"sandwich_{name}"


def option_names() -> list[str]:
    """Every keyword option of ``compress`` / ``importance``, in documentation order."""
    own = [f.name for f in fields(CompressConfig) if f.name not in ("scoring", "sandwich")]
    return own + [f.name for f in fields(ScoringConfig)] + [_sandwich_option(f.name) for f in fields(SandwichConfig)]


def sandwich_option_names() -> list[str]:
    """The keyword options that configure sandwich training (``sandwich_*`` and ``lora_*``)."""
    return [_sandwich_option(f.name) for f in fields(SandwichConfig)]


def check_option_names(options: Mapping[str, Any]) -> None:
    """Refuse an unknown option name, naming the closest valid one."""
    known = option_names()
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BlockpruneError(f"unknown option {name!r}; {hint}options: {', '.join(known)}")


def defaults() -> dict[str, Any]:
    """Each keyword option's default value."""
    config = CompressConfig()
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("scoring", "sandwich")}
    values.update({f.name: getattr(config.scoring, f.name) for f in fields(ScoringConfig)})
    values.update({_sandwich_option(f.name): getattr(config.sandwich, f.name) for f in fields(SandwichConfig)})
    return values
