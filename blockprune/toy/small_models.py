"""The project's small models by name: the embedded default of the demo, and fixtures for tests and examples."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BlockpruneError
from .pipeline import WEIGHTS_DIR, weight_files


@dataclass(frozen=True)
class SmallModel:
    """A named small model: how to build it (a transformer or a pipeline holding one), calibration for it, and
    for a text-to-image pipeline prompts it can draw."""

    name: str
    description: str
    adapter: str
    build: Callable[[], Any]
    calibration: Callable[[Any, int, int], list[dict[str, Any]]]  # (model, count, seed) -> batches
    prompts: Callable[[int, int], list[str]] | None = None  # (count, seed) -> prompts; None: a bare transformer


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
TOY_MODELS = {"flux-small": "flux", "sd3-small": "sd3", "flux-deep": "flux"}  # trained on the toy shapes dataset (blockprune.toy)


def toy_small_models(directory: str | Path = WEIGHTS_DIR) -> dict[str, SmallModel]:
    """Entries for the trained toy models whose weight files are in ``directory`` (none before training)."""

    found = {}
    for name, adapter in TOY_MODELS.items():
        files = weight_files(name, directory)
        if not all(path.is_file() for path in files.values()):
            continue
        config = json.loads(files["config"].read_text(encoding="utf-8"))["config"]
        blocks = " + ".join(str(b) for b in config["blocks"])
        description = f"{config['family'].upper()} architecture, {blocks} blocks, width {config['width']}, trained on toy shapes"
        found[name] = SmallModel(name, description, adapter, _toy_builder(name, directory), _toy_calibration,
                                 _toy_prompts)
    return found


def _toy_builder(name: str, directory: str | Path) -> Callable[[], Any]:
    def build() -> Any:
        from .pipeline import ToyPipeline

        return ToyPipeline.from_pretrained(name, directory)

    return build


def _toy_calibration(model: Any, count: int, seed: int) -> list[dict[str, Any]]:
    from .pipeline import calibration_batches

    return calibration_batches(model, count, seed=seed)


def _toy_prompts(count: int, seed: int) -> list[str]:
    from .evaluation import evaluation_prompts

    return evaluation_prompts(count, seed=seed)


SMALL_MODELS.update(toy_small_models())
DEFAULT_SMALL_MODEL = "flux-small"


def small_model(name: str) -> SmallModel:
    """The small model called ``name``; an unknown name is an error listing the known ones."""
    if name not in SMALL_MODELS:
        raise BlockpruneError(f"unknown small model {name!r}; known small models: {', '.join(sorted(SMALL_MODELS))}")
    return SMALL_MODELS[name]
