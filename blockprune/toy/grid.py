"""Side-by-side image grids: one labelled row per model, one column per prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..errors import BlockpruneError

LABEL_WIDTH = 150


def image_grid(rows: dict[str, torch.Tensor], scale: int = 3) -> Image.Image:
    """A PIL image with one row per ``label → images (N, 3, H, W) in [0, 1]``, its label on the left.

    Every row must hold the same number of images of one size (the same prompts and seeds, so columns compare).
    """
    if not rows:
        raise BlockpruneError("image_grid needs at least one row of images")
    shapes = {tuple(images.shape) for images in rows.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise BlockpruneError(f"every row must hold images of one shape (N, 3, H, W); got {sorted(shapes)}")
    count, _, height, width = next(iter(shapes))
    cell_h, cell_w = height * scale, width * scale
    grid = Image.new("RGB", (LABEL_WIDTH + count * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, images) in enumerate(rows.items()):
        top = row * (cell_h + 2)
        draw.text((4, top + cell_h // 2 - 6), label, fill="black")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for column, array in enumerate(pixels):
            cell = Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(cell, (LABEL_WIDTH + column * (cell_w + 2), top))
    return grid


def save_image_grid(rows: dict[str, torch.Tensor], path: str | Path, scale: int = 3) -> Path:
    """Write :func:`image_grid` as a PNG to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale).save(path)
    return path
