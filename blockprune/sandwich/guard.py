"""Guarded training: a held-out check before and during training keeps only weights that made it better.

Both sandwich stages and the global healing stage train through :func:`guarded_training`. It evaluates the
held-out error before the first step and every ``eval_every`` steps, keeps the best weights seen, stops once
``patience`` evaluations in a row bring no improvement (counted only after the first fifth of the steps), and ends
on the best weights, which are the starting ones when training never beat them (or when the caller's ``accept``
check refuses the best). The rate follows a linear warm-up and a cosine decay.

With ``lr="auto"`` each rate of the grid (:data:`LR_GRID` unless the caller gives another) first trains a short
probe from the same start; a probe whose loss turns NaN or Inf loses, and the other rates go on. A probe is scored
where it would land: a copy of it cools down to a zero rate (for a quarter of the probe's steps) and is checked, and
then the probe is put back as it was. Checked mid-flight at its peak rate instead, a fast rate's probe looks worse
than it is, and the lowest rate won too often. The best-scored rate trains on from its probe, before the cool-down;
its cooled copy is kept at the end if nothing after it beat it.

With ``cooldown`` steps (healing's, :data:`COOLDOWN_CHECKS` check intervals), the best weights, found mid-schedule
at a high rate, then train on at a rate falling linearly from theirs to zero, and what that reaches is checked once
more and kept if it is lower still.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import SandwichDivergedError
from ..runtime import distributed

LR_GRID = (1e-4, 3e-4, 1e-3)  # lr="auto": the rates probed, the paper's 1e-4 first
AUTO_CHECKS = 20  # eval_every="auto": a check every this share of the steps ...
AUTO_MIN_INTERVAL = 10  # ... but no more often than every this many steps
PROBE_COOLDOWN_SHARE = 0.25  # lr="auto": each probe is scored after a cool-down of this share of its steps
COOLDOWN_CHECKS = 2  # healing's cool-down from its best weights: this many check intervals (eval_every steps each)
WARMUP_SHARE = 0.1  # of the steps, at a linearly rising rate
FINAL_LR_SHARE = 0.1  # the cosine decays to this share of the peak rate
# (what trains, step, steps, held-out error) after each check; the steps grow by a cool-down that runs past them
Listener = Callable[[str, int, int, float], None]
_listener: Listener | None = None


@contextlib.contextmanager
def training_progress(listener: Listener) -> Iterator[None]:
    """Call ``listener`` after every held-out check of the guarded trainings run inside the ``with`` block."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


def _tell(name: str, step: int, steps: int, error: float) -> None:
    if _listener is not None:
        _listener(name, step, max(steps, step), error)  # a cool-down runs past the steps: the total grows with it


@dataclass(frozen=True)
class GuardSettings:
    """How one guarded training runs: steps, rate (a number or ``"auto"``), batches per step, checks."""

    steps: int
    lr: float | str
    batch_size: int
    eval_every: int
    patience: int
    grid: tuple[float, ...] = LR_GRID  # the rates lr="auto" probes
    cooldown: int = 0  # steps from the best weights at a rate falling to zero, after the steps (0: none)


@dataclass
class GuardResult:
    """What a guarded training did: held-out errors before and at the end, the best step (0: the start kept)."""

    error_before: float
    error_after: float
    best_step: int
    steps_run: int
    lr: float | None  # the peak rate the kept weights were trained at; None when the start was kept
    lr_errors: dict[str, float]
    refused: bool = False  # the best weights beat the start but ``accept`` refused them: the start was kept
    cooled: bool = False  # the weights kept are those the cool-down reached

    @property
    def reverted(self) -> bool:
        """Whether training never beat the starting weights, which were therefore kept."""
        return self.best_step == 0


