"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL) with sandwich training."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import torch

from . import plugins
from ._version import __version__
from .config import CompressConfig, SandwichConfig
from .discovery.flops import block_flops, count_flops, count_parameters
from .discovery.spec import Block
from .errors import BlockpruneError
from .native import attach_save_method, refuse_unfused_lora
from .plan import PLAN_ATTRIBUTE, Plan, StageLog, transformer_of
from .progress import mark_cached, progress_bars
from .progressive import Progressive
from .report import output_console, print_plan
from .run import Run, prepare_run
from .runtime import distributed
from .runtime.fingerprint import data_fingerprint, model_fingerprint
from .runtime.forward import evaluation_mode, model_device
from .runtime.interrupt import InterruptGuard
from .runtime.workdir import Workdir
from .sandwich.heal_states import resolve_heal_steps
from .sandwich.reuse import LOG_ATTRIBUTE, assemble
from .scoring import resolve_metrics
from .scoring.auto import AUTO
from .scoring.guidance import check_guidance_source
from .scoring.selection import ImportanceTable, score_run
from .unused_options import (
    given_options,
    warn_unused_healing,
    warn_unused_in_compress,
    warn_unused_in_importance,
)

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


def _workdir(run: Run, result: Plan, sandwich: SandwichConfig | None) -> Workdir:
    key = {
        "blockprune": __version__,
        "model": result.model_fingerprint,
        "data": data_fingerprint(run.batches),
        "device": str(model_device(run.transformer)),
        "adapter": run.adapter.name,
        "ratio": result.ratio,
        "order": result.order,
        "importance": result.importance,
        "seed": result.seed,
        **run.config.resume_key(sandwich=sandwich is not None),
        "guidance_scale": run.guidance_scale,  # the scale the checks step with, wherever it came from
        "sampling_steps": run.sampling_steps,  # the steps auto's final check takes, wherever they came from
        "heal_steps": sandwich.heal_steps if sandwich else 0,  # "auto" settled (it depends on offload, outside the key)
    }
    folder = run.config.workdir
    if distributed.is_main():
        workdir = Workdir(folder, key)
    distributed.barrier()  # rank 0 creates the workdir; the others only read it
    return workdir if distributed.is_main() else Workdir(folder, key, writer=False)


