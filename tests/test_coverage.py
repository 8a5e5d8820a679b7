"""Coverage: every transformer family diffusers ships, compressed through a built-in adapter or the generic one.

Each case (tests/families_*.py) is a tiny model built from the family's own constructor with random
weights. The matrix checks block discovery, that every found block can be swapped for a surrogate,
``compress(ratio=0.25)``, the compressed forward, and the save/load round trip; docs/compatibility.md
lists the same families and must agree with them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from families_image import FAMILIES as IMAGE
from families_misc import FAMILIES as MISC
from families_more import FAMILIES as MORE
from families_video import FAMILIES as VIDEO

import blockprune
from blockprune import LinearSurrogate, plugins
from blockprune.discovery.resolve import resolve_blocks
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import forward_batch, output_tensor

FAMILIES = IMAGE + VIDEO + MORE + MISC
SUPPORTED = [f for f in FAMILIES if f.failure is None]
OUT_OF_REACH = [f for f in FAMILIES if f.failure is not None]
TABLE = Path(__file__).parents[1] / "docs" / "compatibility.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on two busy cores run the matrix ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return output_tensor(forward_batch(model, batch, 0))


def replace_every_block(model: torch.nn.Module, family, batch: dict) -> list:
    """Find the blocks through the family's adapter and swap all of them for identity surrogates."""
    blocks = resolve_blocks(model, plugins.get_adapter(model, family.adapter), batch)
    for block in blocks:
        surrogate = LinearSurrogate.for_block(model.get_submodule(block.name), block.spec, block.stream_dims)
        model.set_submodule(block.name, surrogate)
    return blocks


def found_lists(blocks) -> dict[str, int]:
    lists: dict[str, int] = {}
    for block in blocks:
        path = block.name.rpartition(".")[0]
        lists[path] = lists.get(path, 0) + 1
    return lists


def found_streams(blocks) -> dict[str, set[tuple[str, ...]]]:
    streams: dict[str, set[tuple[str, ...]]] = {}
    for block in blocks:
        streams.setdefault(block.kind, set()).add(block.spec.streams)
    return streams


def expected_streams(family) -> dict[str, set[tuple[str, ...]]]:
    return {kind: value if isinstance(value, set) else {value} for kind, value in family.streams.items()}


def test_the_matrix_covers_at_least_fifteen_families_with_unique_names():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    assert len(SUPPORTED) >= 15


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_discovery_finds_the_expected_blocks_and_all_can_be_replaced(family):
    model = family.make()
    batch = family.batches(1, 0)[0]
    reference = run(model, batch)
    blocks = replace_every_block(model, family, batch)
    assert found_lists(blocks) == family.lists
    assert found_streams(blocks) == expected_streams(family)
    skipped = run(model, batch)  # the host's forward runs with no original block left
    assert skipped.shape == reference.shape and torch.isfinite(skipped).all()


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_compress_forward_and_round_trip(family, tmp_path):
    model = family.make()
    batches = family.batches(3, 0)
    held_out = family.batches(1, 1)[0]
    reference = run(model, held_out)
    # output_mse: in some tiny families the block that fits best (fit_residual, the default) leaves the output
    # bit-identical (Kandinsky 5's last text block), and the check below wants to see the replacement
    blockprune.compress(model, adapter=family.adapter, ratio=0.25, calibration=batches, sandwich=False,
                        importance="output_mse", progress=False)
    replaced = blockprune.plan(model).replaced
    assert len(replaced) == round(0.25 * family.blocks)
    assert all(isinstance(model.get_submodule(r.name), LinearSurrogate) for r in replaced)
    compressed = run(model, held_out)
    assert compressed.shape == reference.shape
    assert torch.isfinite(compressed).all()
    assert not torch.equal(compressed, reference)
    blockprune.save_pretrained(model, tmp_path)
    again = blockprune.from_pretrained(tmp_path)
    assert torch.equal(run(again, held_out), compressed)


@pytest.mark.parametrize("family", OUT_OF_REACH, ids=lambda f: f.name)
def test_out_of_reach_family_fails_with_its_cause(family):
    model = family.make()
    batch = family.batches(1, 0)[0]
    with pytest.raises(BlockpruneError, match=re.escape(family.failure)):
        replace_every_block(model, family, batch)
        run(model, batch)


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)` \((\w+)\)", cells[0]) if len(cells) >= 5 else None
        if match:
            rows[match.group(2)] = [match.group(1)] + cells[1:]
    return rows


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_compatibility_table_has_a_matching_row(family):
    row = table_rows().get(family.name)
    assert row is not None, f"docs/compatibility.md has no row for {family.name}"
    model_class, adapter, blocks, _, status = row[:5]
    assert model_class == type(family.make()).__name__
    assert adapter == f"`{family.adapter}`"
    for path, count in family.lists.items():
        assert f"`{path}` ×{count}" in blocks
    assert status.startswith("passes" if family.failure is None else "fails")
