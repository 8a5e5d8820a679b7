"""blockprune: make diffusion transformers faster by replacing whole blocks with fitted linear layers.

The flow, one subpackage a stage: :mod:`~blockprune.discovery` (which blocks, which streams) →
:mod:`~blockprune.scoring` (which blocks matter) → :mod:`~blockprune.brll` (least-squares surrogates) →
:mod:`~blockprune.sandwich` (local training) → :mod:`~blockprune.serialization` (save / load), driven by
:func:`compress`. docs/architecture.md walks through it.

The names below are imported on first use (PEP 562), so that ``import blockprune`` (and ``blockprune --help``)
does not import torch and diffusers; ``from blockprune import compress`` works as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": ".adapter",
    "fuse": ".brll.fusion",
    "SurrogateKind": ".brll.replacement",
    "LinearSurrogate": ".brll.surrogate",
    "load_calibration": ".calibration_file",
    "save_calibration": ".calibration_file",
    "record_calibration": ".calibration",
    "compress": ".compress",
    "importance": ".compress",
    "CompressConfig": ".config",
    "SandwichConfig": ".config",
    "ScoringConfig": ".config",
    "BlockInfo": ".discovery.inspection",
    "inspect": ".discovery.inspection",
    "Block": ".discovery.spec",
    "BlockSpec": ".discovery.spec",
    "CallRecord": ".discovery.trace",
    "Trace": ".discovery.trace",
    "BlockpruneError": ".errors",
    "CompressionInterrupted": ".errors",
    "IllConditionedWarning": ".errors",
    "NonFiniteActivationError": ".errors",
    "NotResidualError": ".errors",
    "SandwichDivergedError": ".errors",
    "UnusedOptionWarning": ".errors",
    "hookimpl": ".hookspecs",
    "Plan": ".plan",
    "ReplacedBlock": ".plan",
    "StageReport": ".plan",
    "StreamReport": ".plan",
    "plan": ".plan",
    "register_plugin": ".plugins",
    "unregister_plugin": ".plugins",
    "Metric": ".scoring",
    "ScoringContext": ".scoring",
    "ImportanceTable": ".scoring.selection",
    "from_pretrained": ".serialization",
    "save_pretrained": ".serialization",
}

__all__ = [  # the same names as _EXPORTS, spelled out for tools that read __all__
    "Adapter",
    "Block",
    "BlockInfo",
    "BlockSpec",
    "BlockpruneError",
    "CallRecord",
    "CompressConfig",
    "CompressionInterrupted",
    "IllConditionedWarning",
    "ImportanceTable",
    "LinearSurrogate",
    "Metric",
    "NonFiniteActivationError",
    "NotResidualError",
    "Plan",
    "ReplacedBlock",
    "SandwichConfig",
    "SandwichDivergedError",
    "ScoringConfig",
    "ScoringContext",
    "StageReport",
    "StreamReport",
    "SurrogateKind",
    "Trace",
    "UnusedOptionWarning",
    "__version__",
    "compress",
    "from_pretrained",
    "fuse",
    "hookimpl",
    "importance",
    "inspect",
    "load_calibration",
    "plan",
    "record_calibration",
    "register_plugin",
    "save_calibration",
    "save_pretrained",
    "unregister_plugin",
]

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .adapter import Adapter
    from .brll.fusion import fuse
    from .brll.replacement import SurrogateKind
    from .brll.surrogate import LinearSurrogate
    from .calibration import record_calibration
    from .calibration_file import load_calibration, save_calibration
    from .compress import compress, importance
    from .config import CompressConfig, SandwichConfig, ScoringConfig
    from .discovery.inspection import BlockInfo, inspect
    from .discovery.spec import Block, BlockSpec
    from .discovery.trace import CallRecord, Trace
    from .errors import (
        BlockpruneError,
        CompressionInterrupted,
        IllConditionedWarning,
        NonFiniteActivationError,
        NotResidualError,
        SandwichDivergedError,
        UnusedOptionWarning,
    )
    from .hookspecs import hookimpl
    from .plan import Plan, ReplacedBlock, StageReport, StreamReport, plan
    from .plugins import register_plugin, unregister_plugin
    from .scoring import Metric, ScoringContext
    from .scoring.selection import ImportanceTable
    from .serialization import from_pretrained, save_pretrained


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; a submodule (``blockprune.plugins``) likewise."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package module: importing the submodule ``blockprune.plan`` or ``blockprune.compress`` must not hide
    the public function of the same name (the import system sets a submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the attribute is the public name, imported on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
