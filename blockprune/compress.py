"""``compress``: progressive block-wise replacement by fitted linear layers (BRLL) with sandwich training."""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from . import plugins
from ._version import __version__
from .adapter import Adapter
from .calibration import (
    bundled_prompts,
    prepare_calibration,
    record_pipeline_calibration,
)
from .config import SandwichConfig, check_options
from .discovery.flops import block_flops, count_flops, count_parameters
from .discovery.resolve import resolve_blocks
from .discovery.spec import Block
from .errors import BlockpruneError
from .plan import PLAN_ATTRIBUTE, Plan, StageLog, transformer_of
from .progressive import InterruptGuard, Progressive
from .report import output_console, print_plan, progress_bars
from .runtime import distributed
from .runtime.fingerprint import data_fingerprint, model_fingerprint, value_fingerprint
from .runtime.offload import Offload
from .runtime.workdir import Workdir
from .sandwich.reuse import LOG_ATTRIBUTE, assemble
from .scoring import resolve_metrics
from .scoring.selection import ImportanceTable, score_run

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


def _workdir(run: Run, ratio: float, order: Any, weights: dict, sandwich: SandwichConfig | None, seed: int) -> Workdir:
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
    the same call resumes after an interruption. Keyword options: see ``blockprune.compress.OPTIONS``.
    """
    transformer = transformer_of(model)
    ratio = _check_ratio(ratio)
    checked = check_options(options)
    distributed.init_from_environment()
    device = device if device is not None else distributed.default_device()
    progress = progress and distributed.is_main()
    sandwich_options = SandwichConfig.from_options(checked) if sandwich else None
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


def importance(
    model: Any,
    adapter: str = "auto",
    calibration: Any = None,
    *,
    importance: str | list[str] | Mapping[str, float] = "fit_residual",
    progress: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> ImportanceTable:
    """Per-block importance without compressing: each metric's value per block and the combined score.

    Takes the same model, calibration and options as :func:`blockprune.compress`; scores are cached on
    disk, so a later ``compress`` of the same model and data at any ratio costs no scoring.
    """
    resolve_metrics(importance)  # bad metric names fail before any work
    distributed.init_from_environment()
    device = device if device is not None else distributed.default_device()
    progress = progress and distributed.is_main()
    with contextlib.ExitStack() as stack:  # holds the offload, if any, until scoring is done
        run = prepare_run(model, adapter, calibration, device, options, stack)
        with progress_bars(progress) as bars:
            table = score_run(run, importance, bars=bars)
    if progress:
        output_console().print(table.table())
    return table


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
