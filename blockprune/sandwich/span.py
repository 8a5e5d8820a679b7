"""Which blocks a sandwich spans."""

from __future__ import annotations

from collections.abc import Iterable

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


def sandwich_span(names: list[str], replaced: set[str], index: int, width: int = 3,
                  free: Iterable[str] = ()) -> list[str]:
    """The blocks trained together after replacing ``names[index]``.

    The run of replaced blocks around it, plus ``(width − 1) / 2`` unreplaced neighbours on each side
    (with the replaced blocks between them), one-sided at the ends of the stack: width 1 is the run of
    linear layers alone, width 3 adds the nearest unreplaced blocks ``u`` and ``d`` (the paper's), width 5
    two on each side.

    A span whose last block is in ``free`` (:func:`free_outputs`: an earlier stage trained its output to serve the
    blocks after it, not to match the unpruned block) runs on to the first block that is not, so that its target,
    the unpruned blocks' output, is what the blocks after the span were trained to take.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}")
    neighbours = (width - 1) // 2
    low = _edge(names, replaced, index, neighbours, -1)
    high = _edge(names, replaced, index, neighbours, +1)
    free = set(free)
    while names[high] in free and high + 1 < len(names):
        high += 1
    return names[low : high + 1]


def free_outputs(spans: Iterable[list[str]]) -> set[str]:
    """The blocks whose outputs sandwich stages that trained ``spans`` (in order) left free: every block of a
    span but its last, whose output was trained towards the unpruned model's."""
    free: set[str] = set()
    for span in spans:
        free.update(span[:-1])
        free.discard(span[-1])
    return free
