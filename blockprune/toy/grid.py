"""Side-by-side image grids: one labelled row per model, one column per prompt (labelled above), cells upscaled."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import BlockpruneError

LABEL_WIDTH = 150  # the row labels' margin, in pixels
MIN_CELL = 128  # small images are upscaled (nearest neighbour, whole factors) to at least this many pixels a side
GAP = 2
FONT_SIZE = 12


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """``text`` cut into lines at spaces, each at most ``width`` pixels wide where a word allows."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def upscale_factor(height: int, width: int) -> int:
    """The whole factor that brings the longer side to at least :data:`MIN_CELL` pixels (1 for big images)."""
    return max(1, math.ceil(MIN_CELL / max(height, width)))


def image_grid(rows: dict[str, torch.Tensor], scale: int | None = None, columns: list[str] | None = None) -> Image.Image:
    """A PIL image with one row per ``label → images (N, 3, H, W) in [0, 1]``, its label on the left, and
    ``columns`` (one label per image, e.g. its prompt) above the first row.

    Every row must hold the same number of images of one size (the same prompts and seeds, so columns compare).
    ``scale`` upscales each cell by a whole factor (default :func:`upscale_factor`: 32-pixel images become 128).
    """
    if not rows:
        raise BlockpruneError("image_grid needs at least one row of images")
    shapes = {tuple(images.shape) for images in rows.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise BlockpruneError(f"every row must hold images of one shape (N, 3, H, W); got {sorted(shapes)}")
    count, _, height, width = next(iter(shapes))
    if columns is not None and len(columns) != count:
        raise BlockpruneError(f"got {len(columns)} column labels for {count} images a row; give one per column")
    scale = upscale_factor(height, width) if scale is None else scale
    cell_h, cell_w = height * scale, width * scale
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = FONT_SIZE + 3
    wrapped = [_wrap(measure, text, cell_w - 4, font) for text in columns or []]
    header = (max(map(len, wrapped)) * line + 6) if wrapped else 0
    grid = Image.new("RGB", (LABEL_WIDTH + count * (cell_w + GAP), header + len(rows) * (cell_h + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(wrapped):
        for number, text in enumerate(lines):
            draw.text((LABEL_WIDTH + column * (cell_w + GAP) + 2, 3 + number * line), text, fill="black", font=font)
    for row, (label, images) in enumerate(rows.items()):
        top = header + row * (cell_h + GAP)
        lines = _wrap(draw, label, LABEL_WIDTH - 8, font)
        for number, text in enumerate(lines):
            draw.text((4, top + cell_h // 2 - len(lines) * line // 2 + number * line), text, fill="black", font=font)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for column, array in enumerate(pixels):
            cell = Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(cell, (LABEL_WIDTH + column * (cell_w + GAP), top))
    return grid


def save_image_grid(
    rows: dict[str, torch.Tensor], path: str | Path, scale: int | None = None, columns: list[str] | None = None
) -> Path:
    """Write :func:`image_grid` as a PNG to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale, columns).save(path)
    return path