def check_interval(eval_every: int | str, steps: int) -> int:
    """Steps between held-out checks: ``eval_every``, or for ``"auto"`` a twentieth of ``steps``, at least 10 (a
    check passes over every held-out batch, which costs more than a few steps of training; with fewer steps the
    best weights want finer checks)."""
    return max(AUTO_MIN_INTERVAL, steps // AUTO_CHECKS) if eval_every == "auto" else eval_every


def learning_rate(step: int, steps: int, peak: float) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``steps``: linear warm-up, then cosine decay."""
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Trainer:
    """AdamW over ``trainable`` with the batches of a seeded permutation; each step sums gradients over ranks."""

    def __init__(self, trainable: list[torch.Tensor], step_loss: Callable[[int], torch.Tensor | None], total: int,
                 settings: GuardSettings, seed: int, name: str, peak: float) -> None:
        self.trainable, self.step_loss, self.total, self.settings, self.name = trainable, step_loss, total, settings, name
        self.peak = peak
        self.optimizer = torch.optim.AdamW(trainable, lr=peak, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.step = 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self._one_step()

    def cooled_copy(self, steps: int, held_error: Callable[[], float]) -> tuple[float, list[torch.Tensor]]:
        """Held-out error and weights after a cool-down of ``steps`` from here; then everything is put back as it
        was (weights, optimizer state, batch order, step), so that training goes on as if it had not run."""
        weights, state = _snapshot(self.trainable), copy.deepcopy(self.optimizer.state_dict())
        generator, order, step = self.generator.get_state(), list(self.order), self.step
        self.cool_down(steps, learning_rate(self.step - 1, self.settings.steps, self.peak))  # from the last step's
        error, cooled = held_error(), _snapshot(self.trainable)
        _load(self.trainable, weights)
        self.optimizer.load_state_dict(state)
        self.generator.set_state(generator)
        self.order, self.step = order, step
        return error, cooled

    def cool_down(self, steps: int, rate: float) -> None:
        """``steps`` more steps at a rate falling linearly from ``rate`` towards zero."""
        for k in range(steps):
            self._one_step(rate * (1 - k / steps))

    def _one_step(self, rate: float | None = None) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.settings.steps, self.peak) if rate is None else rate
        self.optimizer.zero_grad(set_to_none=False)
        for parameter in self.trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        finite = torch.ones(1, dtype=torch.float64)
        for _ in range(self.settings.batch_size):
            if not self.order:
                self.order = torch.randperm(self.total, generator=self.generator).tolist()
            loss = self.step_loss(self.order.pop())
            if loss is None:  # another rank's batch
                continue
            if not torch.isfinite(loss):
                finite.zero_()
                break
            (loss / self.settings.batch_size).backward()
        distributed.all_reduce_sum([finite, *[p.grad for p in self.trainable]])
        if finite.item() < distributed.world_size():
            raise SandwichDivergedError(
                f"{self.name} diverged (NaN or Inf loss at step {self.step}, rate {self.peak:g}); it was rolled "
                f"back: pass a lower fixed rate (sandwich_lr=1e-5, say) or check the calibration data"
            )
        self.optimizer.step()
        self.step += 1


def _snapshot(trainable: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable]


def _load(trainable: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(trainable, values):
            parameter.copy_(value)


def grace_steps(settings: GuardSettings) -> int:
    """Steps a training runs before the early stop may end it: a fifth of the steps (the warm-up's transient in
    them), as long as each rate's probe under ``lr="auto"``, so that a fixed rate is judged as late as a probed one."""
    return min(settings.steps, max(settings.eval_every, settings.steps // 5))


def probe_steps(settings: GuardSettings) -> int:
    """Steps each rate of the grid trains from the start before the rates are compared (0: one rate, no probes)."""
    if settings.lr != "auto" or len(settings.grid) < 2:
        return 0
    return grace_steps(settings)


def probe_cooldown_steps(settings: GuardSettings) -> int:
    """Steps of the cool-down each rate's probe gets before it is scored (0 without probes)."""
    return math.ceil(PROBE_COOLDOWN_SHARE * probe_steps(settings))


@dataclass
class _Probe:
    """The best-scored probe: its score, its trainer and weights to go on from, and its cooled copy (if any)."""

    score: float
    trainer: _Trainer
    weights: list[torch.Tensor]
    landed: list[torch.Tensor] | None


def _probe_rates(trainable: list[torch.Tensor], step_loss: Callable[[int], torch.Tensor | None],
                 held_error: Callable[[], float], total: int, settings: GuardSettings, seed: int, name: str,
                 start: list[torch.Tensor]) -> tuple[dict[str, float], _Probe | None]:
    """Each rate's score (its probe's held-out error after the probe's cool-down; ``inf`` if its loss diverged)
    and the best-scored probe; no probes (``{}``, ``None``) unless ``lr="auto"`` with two rates or more."""
    probe, cool = probe_steps(settings), probe_cooldown_steps(settings)
    lr_errors: dict[str, float] = {}
    chosen: _Probe | None = None
    for rate in settings.grid if probe else ():
        _load(trainable, start)
        trainer = _Trainer(trainable, step_loss, total, settings, seed, name, rate)
        try:
            trainer.run(probe)
        except SandwichDivergedError:  # too high a rate for this training: it loses, the other rates go on
            lr_errors[f"{rate:g}"] = math.inf
            continue
        score, landed = trainer.cooled_copy(cool, held_error) if cool else (held_error(), None)
        _tell(name, probe, settings.steps, score)
        lr_errors[f"{rate:g}"] = score
        if chosen is None or score < chosen.score:
            chosen = _Probe(score, trainer, _snapshot(trainable), landed)
    return lr_errors, chosen


def guarded_training(trainable: list[torch.Tensor], step_loss: Callable[[int], torch.Tensor | None],
                     held_error: Callable[[], float], total: int, settings: GuardSettings, seed: int,
                     name: str, accept: Callable[[], bool] | None = None) -> GuardResult:
    """Train ``trainable`` on ``step_loss(batch index)`` (``None`` for batches of other ranks) and end on the
    weights with the lowest ``held_error()`` seen, the starting ones included; see the module docstring.

    ``accept``, if given, is asked once with the best weights loaded (when they are not the start): ``False``
    puts the start back."""
    start = _snapshot(trainable)
    error_before = held_error()
    _tell(name, 0, settings.steps, error_before)
    rates = settings.grid if settings.lr == "auto" else (float(settings.lr),)
    best_error, best_step, best = error_before, 0, start
    lr_errors, chosen = _probe_rates(trainable, step_loss, held_error, total, settings, seed, name, start)
    if chosen is None:  # one rate, or every probe diverged (then the first rate's run says so)
        _load(trainable, start)
        trainer = _Trainer(trainable, step_loss, total, settings, seed, name, rates[0])
    else:
        trainer = chosen.trainer
        _load(trainable, chosen.weights)
        error = held_error() if chosen.landed is not None else chosen.score  # mid-flight, as the checks that follow
        if error < best_error:
            best_error, best_step, best = error, probe_steps(settings), chosen.weights
    stale, grace = 0, grace_steps(settings)
    while trainer.step < settings.steps and stale < settings.patience:
        trainer.run(min(settings.eval_every, settings.steps - trainer.step))
        error = held_error()
        _tell(name, trainer.step, settings.steps, error)
        if error < best_error:
            best_error, best_step, best, stale = error, trainer.step, _snapshot(trainable), 0
        elif trainer.step > grace:
            stale += 1
    if chosen is not None and chosen.landed is not None and chosen.score < best_error:  # it beat all that followed
        best_error, best_step, best = chosen.score, probe_steps(settings), chosen.landed
    _load(trainable, best)
    cooled = False
    if settings.cooldown and best_step:
        trainer.cool_down(settings.cooldown, learning_rate(best_step - 1, settings.steps, trainer.peak))
        error = held_error()
        _tell(name, trainer.step, settings.steps, error)
        cooled = error < best_error
        if cooled:
            best_error, best_step, best = error, trainer.step, _snapshot(trainable)
        _load(trainable, best)
    refused = bool(best_step) and accept is not None and not accept()
    if refused:
        _load(trainable, start)
        best_error, best_step = error_before, 0
    _tell(name, max(settings.steps, trainer.step), settings.steps, best_error)  # done (an early stop ends the bar too)
    return GuardResult(error_before, best_error, best_step, trainer.step, trainer.peak if best_step else None, lr_errors,
                       refused, cooled and not refused)
