"""Print the rows of docs/compatibility.md from the coverage matrix: ``python tests/coverage_table.py``.

Each row is measured: the blocks and streams come from running the family's adapter on its tiny model.
"""

from __future__ import annotations

import warnings

import torch
from test_coverage import FAMILIES

from blockprune import plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError

HEADER = "| diffusers class (case) | adapter | blocks found | streams per block kind | status |\n|---|---|---|---|---|"


def row(family) -> str:
    """One markdown table row for ``family``."""
    model = family.make()
    cells = [f"`{type(model).__name__}` ({family.name})", f"`{family.adapter}`"]
    try:
        blocks = resolve_blocks(model, plugins.get_adapter(model, family.adapter), family.batches(1, 0)[0])
    except BlockpruneError:
        blocks = []
    if blocks:
        lists: dict[str, int] = {}
        streams: dict[str, list[str]] = {}
        for block in blocks:
            path = block.name.rpartition(".")[0]
            lists[path] = lists.get(path, 0) + 1
            names = ", ".join(f"`{s}`" for s in block.spec.streams)
            if names not in streams.setdefault(block.kind, []):
                streams[block.kind].append(names)
        cells.append(", ".join(f"`{path}` ×{count}" for path, count in lists.items()))
        cells.append("; ".join(f"{kind}: {' or '.join(names)}" for kind, names in streams.items()))
    else:
        cells += ["none", "—"]
    if family.failure is None:
        cells.append("passes" + (f"; {family.notes}" if family.notes else ""))
    else:
        cells.append(f"fails: {family.notes}")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(HEADER)
    for family in FAMILIES:
        print(row(family))
