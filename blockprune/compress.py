"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL) with sandwich training."""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import torch

from . import __version__, distributed
from .adapter import Block
from .errors import BlockpruneError
from .fingerprint import data_fingerprint, model_fingerprint, value_fingerprint
from .flops import block_flops, count_flops, count_parameters
from .metrics import resolve_metrics
from .plan import PLAN_ATTRIBUTE, Plan, transformer_of
from .progressive import InterruptGuard, Progressive
from .report import print_plan, progress_bars
from .run import Run, check_options, prepare_run
from .sandwich import SandwichOptions, StageLog
from .sandwich.reuse import LOG_ATTRIBUTE, assemble
from .workdir import Workdir

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


def _workdir(run: Run, ratio: float, order: Any, weights: dict, sandwich: SandwichOptions | None, seed: int) -> Workdir:
    options = run.options
    sandwich_key = {k: v for k, v in asdict(sandwich).items() if k != "activation_budget"} if sandwich else None
    key = {
        "blockprune": __version__,
        "model": model_fingerprint(run.transformer),
        "data": data_fingerprint(run.batches),
        "device": str(next(run.transformer.parameters()).device),
        "adapter": run.adapter.name,
        "ratio": ratio,
        "order": order,
        "importance": weights,
        "sandwich": sandwich_key,
        "seed": seed,
        **{k: options[k] for k in ("ridge", "surrogate", "record_device", "score_batches", "ablation", "rescore")},
        "metric_options": value_fingerprint(options["metric_options"] or {}),
    }
    if distributed.is_main():
        workdir = Workdir(options["workdir"], key)
    distributed.barrier()  # rank 0 creates the workdir; the others only read it
    return workdir if distributed.is_main() else Workdir(options["workdir"], key, writer=False)


def compress(
    model: Any,
    adapter: str = "auto",
    ratio: float = 0.2,
    calibration: Any = None,
    *,
    order: str | list[str] = "importance",
    importance: str | list[str] | Mapping[str, float] = "fit_residual",
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
    is followed by sandwich training of its span. With ``workdir=`` finished work is saved as it goes and
    the same call resumes after an interruption. Keyword options: see ``blockprune.run.OPTIONS``.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    checked = check_options(options)
    distributed.init_from_environment()
    device = device if device is not None else distributed.default_device()
    progress = progress and distributed.is_main()
    sandwich_options = SandwichOptions.from_options(checked) if sandwich else None
    if sandwich_options is not None and checked["surrogate"] == "identity":  # deleted blocks stay deleted
        sandwich_options = replace(sandwich_options, train_surrogates=False)
    if hasattr(transformer, PLAN_ATTRIBUTE):
        raise BlockpruneError("this model is already compressed; compress the original model instead")
    reuse_from = checked["reuse_from"]
    weights = resolve_metrics(importance)[0] if order == "importance" and reuse_from is None else {}
    torch.manual_seed(seed)
    with contextlib.ExitStack() as stack:
        run = prepare_run(model, adapter, calibration, device, options, stack)
        _compress_run(run, ratio, order, importance, weights, sandwich_options, seed, progress, checked)
    return model


def _compress_run(run: Run, ratio, order, importance, weights, sandwich_options, seed, progress, checked) -> None:
    """Choose and replace the blocks of a prepared run (or assemble them with ``reuse_from``)."""
    transformer = run.transformer
    reuse_from = checked["reuse_from"]
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
    result.surrogate = checked["surrogate"]
    result.params_before = count_parameters(transformer)
    result.flops_before = count_flops(transformer, run.batches[0])
    flops_of_block = block_flops(transformer, [b.name for b in blocks], run.batches[0])
    log = StageLog()
    if reuse_from is not None:
        higher, log = assemble(transformer, blocks, count, reuse_from)
        result.replaced, result.stages = higher.replaced[:count], higher.stages[:count]
        result.scores, result.metric_values, result.sandwich = higher.scores, higher.metric_values, higher.sandwich
        result.surrogate = higher.surrogate
        result.reused_from = str(reuse_from) if not hasattr(reuse_from, "parameters") else type(reuse_from).__name__
    else:
        workdir = _workdir(run, ratio, order, weights, sandwich_options, seed) if checked["workdir"] else None
        loop = Progressive(run, fixed, count, importance, sandwich_options, seed, result, log, workdir,
                           checked["keep_activations"])
        try:
            with InterruptGuard() as guard, progress_bars(progress) as bars:
                loop.execute(bars, guard)
        except BaseException:
            if result.replaced:  # the finished stages stay done, with their plan
                _finish(transformer, result, log, run.batches[0], flops_of_block)
            raise
        finally:
            if workdir is not None:
                result.workdir_bytes = workdir.disk_usage()
                logger.info("workdir %s uses %.1f MB", workdir.path, result.workdir_bytes / 1e6)
    _finish(transformer, result, log, run.batches[0], flops_of_block)
    if progress:
        print_plan(result)


def _finish(transformer: torch.nn.Module, result: Plan, log: StageLog, batch: dict, flops_of_block: dict) -> None:
    result.params_after = count_parameters(transformer)
    result.flops_after = count_flops(transformer, batch)
    # new entries: with reuse_from they would otherwise be the source plan's own
    result.replaced = [replace(entry, flops=flops_of_block.get(entry.name)) for entry in result.replaced]
    setattr(transformer, PLAN_ATTRIBUTE, result)
    setattr(transformer, LOG_ATTRIBUTE, log)
