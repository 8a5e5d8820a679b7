"""``importance``: per-block scores from one or more metrics, cached on disk."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from ..discovery.spec import Block
from ..runtime import distributed
from ..runtime.atomic import write_atomically
from ..runtime.fingerprint import data_fingerprint, model_fingerprint
from . import Metric, ScoringContext, combine_scores, resolve_metrics, score_blocks
from .cache import cache_directory, cache_key

if TYPE_CHECKING:
    from ..run import Run


@dataclass
class ImportanceTable:
    """Per-block metric values, the weights, and the combined importance ``s_i`` (lower: replace first)."""

    blocks: list[str]
    values: dict[str, dict[str, float]]
    weights: dict[str, float]
    scores: dict[str, float]
    ablation: str
    cached: list[str]
    # with importance="auto": each candidate plan's validated error and the one chosen (see scoring.auto)
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportanceTable:
        """The inverse of :meth:`to_dict`."""
        return cls(**data)

    @property
    def order(self) -> list[str]:
        """Block names by ascending importance (ties keep data-flow order)."""
        return sorted(self.blocks, key=lambda name: self.scores[name])

    def table(self) -> Table:
        """The scores as a rich table, in replacement order."""
        table = Table(title=f"block importance (ablation: {self.ablation})", box=box.SIMPLE)
        table.add_column("rank", justify="right")
        table.add_column("block", no_wrap=True)
        for name in self.values:
            table.add_column(f"{name} (w={self.weights[name]:.2f})", justify="right")
        table.add_column("importance", justify="right")
        for rank, block in enumerate(self.order, 1):
            cells = [f"{self.values[m][block]:.4g}" for m in self.values]
            table.add_row(str(rank), block, *cells, f"{self.scores[block]:.4f}")
        return table


def _score_split_by_block(context: ScoringContext, metrics: Mapping[str, Metric], ablation: str, on_block) -> dict:
    """Score this rank's share of the blocks (all of them without a launcher) and gather every rank's."""
    mine = distributed.shard(context.blocks)
    with distributed.local():
        values = score_blocks(context, metrics, blocks=mine, ablation=ablation, on_block=on_block)
    merged: dict[str, dict[str, float]] = {name: {} for name in metrics}
    for part in distributed.all_gather(values):
        for name, column in part.items():
            merged[name].update(column)
    order = [b.name for b in context.blocks]
    return {name: {block: column[block] for block in order} for name, column in merged.items()}


def compute_scores(
    context: ScoringContext,
    weights: Mapping[str, float],
    metrics: Mapping[str, Metric],
    ablation: str,
    cache: Path | None,
    on_block: Callable[[Block], Any] | None = None,
) -> ImportanceTable:
    """Score ``context.blocks`` with each metric (from the cache where the same model, data and settings were
    scored before) and combine them."""
    values: dict[str, dict[str, float]] = {}
    keys: dict[str, Path] = {}
    names = [b.name for b in context.blocks]
    if cache is not None:
        common = {
            "model": model_fingerprint(context.model),
            "data": data_fingerprint(context.batches),
            "blocks": names,
            "ablation": ablation,
            "ridge": context.options.get("ridge") if ablation == "replace" else None,
        }
        for name, metric in metrics.items():
            keys[name] = cache / f"{cache_key(metric, context, common)}.json"
            if not keys[name].is_file():
                continue
            try:  # a damaged entry is a miss: recomputed and rewritten below
                cached = json.loads(keys[name].read_text())["values"]
                if set(cached) == set(names) and all(type(cached[b]) in (int, float) for b in names):
                    values[name] = {b: cached[b] for b in names}
                    continue
                problem = "its values do not cover exactly the scored blocks"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                problem = f"{type(error).__name__}: {error}"
            logging.getLogger("blockprune").warning(
                "score cache entry %s is damaged (%s); the scores will be recomputed", keys[name], problem)
    missing = {name: metric for name, metric in metrics.items() if name not in values}
    if missing:
        values.update(_score_split_by_block(context, missing, ablation, on_block))
        for name in missing:
            if name in keys and distributed.is_main():
                keys[name].parent.mkdir(parents=True, exist_ok=True)
                write_atomically(keys[name], json.dumps({"metric": name, "values": values[name]}).encode())
    ordered = {name: values[name] for name in metrics}
    return ImportanceTable(names, ordered, dict(weights), combine_scores(ordered, weights, metrics), ablation,
                           sorted(set(metrics) - set(missing)))


def score_run(run: Run, importance: Any, blocks: list[Block] | None = None, bars: Any = None) -> ImportanceTable:
    """Score ``blocks`` (default: all) of a prepared run."""
    weights, metrics = resolve_metrics(importance)
    ablation = run.config.scoring.ablation
    context = ScoringContext(run.transformer, run.adapter, blocks if blocks is not None else run.blocks,
                             run.scoring_batches, run.pipeline, run.metric_options)
    on_block = None
    if bars is not None:
        task = bars.add_task("scoring blocks", total=len(context.blocks))
        on_block = lambda block: bars.advance(task)  # noqa: E731
    return compute_scores(context, weights, metrics, ablation, cache_directory(run.config.scoring.cache_dir), on_block)


