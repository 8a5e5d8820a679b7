"""Which blocks a sandwich spans."""

from __future__ import annotations

from ..config import WIDTHS


def _edge(names: list[str], replaced: set[str], index: int, neighbours: int, step: int) -> int:
    position = index
    inside = range(len(names))
    while position + step in inside and names[position + step] in replaced:
        position += step  # the run of replaced blocks around the new one
    for taken in range(neighbours):
        if position + step not in inside:
            break
        position += step  # an unreplaced neighbour
        while taken < neighbours - 1 and position + step in inside and names[position + step] in replaced:
            position += step  # replaced blocks between two neighbours
    return position


def sandwich_span(names: list[str], replaced: set[str], index: int, width: int = 3) -> list[str]:
    """The blocks trained together after replacing ``names[index]``.

    The run of replaced blocks around it, plus ``(width − 1) / 2`` unreplaced neighbours on each side
    (with the replaced blocks between them), one-sided at the ends of the stack: width 1 is the run of
    linear layers alone, width 3 adds the nearest unreplaced blocks ``u`` and ``d`` (the paper's), width 5
    two on each side.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}")
    neighbours = (width - 1) // 2
    low = _edge(names, replaced, index, neighbours, -1)
    high = _edge(names, replaced, index, neighbours, +1)
    return names[low : high + 1]
