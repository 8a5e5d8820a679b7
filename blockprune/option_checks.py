"""Checks of single option values, shared by the settings classes: each raises an error that names the option."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import BlockpruneError


def positive_int(name: str, value: Any) -> None:
    """Refuse anything but a positive integer (``True`` included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BlockpruneError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any, meaning: str) -> None:
    """Refuse anything but an integer ≥ 0 (``True`` included); ``meaning`` says what the number counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BlockpruneError(f"{name} must be an integer ≥ 0 ({meaning}), got {value!r}")


def positive_number(name: str, value: Any) -> None:
    """Refuse anything but a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise BlockpruneError(f"{name} must be a positive number, got {value!r}")


def cfg_scale(value: Any) -> None:
    """Refuse a ``guidance_scale`` option that is not ``None`` or a finite number ≥ 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 1):
        raise BlockpruneError(f"guidance_scale must be a finite number ≥ 1 (1: no guidance), or None to take the "
                              f"pipeline's, got {value!r}")


def boolean(name: str, value: Any) -> None:
    """Refuse anything but ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise BlockpruneError(f"{name} must be True or False, got {value!r}")


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value outside ``choices``."""
    if value not in choices:
        raise BlockpruneError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}")


def folder(name: str, value: Any, allow_false: bool = False) -> None:
    """Refuse anything but a folder path or ``None`` (or ``False`` with ``allow_false``)."""
    if value is None or (allow_false and value is False):
        return
    if not isinstance(value, (str, os.PathLike)):
        accepted = "a folder path, None or False" if allow_false else "a folder path or None"
        raise BlockpruneError(f"{name} must be {accepted}, got {value!r}")


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def memory_size(name: str, value: Any) -> int:
    """Bytes from a positive integer or a string such as ``"8GiB"``, ``"24 GB"`` or ``"512MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    raise BlockpruneError(f"{name} must be a number of bytes or a size such as '8GiB' or '24GB', got {value!r}")


SET_BY_BLOCKPRUNE = {"prompt": "calibration_prompts", "num_inference_steps": "calibration_steps",
                     "generator": None, "output_type": None}


def check_call_options(options: Any, name: str = "calibration_call_options") -> dict[str, Any]:
    """A copy of ``options`` (keyword arguments for a pipeline call) as a dict, checked: string keys, and none of
    the arguments that recording sets itself (``prompt``, ``num_inference_steps``, ``generator``, ``output_type``)."""
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise BlockpruneError(f"{name} must be a dict of the pipeline call's keyword arguments, e.g. "
                              f"{{'height': 512, 'width': 512}}, got {options!r}")
    for key in options:
        if key in SET_BY_BLOCKPRUNE:
            instead = SET_BY_BLOCKPRUNE[key]
            fix = f"use the {instead}= option instead" if instead else "leave it out"
            raise BlockpruneError(f"{name} sets {key!r}, which blockprune sets itself when recording; {fix}")
    for key in ("height", "width"):
        if options.get(key) is not None:
            positive_int(f"{name}[{key!r}]", options[key])
    return dict(options)
