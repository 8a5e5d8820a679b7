"""``fuse``: runs of consecutive replaced blocks collapse into one affine map per stream."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import plugins
from ..discovery.flops import count_parameters
from ..discovery.spec import BlockSpec
from ..errors import BlockpruneError
from ..plan import FusedRun, Plan, plan, transformer_of
from .surrogate import LinearSurrogate

logger = logging.getLogger("blockprune")


def fusible_runs(compressed: Plan) -> list[FusedRun]:
    """Per stream, every maximal run of two or more replaced blocks that follow each other in data-flow order
    and all carry the stream; a kept block, or a block without the stream (SD3's last block for the text),
    ends a run."""
    specs = {r.name: BlockSpec.from_dict(r.spec) for r in compressed.replaced}
    streams = list(dict.fromkeys(s for spec in specs.values() for s in spec.streams))
    runs = []
    for stream in streams:
        current: list[str] = []
        for name in [*compressed.blocks, None]:  # None closes the last run
            if name in specs and stream in specs[name].streams:
                current.append(name)
                continue
            if len(current) > 1:
                runs.append(FusedRun(stream, current))
            current = []
    return runs


def compose_affine(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``x + W'x + b'`` equal to applying every ``x ↦ x + W x + b`` in ``maps`` in turn.

    Two maps compose as ``W' = W1 + W2 + W2·W1``, ``b' = b1 + W2·b1 + b2``; the result is float64.
    """
    weight, bias = (t.detach().double() for t in maps[0])
    for next_weight, next_bias in maps[1:]:
        next_weight, next_bias = next_weight.detach().double(), next_bias.detach().double()
        weight, bias = weight + next_weight + next_weight @ weight, bias + next_weight @ bias + next_bias
    return weight, bias


def _surrogate(transformer: nn.Module, name: str) -> LinearSurrogate:
    module = transformer.get_submodule(name)
    if not isinstance(module, LinearSurrogate):
        raise BlockpruneError(
            f"the plan says {name} was replaced, but the model holds a {type(module).__name__} there; "
            f"fuse only models made by blockprune.compress or blockprune.from_pretrained"
        )
    return module


def fuse(model: Any) -> Any:
    """Collapse runs of consecutive replaced blocks into one affine map per stream, in place; return ``model``.

    The first surrogate of a run carries the composed map (computed in float64, stored in the model's
    dtype); the others pass the stream through unchanged, with no matmul. The output equals the unfused
    chain's up to float rounding. The runs are recorded in the plan (``plan(model).fused``) and so in
    ``blockprune.json``. Fusing an already fused model changes nothing. Fusion is irreversible: keep the
    unfused model to retrain or reuse its per-block maps. It assumes the host model passes each stream
    from block to block unchanged (no ControlNet residuals, no skipped layers), which the adapter declares
    with ``chains_streams_by_name``.
    """
    transformer = transformer_of(model)
    compressed = plan(transformer)
    adapter = plugins.get_adapter(transformer, compressed.adapter)
    if not adapter.chains_streams_by_name:
        raise BlockpruneError(
            f"the {adapter.name!r} adapter does not declare that {type(transformer).__name__} passes each stream "
            f"unchanged from one block to the next under the same name (Adapter.chains_streams_by_name), so fusing "
            f"could change the model's output; use the model unfused, or an adapter that declares it"
        )
    if compressed.fused:
        logger.info("the model is already fused; nothing to do")
        return model
    runs = fusible_runs(compressed)
    reports = {r.name: r for r in compressed.replaced}
    saved_flops: int | None = 0
    for run in runs:
        surrogates = [_surrogate(transformer, name) for name in run.blocks]
        weight, bias = compose_affine([(s.linears[run.stream].weight, s.linears[run.stream].bias) for s in surrogates])
        surrogates[0].set_affine(run.stream, weight, bias)
        for name, surrogate in zip(run.blocks[1:], surrogates[1:]):
            del surrogate.linears[run.stream]
            flops = reports[name].streams[run.stream].flops
            saved_flops = None if flops is None or saved_flops is None else saved_flops + flops
        logger.info("fused %s of %s", run.stream, ", ".join(run.blocks))
    compressed.fused = runs
    compressed.params_after = count_parameters(transformer)
    if compressed.flops_after is not None:
        compressed.flops_after = None if saved_flops is None else compressed.flops_after - saved_flops
    return model
