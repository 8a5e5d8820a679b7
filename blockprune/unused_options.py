"""Warnings for keyword options that do nothing in the call they are given to.

``sandwich_steps`` with ``sandwich=False``, ``keep_activations`` without a workdir, scoring options with a fixed
order ...: the call runs as it would without them, and an :class:`~blockprune.errors.UnusedOptionWarning`
says so, in case the caller meant something else.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from .config import (
    CompressConfig,
    SandwichConfig,
    ScoringConfig,
    defaults,
    sandwich_option_names,
)
from .errors import UnusedOptionWarning

AUTO_ONLY = ("auto_held_out", "auto_refine", "auto_check", "auto_check_batches", "auto_check_samples", "auto_finalists")
RECORDING = ("calibration_prompts", "calibration_steps", "steps_per_prompt", "calibration_call_options")
REUSED = ("ridge", "record_device", "surrogate", "workdir", "keep_activations")


def given_options(options: Mapping[str, Any]) -> list[str]:
    """The option names given by keyword with a value other than their default (``None`` means "not given")."""
    default = defaults()
    return [name for name, value in options.items() if value is not None and not _is_default(value, default[name])]


def _is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is the default itself (plain values only: models and tensors never are)."""
    plain = (bool, int, float, str, tuple)
    return isinstance(value, plain) and type(value) is type(default) and value == default


def _warn(reasons: Mapping[str, str], stacklevel: int = 4) -> None:
    for name, reason in reasons.items():
        warnings.warn(f"option {name} does nothing in this call: {reason}; leave it out", UnusedOptionWarning,
                      stacklevel=stacklevel)


def _recording_reason(recording: bool) -> dict[str, str]:
    if recording:
        return {}
    why = "calibration is recorded from a pipeline only when calibration= is not given"
    return dict.fromkeys(RECORDING, why)


def warn_unused_in_compress(given: Iterable[str], settings: CompressConfig, *, sandwich: bool, order: Any,
                            importance: Any, recording: bool, trainable: bool) -> None:
    """Warn about each ``given`` option that this ``compress`` call does not use, with the reason.

    ``recording``: calibration is recorded from a pipeline; ``trainable``: the surrogate kind is trainable.
    """
    scoring = [f.name for f in fields(ScoringConfig) if f.name != "cache_dir"]  # a setting of the environment
    sandwich_names = sandwich_option_names()
    reasons: dict[str, str] = {}
    if settings.reuse_from is not None:
        why = "with reuse_from= the replacements come from that run; nothing is scored, fitted or trained"
        reasons.update(dict.fromkeys([*scoring, *sandwich_names, *REUSED], why))
    if not sandwich:
        reasons.update({n: "sandwich=False: no sandwich training runs" for n in [*sandwich_names, "keep_activations"]
                        if n not in reasons})
    if settings.workdir is None:
        reasons.setdefault("keep_activations", "without workdir= spilled activations go to a temporary folder, "
                                               "deleted after each stage")
    if order != "importance":
        reasons.update({n: "with a fixed order= no block is scored" for n in scoring if n not in reasons})
    if not (isinstance(importance, str) and importance == "auto"):
        reasons.update({n: "it is used only with importance='auto'" for n in AUTO_ONLY if n not in reasons})
    auto = order == "importance" and isinstance(importance, str) and importance == "auto"
    if not (auto or (sandwich and settings.sandwich.heal_steps != 0)):
        reasons.setdefault("guidance_scale", "it guides the checks of importance='auto' and of healing, and neither runs")
    if sandwich and settings.sandwich.heal_steps == 0:
        why = "heal_steps=0 (the default): no healing runs; pass heal_steps=100 (or 'auto') to heal"
        reasons.setdefault("heal_kept", why)
        reasons.setdefault("heal_states", why)
    if not trainable:
        reasons.setdefault("sandwich_train_surrogates", f"surrogate={settings.surrogate!r} has no trainable maps")
    reasons.update({n: why for n, why in _recording_reason(recording).items() if n not in reasons})
    _warn({name: reasons[name] for name in given if name in reasons})


def warn_unused_healing(given: Iterable[str], asked: SandwichConfig, settled: SandwichConfig) -> None:
    """Warn about ``heal_kept`` / ``heal_states`` when ``heal_steps="auto"`` (``asked``) settled on no healing."""
    if asked.heal_steps == "auto" and settled.heal_steps == 0:
        why = ("heal_steps='auto' heals only where it trains on the model's own trajectory (a rectified-flow model "
               "without offload); pass heal_steps=100 to heal here")
        _warn({name: why for name in given if name in ("heal_kept", "heal_states")}, stacklevel=5)  # via compress's helper


def warn_unused_in_importance(given: Iterable[str], *, recording: bool) -> None:
    """Warn about each ``given`` option that ``importance`` does not use (it scores blocks, nothing more)."""
    why = "importance() only scores blocks"
    reasons = dict.fromkeys([*sandwich_option_names(), *AUTO_ONLY, "guidance_scale", "workdir", "keep_activations",
                             "reuse_from"], why)
    reasons.update(_recording_reason(recording))
    _warn({name: reasons[name] for name in given if name in reasons})
