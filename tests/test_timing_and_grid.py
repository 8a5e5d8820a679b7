"""Honest latency figures and grids a person can judge (#20 items 3 and 4)."""

import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.runtime.timing import (
    Latency,
    compare_text,
    ratio_range,
    time_calls,
    time_interleaved,
)
from blockprune.toy.grid import LABEL_WIDTH, MIN_CELL, image_grid, upscale_factor


def test_calls_are_timed_in_turns_after_the_warm_up():
    order = []
    first, second = time_interleaved([lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=2)
    assert order == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed ones, alternating
    assert len(first.times) == len(second.times) == 3
    assert len(time_calls(lambda: None, repeats=4, warmup=0).times) == 4
    with pytest.raises(BlockpruneError, match="repeats must be at least 1"):
        time_calls(lambda: None, repeats=0)


def test_median_spread_and_the_ratio_range():
    before = Latency((0.010, 0.011, 0.012, 0.013, 0.050))  # one outlier moves the median little
    assert before.median == 0.012 and before.quartiles == (0.011, 0.013) and before.spread == pytest.approx(0.001)
    assert before.text() == "12.00 ms ± 1.00"
    faster = Latency((0.005, 0.0055, 0.006, 0.0065, 0.007))
    ratio, low, high = ratio_range(faster, before)
    assert ratio == pytest.approx(0.5) and low == pytest.approx(0.0055 / 0.013) and high == pytest.approx(0.0065 / 0.011)
    assert compare_text(faster, before).startswith("× 0.500 (0.423-0.591") and "within noise" not in compare_text(faster, before)


def test_a_difference_smaller_than_the_spread_is_called_noise():
    before = Latency((0.010, 0.012, 0.014, 0.016))
    after = Latency((0.011, 0.0115, 0.013, 0.015))
    assert "within noise" in compare_text(after, before)
    assert "within noise" in compare_text(Latency((0.01,)), Latency((0.01,)))  # one run each: no claim either way


def _images(count, side=32, value=0.5):
    return torch.full((count, 3, side, side), value)


def test_grid_rows_and_columns_are_labelled_and_small_cells_upscaled():
    assert upscale_factor(32, 32) == 4 and upscale_factor(1024, 1024) == 1
    rows = {"original": _images(3, value=0.2), "compressed: 4 of 20 blocks replaced (20%)": _images(3, value=0.8)}
    prompts = ["a red circle", "a blue square above a green triangle", "two red squares"]
    grid = image_grid(rows, columns=prompts).convert("L")
    cell = 32 * 4
    width, height = grid.size
    header = height - 2 * (cell + 2)
    assert width == LABEL_WIDTH + 3 * (cell + 2) and header > 0 and cell >= MIN_CELL

    def ink(box):  # dark pixels (text) in a region of the white margins
        return int((torch.tensor(list(grid.crop(box).tobytes())) < 128).sum())

    for column in range(3):  # each prompt is written above its column
        left = LABEL_WIDTH + column * (cell + 2)
        assert ink((left, 0, left + cell, header)) > 20
    for row in range(2):  # each row's label is written in the left margin
        top = header + row * (cell + 2)
        assert ink((0, top, LABEL_WIDTH - 2, top + cell)) > 20
    assert grid.getpixel((LABEL_WIDTH + 5, header + 5)) == round(0.2 * 255)  # the images sit below the header
    with pytest.raises(BlockpruneError, match="got 2 column labels for 3 images"):
        image_grid(rows, columns=prompts[:2])


def test_a_grid_without_column_labels_has_no_header():
    grid = image_grid({"a": _images(2, side=8)}, scale=2)
    assert grid.size == (LABEL_WIDTH + 2 * (16 + 2), 16 + 2)
