"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL)."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from .adapter import Block
from .errors import BlockpruneError
from .flops import block_flops, count_flops, count_parameters
from .ranking import score_run
from .metrics import resolve_metrics
from .plan import PLAN_ATTRIBUTE, Plan, transformer_of
from .replacement import replace_block
from .report import print_plan, progress_bars
from .run import check_options, prepare_run

logger = logging.getLogger("blockprune")

ORDERS = ("importance", "start2end", "end2start")


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
        raise BlockpruneError(f"ratio must be a number strictly between 0 and 1 (the share of blocks to replace), got {ratio!r}")
    return float(ratio)


def block_order(blocks: list[Block], order: str | list[str]) -> list[str]:
    """Block names in a fixed replacement order: data flow, reverse data flow, or as listed."""
    names = [b.name for b in blocks]
    if order == "start2end":
        return names
    if order == "end2start":
        return names[::-1]
    if isinstance(order, str):
        raise BlockpruneError(f"unknown order {order!r}; use one of {', '.join(ORDERS)} or a list of block names")
    listed = list(order)
    for name in listed:
        if name not in names:
            raise BlockpruneError(f"order names block {name!r}, which does not exist; blocks: {', '.join(names)}")
    if len(set(listed)) != len(listed):
        raise BlockpruneError("order names a block more than once")
    return listed


def compress(
    model: Any,
    adapter: str = "auto",
    ratio: float = 0.2,
    calibration: Any = None,
    *,
    order: str | list[str] = "importance",
    importance: str | list[str] | Mapping[str, float] = "output_mse",
    sandwich: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> Any:
    """Replace ``round(ratio × blocks)`` residual blocks by fitted linear layers, in place; return ``model``.

    ``model`` is a diffusers transformer or a pipeline holding one as ``.transformer``. ``calibration``
    is a list of dicts of keyword arguments for the transformer's forward; with a pipeline it may be
    left out and is then recorded from the pipeline on bundled prompts. Blocks are replaced one at a
    time in ``order`` (``"importance"`` ranks them by the ``importance`` metrics), each fitted on
    activations of the model as it is after the earlier replacements. Keyword options: see
    ``blockprune.run.OPTIONS``.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    check_options(options)
    if sandwich:
        raise NotImplementedError(
            "sandwich training is not implemented yet; pass sandwich=False to replace blocks by least squares alone"
        )
    if hasattr(transformer, PLAN_ATTRIBUTE):
        raise BlockpruneError("this model is already compressed; compress the original model instead")
    weights = resolve_metrics(importance)[0] if order == "importance" else {}
    torch.manual_seed(seed)
    run = prepare_run(model, adapter, calibration, device, options)
    blocks = run.blocks
    count = round(ratio * len(blocks))
    if count == 0:
        raise BlockpruneError(
            f"ratio {ratio} of {len(blocks)} blocks rounds to 0 blocks; use ratio ≥ {0.5 / len(blocks):.3f}"
        )
    fixed = None if order == "importance" else block_order(blocks, order)
    if fixed is not None and len(fixed) < count:
        raise BlockpruneError(f"order lists {len(fixed)} blocks but ratio {ratio} replaces {count}; list more blocks")
    result = Plan(run.adapter.name, ratio, order, [b.name for b in blocks], seed=seed, importance=dict(weights))
    result.params_before = count_parameters(transformer)
    result.flops_before = count_flops(transformer, run.batches[0])
    flops_of_block = block_flops(transformer, [b.name for b in blocks], run.batches[0])
    by_name = {b.name: b for b in blocks}
    remaining = list(blocks)
    with progress_bars(progress) as bars:
        task = bars.add_task("replacing blocks", total=count)
        for step in range(count):
            if fixed is not None:
                name = fixed[step]
            else:
                if step == 0 or run.options["rescore"] == "each":
                    table = score_run(run, importance, remaining, bars)
                    ranking = table.order
                    if step == 0:
                        result.metric_values, result.scores = table.values, table.scores
                name = ranking[0] if run.options["rescore"] == "each" else ranking[step]
            replaced = replace_block(transformer, by_name[name], run.batches, run.options["ridge"],
                                     run.options["record_device"])
            replaced.score = table.scores[name] if fixed is None else None
            replaced.flops = flops_of_block.get(name)
            result.replaced.append(replaced)
            remaining = [b for b in remaining if b.name != name]
            logger.info("replaced %s (fit errors %s)", name, {s: r.relative_error for s, r in replaced.streams.items()})
            bars.advance(task)
    result.params_after = count_parameters(transformer)
    result.flops_after = count_flops(transformer, run.batches[0])
    setattr(transformer, PLAN_ATTRIBUTE, result)
    if progress:
        print_plan(result)
    return model
