"""The plugin hooks. Built-in adapters, metrics and surrogate kinds implement them exactly as third parties do.

A plugin is a module (or object) with functions marked ``@blockprune.hookimpl``, found through the
``blockprune`` entry-point group or passed to :func:`blockprune.register_plugin`. A misspelled hook name is
an error when plugins load (pluggy's ``check_pending``).
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("blockprune")
hookimpl = pluggy.HookimplMarker("blockprune")


@hookspec
def blockprune_register_adapters(register: Callable) -> None:
    """Register the plugin's architecture adapters.

    :param register: call ``register(adapter)`` once per :class:`blockprune.Adapter` instance; its ``name``
        is what ``compress(adapter=...)`` takes and must not clash with another plugin's.
    """


@hookspec
def blockprune_register_metrics(register: Callable) -> None:
    """Register the plugin's importance metrics.

    :param register: call ``register(metric)`` once per :class:`blockprune.Metric` instance; its ``name``
        is what ``compress(importance=...)`` takes and must not clash with another plugin's.
    """


@hookspec
def blockprune_register_surrogates(register: Callable) -> None:
    """Register the plugin's surrogate kinds (what stands in for a replaced block).

    :param register: call ``register(kind)`` once per :class:`blockprune.SurrogateKind` instance; its
        ``name`` is what ``compress(surrogate=...)`` takes and must not clash with another plugin's.
    """
