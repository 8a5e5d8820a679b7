"""The project's small models by name: the embedded default of the demo, and fixtures for tests and examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import BlockpruneError


@dataclass(frozen=True)
class SmallModel:
    """A named small model: how to build it (a transformer or a pipeline holding one) and calibration for it."""

    name: str
    description: str
    adapter: str
    build: Callable[[], Any]
    calibration: Callable[[Any, int, int], list[dict[str, Any]]]  # (model, count, seed) -> batches


def _random_flux() -> Any:
    from .demo import tiny_flux

    return tiny_flux()


def _random_flux_calibration(model: Any, count: int, seed: int) -> list[dict[str, Any]]:
    from .demo import flux_batches

    return flux_batches(model, count, seed=seed)


SMALL_MODELS: dict[str, SmallModel] = {
    "flux-random": SmallModel(
        "flux-random",
        "FLUX architecture, 6 double + 14 single blocks, width 64, random weights",
        "flux",
        _random_flux,
        _random_flux_calibration,
    ),
}
DEFAULT_SMALL_MODEL = "flux-random"


def small_model(name: str) -> SmallModel:
    """The small model called ``name``; an unknown name is an error listing the known ones."""
    if name not in SMALL_MODELS:
        raise BlockpruneError(f"unknown small model {name!r}; known small models: {', '.join(sorted(SMALL_MODELS))}")
    return SMALL_MODELS[name]
