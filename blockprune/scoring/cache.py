"""The on-disk cache of metric values, keyed by model, data and metric settings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import Metric, ScoringContext

CACHE_ENV = "BLOCKPRUNE_CACHE_DIR"


def cache_directory(setting: Any) -> Path | None:
    """Where scores are cached: the ``cache_dir`` option, else ``$BLOCKPRUNE_CACHE_DIR``, else ~/.cache/blockprune."""
    if setting is False:
        return None
    if setting is None:
        setting = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blockprune"
    return Path(setting) / "importance"


def cache_key(metric: Metric, context: ScoringContext, common: dict[str, Any]) -> str:
    payload = {**common, "metric": metric.name, "settings": metric.settings(context)}
    if not metric.ablates:
        payload.pop("ablation")
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:40]
