"""The plugin hooks. Built-in adapters and metrics implement them exactly as third parties do."""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("blockprune")
hookimpl = pluggy.HookimplMarker("blockprune")


@hookspec
def blockprune_register_adapters(register: Callable) -> None:
    """Call ``register(adapter)`` with each :class:`blockprune.Adapter` instance the plugin provides."""


@hookspec
def blockprune_register_metrics(register: Callable) -> None:
    """Call ``register(metric)`` with each :class:`blockprune.Metric` instance the plugin provides."""
