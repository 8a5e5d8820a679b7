"""The plugin manager: built-in plugins, entry-point plugins and in-process ones."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from . import hookspecs
from .errors import BlockpruneError

ENTRY_POINT_GROUP = "blockprune"
DISABLE_AUTOLOAD_ENV = "BLOCKPRUNE_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = (
    "blockprune_adapters.flux",
    "blockprune_adapters.sd3",
    "blockprune_adapters.dit",
    "blockprune_adapters.ace_step",
    "blockprune_adapters.generic",
    "blockprune.scoring.metrics.output_mse",
    "blockprune.scoring.metrics.block_influence",
    "blockprune.scoring.metrics.fit_residual",
    "blockprune.scoring.metrics.fid",
    "blockprune.scoring.metrics.clip",
    "blockprune.brll.replacement",
)
HOOKS = {  # registry kind -> hook name
    "adapters": "blockprune_register_adapters",
    "metrics": "blockprune_register_metrics",
    "surrogates": "blockprune_register_surrogates",
}

_manager: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading built-in and entry-point plugins on first use.

    Set ``BLOCKPRUNE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point plugins; built-ins still load.
    """
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager("blockprune")
        manager.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            manager.register(importlib.import_module(module_name), name=module_name)
        if not os.environ.get(DISABLE_AUTOLOAD_ENV):
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _check_pending(manager)
        _manager = manager
    return _manager


def _check_pending(manager: pluggy.PluginManager) -> None:
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise BlockpruneError(
            f"{error}; blockprune's hooks are {', '.join(HOOKS.values())}: fix the hook's name in that plugin"
        ) from error


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin (a module or object with ``@hookimpl`` functions) in this process.

    A ``@hookimpl`` function whose name is no blockprune hook is an error, and the plugin is not kept.
    """
    manager = get_plugin_manager()
    manager.register(plugin, name=name)
    try:
        _check_pending(manager)
    except BlockpruneError:
        manager.unregister(plugin)
        raise


def unregister_plugin(plugin: Any) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    get_plugin_manager().unregister(plugin)


def _collect(hook_name: str, what: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def register(item: Any) -> None:
        name = getattr(item, "name", "")
        if not name:
            raise BlockpruneError(f"a plugin registered {what} without a name: {item!r}; set its `name` attribute")
        if name in found:
            raise BlockpruneError(
                f"two plugins register {what} named {name!r} ({found[name]!r} and {item!r}); "
                f"uninstall one or give it another name"
            )
        found[name] = item

    getattr(get_plugin_manager().hook, hook_name)(register=register)
    return found


def adapters() -> dict[str, Any]:
    """All registered adapters by name."""
    return _collect(HOOKS["adapters"], "an adapter")


def metrics() -> dict[str, Any]:
    """All registered importance metrics by name."""
    return _collect(HOOKS["metrics"], "a metric")


def surrogates() -> dict[str, Any]:
    """All registered surrogate kinds by name."""
    return _collect(HOOKS["surrogates"], "a surrogate kind")


def get_surrogate(name: str) -> Any:
    """The surrogate kind called ``name``; an unknown name is an error listing the known ones."""
    known = surrogates()
    if name not in known:
        raise BlockpruneError(f"unknown surrogate {name!r}; use one of {', '.join(map(repr, sorted(known)))}")
    return known[name]


def plugin_contents() -> dict[str, dict[str, list[str]]]:
    """For each plugin: the names of the adapters, metrics and surrogate kinds it registers."""
    manager = get_plugin_manager()
    contents = {}
    for name, plugin in manager.list_name_plugin():
        items: dict[str, list[str]] = {kind: [] for kind in HOOKS}
        for kind, hook in HOOKS.items():
            impl = getattr(plugin, hook, None)
            if impl is not None:
                impl(register=lambda item, kind=kind: items[kind].append(item.name))
        contents[name] = items
    return contents


def get_adapter(model: Any, name: str = "auto") -> Any:
    """The adapter called ``name`` (checked against ``model``), or with ``"auto"`` the one matching its class."""
    known = adapters()
    if name == "auto":
        matching = [a for n, a in known.items() if n != "generic" and a.matches(model)]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            raise BlockpruneError(
                f"no adapter matches {type(model).__name__}; known adapters: "
                f"{', '.join(n for n in sorted(known) if n != 'generic')}. Pass adapter='generic' to discover "
                f"its blocks automatically, or install or register an adapter plugin for it"
            )
        raise BlockpruneError(
            f"several adapters match {type(model).__name__} ({', '.join(a.name for a in matching)}); pass adapter= "
            f"to choose one"
        )
    if name not in known:
        raise BlockpruneError(f"unknown adapter {name!r}; known adapters: {', '.join(sorted(known))}")
    adapter = known[name]
    if not adapter.matches(model):
        raise BlockpruneError(
            f"the {name!r} adapter does not handle {type(model).__name__}; use adapter='auto' or 'generic'"
        )
    return adapter
