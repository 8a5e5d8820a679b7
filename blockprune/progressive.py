"""The progressive loop: one block at a time, least squares then sandwich training, each stage saved to the
workdir when there is one, so that an interrupted run resumes after its last finished stage."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .brll.recording import numbered_as, riding
from .brll.replacement import replace_block
from .brll.surrogate import LinearSurrogate
from .config import SandwichConfig
from .discovery.spec import Block
from .errors import BlockpruneError, CompressionInterrupted
from .plan import Plan, ReplacedBlock, StageLog, StageReport, StreamReport
from .progress import mark_cached, training_bar
from .runtime.forward import model_device
from .runtime.interrupt import InterruptGuard
from .runtime.workdir import Workdir
from .sandwich import train_stage
from .sandwich.guard import training_progress
from .sandwich.heal import heal, reference_outputs
from .sandwich.heal_check import HeldReference, reference_check
from .sandwich.heal_states import resolve_heal_states, trajectory_training_data
from .sandwich.reuse import components_to_tensors, tensors_to_components
from .sandwich.span import free_outputs
from .sandwich.stage import span_capture
from .scoring.auto import AUTO, TRAJECTORY_STEPS, auto_select
from .scoring.selection import ImportanceTable, score_run

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger("blockprune")


def split_indices(count: int, share: float, held_out: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(least-squares, training, held-out) indices of ``count`` batches from a seeded shuffle, each sorted:
    ``held_out`` of them are held out, the least squares fit on all the others, and ``share`` of the others train."""
    if count < 3:
        raise BlockpruneError(
            f"sandwich training needs at least 3 calibration batches (two to fit and train on, one held out), got "
            f"{count}; pass more batches or sandwich=False"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(max(1, round(held_out * count)), count - 2)
    rest, held_indices = order[held:], order[:held]
    train = rest[: max(1, round(share * len(rest)))]
    return sorted(rest), sorted(train), sorted(held_indices)


def split_batches(batches: list[dict], share: float, held_out: float, seed: int) -> tuple[list, list, list]:
    """(least-squares, training, held-out) batches: :func:`split_indices` applied to ``batches``."""
    return tuple([batches[i] for i in part] for part in split_indices(len(batches), share, held_out, seed))


@dataclass
class Progressive:
    """State of one progressive compression: what is replaced, the originals kept for targets, the log."""

    run: Run
    fixed: list[str] | None
    count: int
    importance: Any
    sandwich: SandwichConfig | None
    seed: int
    plan: Plan
    log: StageLog
    workdir: Workdir | None = None
    keep_activations: bool = False
    replaced: set[str] = field(default_factory=set)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    table: ImportanceTable | None = None
    task: Any = None  # the stages' progress bar, once the first block is chosen

    def __post_init__(self) -> None:
        self.by_name: dict[str, Block] = {b.name: b for b in self.run.blocks}
        batches = self.run.batches
        if self.sandwich is None:
            self.least_squares_indices = list(range(len(batches)))  # for errors: indices in the caller's list
            self.least_squares, self.train, self.held = batches, [], []
        else:
            parts = split_indices(len(batches), self.sandwich.split, self.sandwich.held_out, self.seed)
            self.least_squares_indices = parts[0]
            self.least_squares, self.train, self.held = ([batches[i] for i in part] for part in parts)

    def execute(self, bars: Any, guard: InterruptGuard) -> None:
        """Run (or, from the workdir, restore) every stage, then healing; stop at a safe point when ``guard`` asks."""
        each = self.run.config.scoring.rescore == "each"
        healing = self.sandwich is not None and self.sandwich.heal_steps > 0
        states = (resolve_heal_states(self.sandwich.heal_states, self.run.adapter, self.run.offload is not None)
                  if healing else "")  # what healing trains on, settled before the first stage
        targets: tuple[list, HeldReference | None] = ([], None)  # from the intact model, unless in the workdir
        if healing and not (self.workdir is not None and self.workdir.has_stages(self.count + 1)):
            with self._timed("heal"):
                targets = (reference_outputs(self.run.transformer, self.train) if states == "calibration" else [],
                           reference_check(self.run.transformer, self.run.adapter, self.held, self.run.guidance))
        for step in range(self.count):
            saved = None
            if self.workdir is not None:
                if self.fixed is None and (each or step == 0):
                    self.workdir.read_json(f"scores-{step:03d}.json")  # a damaged score file voids later stages
                saved = self.workdir.load_stage(step)
            if saved is not None:
                self._restore(*saved)
            else:
                self._stage(step, bars)
            bars.advance(self._stages_bar(bars))
            if guard.requested and step < self.count - 1:
                where = (f"run the same call again with workdir={str(self.workdir.path)!r} to resume"
                         if self.workdir is not None else "nothing was saved: pass workdir=... to make runs resumable")
                raise CompressionInterrupted(f"compress interrupted after stage {step + 1} of {self.count}; {where}")
        if healing:
            self._heal(*targets, bars, states)

    def _heal(self, train_targets: list[torch.Tensor], held_reference: HeldReference | None, bars: Any,
              states: str) -> None:
        """Global healing after the last stage, on the model's own trajectory or the calibration (``states``), saved
        to (or restored from) the workdir as stage ``count``."""
        model = self.run.transformer
        saved = self.workdir.load_stage(self.count) if self.workdir is not None else None
        if saved is not None:
            record, tensors = saved
            for name in record["touched"]:
                prefix = f"model/{name}/"
                module = model.get_submodule(name)
                device = model_device(module)
                module.load_state_dict({k[len(prefix):]: v.to(device) for k, v in tensors.items()
                                        if k.startswith(prefix)}, strict=True)
            self.plan.heal = record["heal"]
            return
        kept = [b.name for b in self.run.blocks if b.name not in self.replaced]
        surrogates = [b.name for b in self.run.blocks if b.name in self.replaced]
        train, seed = self.train, self.seed + self.count
        with self._timed("heal"), training_progress(training_bar(bars)):
            started = time.perf_counter()  # the trajectories' cost grows with heal_steps, unlike the references'
            if states == "trajectory":
                train, train_targets = trajectory_training_data(
                    model, self.run.adapter, self.train, self.originals, TRAJECTORY_STEPS,
                    self.sandwich.heal_steps * self.sandwich.batch_size, self.run.guidance, seed)
            states_seconds = time.perf_counter() - started
            report = heal(model, self.run.adapter, kept, surrogates, train, train_targets, self.held,
                          held_reference, self.sandwich, seed, self.run.offload, self.run.guidance)
        self.plan.heal = {**asdict(report), "states": states, "states_seconds": states_seconds}
        logger.info("healing: held-out output error %.4g → %.4g%s", report.relative_error_before,
                    report.relative_error_after, " (reverted: no step beat the start)" if report.reverted else "")
        if self.workdir is not None:
            touched = kept + surrogates
            tensors = {f"model/{name}/{k}": v for name in touched for k, v in model.get_submodule(name).state_dict().items()}
            self.workdir.save_stage(self.count, {"heal": self.plan.heal, "touched": touched}, tensors)

    def _stages_bar(self, bars: Any) -> Any:
        """The stages' bar, opened after the first scoring so that the bars stand in the order the work runs."""
        if self.task is None:
            self.task = bars.add_task("replacing blocks" + (" + sandwich training" if self.sandwich else ""),
                                      total=self.count)
        return self.task

    def _choose(self, step: int, bars: Any) -> str:
        if self.fixed is not None:
            return self.fixed[step]
        each = self.run.config.scoring.rescore == "each"
        if step == 0 or each:
            name = f"scores-{step if each else 0:03d}.json"
            cached = self.workdir.read_json(name) if self.workdir is not None else None
            if cached is not None:
                self.table = ImportanceTable.from_dict(cached)
            else:
                remaining = [b for b in self.run.blocks if b.name not in self.replaced]
                with self._timed("scoring"):
                    if self.importance == AUTO:
                        self.table = auto_select(self.run, remaining, self.count, bars, self.workdir)
                    else:
                        earlier = set(bars.task_ids)
                        self.table = score_run(self.run, self.importance, remaining, bars)
                        mark_cached(bars, earlier, self.table.cached, list(self.table.values))
                if self.workdir is not None:
                    self.workdir.write_json(name, self.table.to_dict())
            if step == 0:
                self._note_table()
        return self.table.order[0] if each else self.table.order[step]

    def _note_table(self) -> None:
        """The first scoring's values, scores and (with importance="auto") candidate errors go into the plan."""
        self.plan.metric_values, self.plan.scores = self.table.values, self.table.scores
        self.plan.selection = self.table.selection or {}

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``plan.seconds[phase]`` (GPU work included)."""
        device = model_device(self.run.transformer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        offload = self.run.offload
        started = time.perf_counter()
        try:
            with offload.counting(phase) if offload is not None else contextlib.nullcontext():
                yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.plan.seconds[phase] = self.plan.seconds.get(phase, 0.0) + time.perf_counter() - started
            if offload is not None:
                self.plan.offload_visits = offload.visit_counts()

    def _keep_original(self, names: list[str]) -> None:
        if self.sandwich is not None:
            for name in names:
                if name not in self.originals:
                    self.originals[name] = copy.deepcopy(self.run.transformer.get_submodule(name)).to("cpu")

    def _stage(self, step: int, bars: Any) -> None:
        model, config = self.run.transformer, self.run.config
        name = self._choose(step, bars)
        self._stages_bar(bars)
        self._keep_original([name])
        home = model_device(model.get_submodule(name))
        folder = self.workdir.activations(step) if self.workdir is not None and self.sandwich is not None else None
        free = frozenset(free_outputs(s.span for s in self.plan.stages if s.best_step))  # trained stages only
        capture = None if self.sandwich is None else span_capture(self.run.blocks, self.replaced, name, self.train,
                                                                  self.least_squares, self.sandwich, folder, free)
        try:
            with self._timed("least_squares"), numbered_as(self.least_squares_indices), riding(capture):
                entry = replace_block(model, self.by_name[name], self.least_squares, config.ridge,
                                      config.record_device, config.surrogate)
        except BaseException:
            if capture is not None:
                capture.store.close()
            raise
        entry.score = self.table.scores.get(name) if self.table is not None else None
        self.replaced.add(name)
        report, trained, lora = None, {}, {}
        if self.sandwich is not None:
            try:
                with self._timed("sandwich"), training_progress(training_bar(bars)):
                    report, trained, lora = train_stage(model, self.run.adapter, self.run.blocks, self.replaced, name,
                                                      self.train, self.held, self.originals, self.sandwich,
                                                      self.seed + step, folder, self.keep_activations,
                                                      self.run.offload, capture, free)
            except BaseException:
                model.set_submodule(name, copy.deepcopy(self.originals[name]).to(home))
                self.replaced.discard(name)
                raise
            finally:
                if self.workdir is not None and not self.keep_activations:
                    self.workdir.drop_activations(step)
            logger.info("sandwich %s: held-out span error %.4g → %.4g", "+".join(report.span),
                        report.relative_error_before, report.relative_error_after)
        touched = report.span if report is not None else [name]
        if self.workdir is not None:
            record = {"block": name, "entry": asdict(entry), "stage": asdict(report) if report else None,
                      "touched": touched}
            tensors = components_to_tensors(trained, lora, prefix="component/")
            for block in touched:
                for key, value in model.get_submodule(block).state_dict().items():
                    tensors[f"model/{block}/{key}"] = value
            self.workdir.save_stage(step, record, tensors)
        self._record(entry, report, trained, lora)

    def _restore(self, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        model, name = self.run.transformer, record["block"]
        self._keep_original([name, *record["touched"]])
        block = self.by_name[name]
        model.set_submodule(name, LinearSurrogate.for_block(model.get_submodule(name), block.spec, block.stream_dims))
        for touched in record["touched"]:
            prefix = f"model/{touched}/"
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            module = model.get_submodule(touched)
            device = model_device(module)
            module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
        self.replaced.add(name)
        entry = record["entry"]
        entry = ReplacedBlock(**{**entry, "streams": {s: StreamReport(**r) for s, r in entry["streams"].items()}})
        report = StageReport(**record["stage"]) if record["stage"] else None
        trained, lora = tensors_to_components(tensors, prefix="component/")
        if self.fixed is None and self.table is None:
            cached = self.workdir.read_json("scores-000.json")
            if cached is not None:
                self.table = ImportanceTable.from_dict(cached)
                self._note_table()
        logger.info("restored stage %s from the workdir", name)
        self._record(entry, report, trained, lora)

    def _record(self, entry: ReplacedBlock, report: StageReport | None, trained: dict, lora: dict) -> None:
        self.plan.replaced.append(entry)
        if report is not None:
            self.plan.stages.append(report)
            self.log.surrogates.append(trained)
            self.log.lora.append(lora)
            self.log.blocks.append(entry.name)
        logger.info("replaced %s (fit errors %s)", entry.name, {s: r.relative_error for s, r in entry.streams.items()})
