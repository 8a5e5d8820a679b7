"""Checking a plan: its blocks replaced at once by least-squares surrogates, its output compared with the intact
model's (:mod:`blockprune.scoring.auto` chooses plans by this check)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..brll.replacement import fit_surrogate
from ..discovery.spec import Block
from ..runtime.forward import model_device
from .trajectory import halves, relative_error


class PlanEvaluator:
    """Held-out error with a plan's blocks replaced by surrogates fitted once each.

    ``measure`` returns the tensors compared with the intact model's, from the model as it is: sampled
    images, the clean latents of a short trajectory from each held-out batch, or one-step outputs; where it has
    a ``half`` method (:class:`~blockprune.scoring.trajectory.LatentCheck`), :meth:`first_half_error` measures
    only the first half. ``saved`` maps plans (their sorted block names joined by spaces) to ``[error, first
    half's, second half's]`` (``[first half's]`` for a plan measured on it alone): plans found there are not
    measured again (a resumed selection), new ones are added and ``on_new`` is called.
    """

    def __init__(self, model: nn.Module, blocks: list[Block], fit: list[dict], ridge: float,
                 record_device: Any, measure: Callable[[], list[torch.Tensor]],
                 surrogates: dict[str, nn.Module] | None = None,
                 aggregate: Callable[[list[torch.Tensor], list[torch.Tensor]], float] = relative_error,
                 saved: dict[str, list[float]] | None = None, on_new: Callable[[], None] | None = None) -> None:
        self.model, self.by_name, self.fit, self.measure = model, {b.name: b for b in blocks}, fit, measure
        self.aggregate = aggregate  # measured and intact tensors -> the error
        self.ridge, self.record_device = ridge, record_device
        self.surrogates: dict[str, nn.Module] = {} if surrogates is None else surrogates  # shared with another check
        self.errors: dict[tuple[str, ...], float] = {}
        self.halves: dict[tuple[str, ...], tuple[float, float]] = {}
        self.fit_seconds = 0.0  # spent fitting surrogates (grows with the fit batches); the rest is measuring
        self.saved, self.on_new = ({} if saved is None else saved), on_new
        self.restored = 0  # plans whose errors came from ``saved``
        self._reference: list[torch.Tensor] | None = None
        self._first: dict[tuple[str, ...], list[torch.Tensor]] = {}  # first halves measured alone, until the rest is

    @property
    def reference(self) -> list[torch.Tensor]:
        """The intact model's tensors (measured on first use: a fully restored check needs no forward pass)."""
        if self._reference is None:
            self._reference = [t.float() for t in self.measure()]
        return self._reference

    def _surrogate(self, name: str) -> nn.Module:
        if name not in self.surrogates:  # fitted on the intact model, as the plan's first replacement would be
            started = time.perf_counter()
            self.surrogates[name], _ = fit_surrogate(self.model, self.by_name[name], self.fit, self.ridge,
                                                     self.record_device)
            self.fit_seconds += time.perf_counter() - started
        return self.surrogates[name]

    @contextlib.contextmanager
    def _replaced(self, names: list[str]) -> Iterator[None]:
        originals = {name: self.model.get_submodule(name) for name in names}
        stand_ins = {name: self._surrogate(name) for name in names}
        try:
            for name, surrogate in stand_ins.items():
                self.model.set_submodule(name, surrogate.to(model_device(originals[name])))
            yield
        finally:
            for name, original in originals.items():
                self.model.set_submodule(name, original)

    def error(self, names: list[str]) -> float:
        """The error of the measured tensors against the intact model's (by default the relative squared error
        ``Σ‖ŷ − y‖² / Σ‖y‖²``)."""
        key = tuple(sorted(names))
        if key not in self.errors:
            label = " ".join(key)
            if len(self.saved.get(label, ())) == 3:
                self.restored += 1
            else:
                self._save(label, self._check(names))
            self.errors[key], *parts = self.saved[label]
            self.halves[key] = tuple(parts)  # type: ignore[assignment]
        return self.errors[key]

    def first_half_error(self, names: list[str]) -> float:
        """The error on the first half of the check, measuring only that half where ``measure`` can (a plan that
        loses on it cannot be better on both halves, so greedy refinement skips the rest)."""
        key, label = tuple(sorted(names)), " ".join(sorted(names))
        halvable = callable(getattr(self.measure, "half", None)) and getattr(self.measure, "count", 0) > 1
        if key in self.halves or len(self.saved.get(label, ())) == 3 or not halvable:
            self.error(names)
            return self.halves[key][0]
        if label not in self.saved:
            reference = self.reference
            with self._replaced(names):
                self._first[key] = self.measure.half(0)  # type: ignore[attr-defined]
            self._save(label, [self.aggregate(self._first[key], reference[0::2])])
        return self.saved[label][0]

    def forget_first_half(self, names: list[str]) -> None:
        """Drop the tensors kept from measuring ``names`` on the first half (it lost there: no second half follows)."""
        self._first.pop(tuple(sorted(names)), None)

    def _save(self, label: str, errors: list[float]) -> None:
        self.saved[label] = errors
        if self.on_new is not None:
            self.on_new()

    def _check(self, names: list[str]) -> list[float]:
        """Measure the plan (its second half alone when its first is at hand): its error, and on each half."""
        reference, first = self.reference, self._first.pop(tuple(sorted(names)), None)
        with self._replaced(names):
            if first is None:
                measured = self.measure()
            else:  # the two halves interleaved back into the order a whole measurement gives
                second = self.measure.half(1)  # type: ignore[attr-defined]
                measured = [t for pair in itertools.zip_longest(first, second) for t in pair if t is not None]
        parts = [self.aggregate(got, expected) for got, expected in zip(halves(measured), halves(reference))]
        return [self.aggregate(measured, reference), *parts]

    def better_on_both_halves(self, names: list[str], than: list[str]) -> bool:
        """Whether ``names`` has the lower error on each half of the check (its images, or its batches), not only in
        sum: greedy refinement compares many plans on a small check, and one half alone is often noise."""
        self.error(names), self.error(than)
        mine, theirs = self.halves[tuple(sorted(names))], self.halves[tuple(sorted(than))]
        return all(a < b for a, b in zip(mine, theirs))
