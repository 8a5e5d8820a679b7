"""``blockprune plugins``: the loaded plugins, where each comes from, and what it registers."""

from __future__ import annotations

import argparse
import os

from rich import box
from rich.table import Table

from .. import plugins
from ..report import output_console


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "plugins", parents=parents, help="list plugins and the adapters and metrics they register",
        description=f"List the built-in plugins and those installed under the {plugins.ENTRY_POINT_GROUP!r} "
        f"entry-point group, with the adapters and metrics each registers. Set "
        f"{plugins.DISABLE_AUTOLOAD_ENV}=1 to skip installed plugins.",
    )
    parser.set_defaults(run=run)


def plugin_origins() -> dict[str, str]:
    """For each plugin name: ``built-in`` or the distribution (name and version) that installed it."""
    manager = plugins.get_plugin_manager()
    installed = {manager.get_name(plugin): f"{dist.project_name} {dist.version}"
                 for plugin, dist in manager.list_plugin_distinfo()}
    return {name: "built-in" if name in plugins.DEFAULT_PLUGINS else installed.get(name, "registered in process")
            for name, _ in manager.list_name_plugin()}


def run(args: argparse.Namespace) -> int:
    """Print the plugins table."""
    origins = plugin_origins()
    table = Table(title="blockprune plugins", box=box.SIMPLE)
    kinds = tuple(plugins.HOOKS)
    for column in ("plugin", "from", *kinds):
        table.add_column(column, no_wrap=column in ("plugin", "from"))
    for name, contents in plugins.plugin_contents().items():
        table.add_row(name, origins[name], *(", ".join(contents[kind]) or "-" for kind in kinds))
    console = output_console()
    console.print(table)
    if os.environ.get(plugins.DISABLE_AUTOLOAD_ENV):
        console.print(f"installed plugins were not loaded: {plugins.DISABLE_AUTOLOAD_ENV} is set")
    return 0
