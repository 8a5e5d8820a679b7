"""The compression plan: what was replaced, why, and what it saved. Kept on the model and saved with it."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BlockpruneError

PLAN_ATTRIBUTE = "_blockprune_plan"


@dataclass
class StreamReport:
    """Least-squares diagnostics for one stream of a replaced block."""

    dim: int
    relative_error: float
    condition_number: float
    tokens: int
    flops: int | None = None  # of the affine map, on the batch the plan's FLOPs were counted on


@dataclass
class ReplacedBlock:
    """One replaced block: its path, class, stream spec and fit diagnostics."""

    name: str
    kind: str
    spec: dict[str, Any]
    streams: dict[str, StreamReport]
    score: float | None = None
    flops: int | None = None  # of the original block, on the batch the plan's FLOPs were counted on


@dataclass
class FusedRun:
    """Consecutive replaced blocks whose maps for ``stream`` were composed into one, carried by ``blocks[0]``."""

    stream: str
    blocks: list[str]


@dataclass
class Plan:
    """Replaced blocks in order, per-block scores and fit errors, parameter and FLOP counts before and after, and
    the runs that :func:`blockprune.fuse` collapsed."""

    adapter: str
    ratio: float
    order: str | list[str]
    blocks: list[str]
    replaced: list[ReplacedBlock] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    metric_values: dict[str, dict[str, float]] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    seed: int = 0
    stages: list[StageReport] = field(default_factory=list)
    sandwich: dict[str, Any] = field(default_factory=dict)
    reused_from: str | None = None
    workdir_bytes: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase of this call
    fused: list[FusedRun] = field(default_factory=list)
    surrogate: str = "linear"  # "identity": the blocks were deleted (Y = X), not fitted
    config: dict[str, Any] = field(default_factory=dict)  # the run's CompressConfig, JSON-ready
    # importance="auto": every candidate plan's held-out output error, and the one chosen
    selection: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str | None = None  # of the model before compression: reuse_from refuses another model
    heal: dict[str, Any] = field(default_factory=dict)  # global healing's report (HealReport fields), if it ran
    # offload=True: block runs per phase whose weights were prefetched ("scoring.ahead") or copied on the spot
    offload_visits: dict[str, int] = field(default_factory=dict)

    @property
    def replaced_names(self) -> list[str]:
        """Names of the replaced blocks, in replacement order."""
        return [r.name for r in self.replaced]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The inverse of :meth:`to_dict`."""
        data = dict(data)
        data["replaced"] = [
            ReplacedBlock(**{**r, "streams": {s: StreamReport(**v) for s, v in r["streams"].items()}})
            for r in data.get("replaced", [])
        ]
        data["stages"] = [StageReport(**stage) for stage in data.get("stages", [])]
        data["fused"] = [FusedRun(**run) for run in data.get("fused", [])]
        return cls(**data)


def transformer_of(model: Any) -> nn.Module:
    """The transformer itself, given a transformer or a diffusers pipeline holding one as ``.transformer``; a
    ``torch.compile``d one gives the model it wraps."""
    transformer = model if isinstance(model, nn.Module) else getattr(model, "transformer", None)
    compiled = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if compiled is not None and isinstance(transformer, compiled.OptimizedModule):
        transformer = transformer._orig_mod
    if isinstance(transformer, nn.Module):
        return transformer
    raise BlockpruneError(
        f"expected a torch model or a diffusers pipeline with a .transformer, got {type(model).__name__}"
    )


def plan(model: Any) -> Plan:
    """The plan of a model (or pipeline) compressed by :func:`blockprune.compress` or loaded by ``from_pretrained``."""
    found = getattr(transformer_of(model), PLAN_ATTRIBUTE, None)
    if found is None:
        raise BlockpruneError(f"{type(model).__name__} was not compressed by blockprune; it has no plan")
    return found


@dataclass
class StageReport:
    """What one stage trained and how the span's error changed on the held-out batches."""

    block: str
    span: list[str]
    lora_blocks: list[str]
    trained_surrogates: list[str]
    steps: int
    loss_before: float
    loss_after: float
    relative_error_before: float
    relative_error_after: float
    seconds: float
    peak_memory_bytes: int | None
    spilled_items: int = 0
    train_seconds: float = 0.0
    best_step: int | None = None  # the step whose weights were kept; 0: training never beat the start
    steps_run: int | None = None  # steps trained before the early stop (probes of other rates not counted)
    lr: float | None = None  # the peak rate the kept weights trained at (lr="auto": the probe's winner); None if reverted
    lr_errors: dict[str, float] = field(default_factory=dict)  # lr="auto": held-out error after each rate's probe

    @property
    def reverted(self) -> bool:
        """Whether training never beat the stage's starting weights, which were therefore kept."""
        return self.best_step == 0


@dataclass
class StageLog:
    """Every stage's trained components: surrogate weights and LoRA factors, on CPU, for reuse."""

    surrogates: list[dict[str, dict[str, dict[str, torch.Tensor]]]] = field(default_factory=list)
    lora: list[dict[str, dict[str, dict[str, torch.Tensor]]]] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