def compress(
    model: Any,
    adapter: str = "auto",
    ratio: float = 0.2,
    calibration: Any = None,
    *,
    order: str | list[str] = "importance",
    importance: str | list[str] | Mapping[str, float] = "auto",
    sandwich: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    config: CompressConfig | None = None,
    **options: Any,
) -> Any:
    """Replace ``round(ratio × blocks)`` residual blocks by fitted linear layers, in place; return ``model``.

    ``model`` is a diffusers transformer or a pipeline holding one as ``.transformer``. ``calibration``
    is a list of dicts of keyword arguments for the transformer's forward; with a pipeline it may be
    left out and is then recorded from the pipeline on bundled prompts. Blocks are replaced one at a
    time in ``order`` (``"importance"`` ranks them by the ``importance`` metrics; the default ``"auto"`` builds
    candidate plans from several metrics and fixed orders and keeps the one closest to the intact model on
    held-out calibration, checked over several denoising steps: :mod:`blockprune.scoring.auto`), each fitted on
    activations of the model as it is after the earlier replacements; with ``sandwich`` each replacement
    is followed by sandwich training of its span. With ``workdir=`` finished work is saved as it goes and
    the same call resumes after an interruption. Other settings come as a :class:`~blockprune.CompressConfig`
    (``config=``) or as its fields by keyword (``ridge=``, ``ablation=``, ``sandwich_steps=``, ``lora_rank=`` ...),
    keywords overriding the config's.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BlockpruneError(f"seed must be an integer, got {seed!r}")
    settings = CompressConfig.from_options(options, base=config)
    kind = plugins.get_surrogate(settings.surrogate)
    distributed.init_from_environment()
    device = device if device is not None else distributed.default_device()
    progress = progress and distributed.is_main()
    if not kind.trainable:  # e.g. deleted blocks stay deleted
        settings = replace(settings, sandwich=replace(settings.sandwich, train_surrogates=False))
    sandwich_config = settings.sandwich if sandwich else None
    if hasattr(transformer, PLAN_ATTRIBUTE):
        raise BlockpruneError("this model is already compressed; compress the original model instead")
    refuse_unfused_lora(transformer)
    weights = _importance_weights(importance, order, settings)
    given = given_options(options)
    warn_unused_in_compress(given, settings, sandwich=sandwich, order=order, importance=importance,
                            recording=calibration is None and model is not transformer, trainable=kind.trainable)
    torch.manual_seed(seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluation_mode(transformer))  # no dropout; the caller's modes come back after
        check_guidance_source(settings.guidance_scale, None if model is transformer else model)
        run = prepare_run(model, adapter, calibration, device, settings, stack, progress=progress)
        sandwich_config = _settle_healing(sandwich_config, run, given)
        result = Plan(run.adapter.name, ratio, order, [b.name for b in run.blocks], seed=seed, importance=dict(weights))
        result.sandwich = asdict(sandwich_config) if sandwich_config else {}
        result.surrogate = settings.surrogate
        result.config = settings.to_dict()
        _compress_run(run, result, importance, sandwich_config, progress)
    return model


def _settle_healing(sandwich: SandwichConfig | None, run: Run, given: list[str]) -> SandwichConfig | None:
    """``sandwich`` with ``heal_steps="auto"`` settled for this model and run, warning about heal options left unused."""
    if sandwich is None:
        return None
    settled = resolve_heal_steps(sandwich, run.adapter, run.offload is not None)
    warn_unused_healing(given, sandwich, settled)
    return settled


def _importance_weights(importance: Any, order: Any, settings: CompressConfig) -> dict[str, float]:
    """The metric weights the plan records (``{"auto": 1.0}`` for a validated selection); bad names fail here."""
    _check_weights(importance)
    if order != "importance" or settings.reuse_from is not None:
        return {}
    if isinstance(importance, str) and importance == AUTO:
        if settings.scoring.rescore == "each":
            raise BlockpruneError(
                "importance='auto' chooses the whole plan at once and cannot rescore='each'; use rescore='once', "
                "or name a metric, e.g. importance='output_mse'"
            )
        return {AUTO: 1.0}
    return resolve_metrics(importance)[0]


def _check_weights(importance: Any) -> None:
    """Each weight of an ``importance={name: weight}`` dict is a finite number ≥ 0 (inf gave NaN scores)."""
    if isinstance(importance, Mapping):
        for name, weight in importance.items():
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (
                    weight >= 0 and math.isfinite(weight)):
                raise BlockpruneError(
                    f"importance weight of {name!r} is {weight!r}; each weight must be a finite number ≥ 0, "
                    f"e.g. importance={{'fid': 0.5, 'clip': 0.5}}"
                )


def _compress_run(run: Run, result: Plan, importance: Any, sandwich: SandwichConfig | None, progress: bool) -> None:
    """Choose and replace the blocks of a prepared run (or assemble them with ``reuse_from``) into ``result``."""
    transformer, blocks = run.transformer, run.blocks
    count = round(result.ratio * len(blocks))
    if count == 0:
        raise BlockpruneError(
            f"ratio {result.ratio} of {len(blocks)} blocks rounds to 0 blocks; use ratio ≥ {0.5 / len(blocks):.3f}"
        )
    fixed = None if result.order == "importance" else block_order(blocks, result.order)
    if fixed is not None and len(fixed) < count:
        raise BlockpruneError(
            f"order lists {len(fixed)} blocks but ratio {result.ratio} replaces {count}; list more blocks")
    result.params_before = count_parameters(transformer)
    result.model_fingerprint = model_fingerprint(transformer)  # before any change: reuse_from checks it
    with progress_bars(progress) as bars:  # two forward passes under torch's FLOP counter
        task = bars.add_task("counting FLOPs (whole model, each block)", total=2)
        result.flops_before = count_flops(transformer, run.batches[0])
        bars.advance(task)
        flops_of_block = block_flops(transformer, [b.name for b in blocks], run.batches[0])
        bars.advance(task)
    reuse_from = run.config.reuse_from
    if reuse_from is not None:
        log = _reuse(run, result, count, reuse_from)
    else:
        log = StageLog()
        workdir = _workdir(run, result, sandwich) if run.config.workdir else None
        loop = Progressive(run, fixed, count, importance, sandwich, result.seed, result, log, workdir,
                           run.config.keep_activations)
        try:
            with InterruptGuard() as guard, progress_bars(progress) as bars:
                loop.execute(bars, guard)
        except BaseException:
            if result.replaced:  # the finished stages stay done, with their plan
                _finish(transformer, result, log, run.batches[0], flops_of_block)
            raise
        finally:
            if workdir is not None:
                workdir.close()
                result.workdir_bytes = workdir.disk_usage()
                logger.info("workdir %s uses %.1f MB", workdir.path, result.workdir_bytes / 1e6)
    _finish(transformer, result, log, run.batches[0], flops_of_block)
    if progress:
        print_plan(result)


def _reuse(run: Run, result: Plan, count: int, reuse_from: Any) -> StageLog:
    """Assemble ``count`` replacements from a higher-ratio run; its plan's entries go into ``result``."""
    higher, log = assemble(run.transformer, run.blocks, count, reuse_from, result.model_fingerprint)
    result.replaced, result.stages = higher.replaced[:count], higher.stages[:count]
    result.scores, result.metric_values, result.sandwich = higher.scores, higher.metric_values, higher.sandwich
    result.surrogate = higher.surrogate
    result.reused_from = str(reuse_from) if not hasattr(reuse_from, "parameters") else type(reuse_from).__name__
    return log


