"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL) with sandwich training."""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from .adapter import Block
from .blocks import set_submodule
from .errors import BlockpruneError
from .flops import count_flops, count_parameters
from .metrics import resolve_metrics
from .plan import PLAN_ATTRIBUTE, Plan, transformer_of
from .ranking import score_run
from .replacement import replace_block
from .report import print_plan, progress_bars
from .run import Run, check_options, prepare_run
from .sandwich import SandwichOptions, StageLog, run_stage
from .sandwich.reuse import LOG_ATTRIBUTE, assemble
from .sandwich.stage import SandwichDivergedError

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


def split_batches(batches: list[dict], share: float, held_out: float, seed: int) -> tuple[list, list, list]:
    """(least-squares, training, held-out) batches: a seeded shuffle cut by ``share`` and ``held_out``."""
    if len(batches) < 3:
        raise BlockpruneError(
            f"sandwich training needs at least 3 calibration batches (least squares, training, held-out), got "
            f"{len(batches)}; pass more batches or sandwich=False"
        )
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    training = min(max(2, round(share * len(batches))), len(batches) - 1)
    held = min(max(1, round(held_out * training)), training - 1)
    pick = lambda indices: [batches[i] for i in sorted(indices)]  # noqa: E731
    ls, train = order[: len(batches) - training], order[len(batches) - training :]
    return pick(ls), pick(train[:-held]), pick(train[-held:])


def _replace_all(run: Run, names_in_order, count, importance, sandwich: SandwichOptions | None, seed, result, log, bars):
    transformer, options = run.transformer, run.options
    if sandwich is None:
        ls_batches, train, held = run.batches, [], []
    else:
        ls_batches, train, held = split_batches(run.batches, sandwich.split, sandwich.held_out, seed)
    by_name = {b.name: b for b in run.blocks}
    remaining = list(run.blocks)
    replaced: set[str] = set()
    originals: dict[str, torch.nn.Module] = {}
    task = bars.add_task("replacing blocks" + (" + sandwich training" if sandwich else ""), total=count)
    table = None
    for step in range(count):
        if names_in_order is not None:
            name = names_in_order[step]
        else:
            if step == 0 or options["rescore"] == "each":
                table = score_run(run, importance, remaining, bars)
                if step == 0:
                    result.metric_values, result.scores = table.values, table.scores
            name = table.order[0] if options["rescore"] == "each" else table.order[step]
        if sandwich is not None:
            originals[name] = copy.deepcopy(transformer.get_submodule(name)).to("cpu")
        entry = replace_block(transformer, by_name[name], ls_batches, options["ridge"], options["record_device"])
        entry.score = table.scores[name] if table is not None else None
        replaced.add(name)
        if sandwich is not None:
            try:
                report, trained, lora = run_stage(transformer, run.adapter, run.blocks, replaced, name, train, held,
                                                  originals, sandwich, seed + step)
            except SandwichDivergedError:
                original = originals[name]
                device = next(transformer.parameters()).device
                set_submodule(transformer, name, original.to(device))
                raise
            result.stages.append(report)
            log.surrogates.append(trained)
            log.lora.append(lora)
            log.blocks.append(name)
            logger.info("sandwich %s: held-out span error %.4g → %.4g", "+".join(report.span),
                        report.relative_error_before, report.relative_error_after)
        result.replaced.append(entry)
        remaining = [b for b in remaining if b.name != name]
        logger.info("replaced %s (fit errors %s)", name, {s: r.relative_error for s, r in entry.streams.items()})
        bars.advance(task)


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
    activations of the model as it is after the earlier replacements; with ``sandwich`` each replacement
    is followed by sandwich training of its span. Keyword options: see ``blockprune.run.OPTIONS``.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    checked = check_options(options)
    sandwich_options = SandwichOptions.from_options(checked) if sandwich else None
    if hasattr(transformer, PLAN_ATTRIBUTE):
        raise BlockpruneError("this model is already compressed; compress the original model instead")
    reuse_from = checked["reuse_from"]
    weights = resolve_metrics(importance)[0] if order == "importance" and reuse_from is None else {}
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
    result.sandwich = asdict(sandwich_options) if sandwich_options else {}
    result.params_before = count_parameters(transformer)
    result.flops_before = count_flops(transformer, run.batches[0])
    log = StageLog()
    if reuse_from is not None:
        higher, log = assemble(transformer, blocks, count, reuse_from)
        result.replaced, result.stages = higher.replaced[:count], higher.stages[:count]
        result.scores, result.metric_values, result.sandwich = higher.scores, higher.metric_values, higher.sandwich
        result.reused_from = str(reuse_from) if not hasattr(reuse_from, "parameters") else type(reuse_from).__name__
    else:
        try:
            with progress_bars(progress) as bars:
                _replace_all(run, fixed, count, importance, sandwich_options, seed, result, log, bars)
        except SandwichDivergedError:
            if result.replaced:  # the stages before the failed one stay done, with their plan
                _finish(transformer, result, log, run.batches[0], progress=False)
            raise
    _finish(transformer, result, log, run.batches[0], progress)
    return model


def _finish(transformer: torch.nn.Module, result: Plan, log: StageLog, batch: dict, progress: bool) -> None:
    result.params_after = count_parameters(transformer)
    result.flops_after = count_flops(transformer, batch)
    setattr(transformer, PLAN_ATTRIBUTE, result)
    setattr(transformer, LOG_ATTRIBUTE, log)
    if progress:
        print_plan(result)