def _finish(transformer: torch.nn.Module, result: Plan, log: StageLog, batch: dict, flops_of_block: dict) -> None:
    result.params_after = count_parameters(transformer)
    result.flops_after = count_flops(transformer, batch)
    # new entries: with reuse_from they would otherwise be the source plan's own
    result.replaced = [replace(entry, flops=flops_of_block.get(entry.name)) for entry in result.replaced]
    setattr(transformer, PLAN_ATTRIBUTE, result)
    setattr(transformer, LOG_ATTRIBUTE, log)
    attach_save_method(transformer)  # model.save_pretrained(folder) writes blockprune's format


def importance(
    model: Any,
    adapter: str = "auto",
    calibration: Any = None,
    *,
    importance: str | list[str] | Mapping[str, float] = "fit_residual",
    progress: bool = True,
    device: str | torch.device | None = None,
    config: CompressConfig | None = None,
    **options: Any,
) -> ImportanceTable:
    """Per-block importance without compressing: each metric's value per block and the combined score.

    Takes the same model, calibration and options as :func:`blockprune.compress`; scores are cached on
    disk, so a later ``compress`` of the same model and data at any ratio costs no scoring.
    """
    if isinstance(importance, str) and importance == AUTO:
        raise BlockpruneError(
            "importance='auto' chooses a plan for a given ratio and so runs inside compress(); to see per-block "
            "scores, name the metrics, e.g. importance=['fit_residual', 'output_mse']"
        )
    _check_weights(importance)
    resolve_metrics(importance)  # bad metric names fail before any work
    settings = CompressConfig.from_options(options, base=config)
    recording = calibration is None and model is not transformer_of(model)
    warn_unused_in_importance(given_options(options), recording=recording)
    distributed.init_from_environment()
    device = device if device is not None else distributed.default_device()
    progress = progress and distributed.is_main()
    with contextlib.ExitStack() as stack:  # holds the offload, if any, until scoring is done
        stack.enter_context(evaluation_mode(transformer_of(model)))  # no dropout; the caller's modes come back after
        run = prepare_run(model, adapter, calibration, device, settings, stack, progress=progress)
        with progress_bars(progress) as bars:
            table = score_run(run, importance, bars=bars)
            mark_cached(bars, set(), table.cached, list(table.values))
    if progress:
        output_console().print(table.table())
    return table
