"""The toy shapes dataset: 32×32 RGB images of one to three shapes on a plain background, with captions.

Generated on the fly in torch, a whole batch at a time on any device, deterministic for a given
generator (or seed) and device. Every sample keeps its attributes (caption id, each shape's colour,
kind, centre and size) so that generated images can be checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import BlockpruneError
from .captions import (
    LAYOUTS,
    MAX_SHAPES,
    RELATIONS,
    all_captions,
    attribute_table,
    caption_tokens,
    split_ids,
)

IMAGE_SIZE = 32
BACKGROUND = (0.95, 0.95, 0.95)
PALETTE = (  # RGB of each colour in captions.COLOURS
    (0.85, 0.12, 0.12),
    (0.10, 0.60, 0.20),
    (0.13, 0.27, 0.85),
    (0.95, 0.75, 0.05),
)
LAYOUT_WEIGHTS = {"single": 1 / 3, "pair": 1 / 3, "count": 1 / 3}  # share of each layout in sampling
# Side / diameter in pixels. Below 10 pixels a circle's pixels can fill 94 % of its box and pass for a square.
SIZES = {"single": (10.0, 16.0), "pair": (10.0, 12.0), "grid": (10.0, 12.0)}
MARGIN = 1.0  # pixels between a shape and the image border
GAP = 3.0  # least empty pixels between two shapes
GRID = 2  # three identical shapes go to distinct cells of a GRID × GRID grid; two are laid out as a pair


@dataclass
class ShapeBatch:
    """A batch of samples: images in [0, 1], caption ids and word ids, and per-shape attributes.

    ``colours``/``kinds`` are ``(B, 3)`` indices into ``COLOURS``/``KINDS`` (``-1`` for an unused slot),
    ``centres`` ``(B, 3, 2)`` as (x, y) in pixels, ``sizes`` ``(B, 3)`` in pixels.
    """

    images: torch.Tensor
    caption_ids: torch.Tensor
    tokens: torch.Tensor
    colours: torch.Tensor
    kinds: torch.Tensor
    centres: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return len(self.caption_ids)

    @property
    def captions(self) -> list[str]:
        """The caption of every sample."""
        captions = all_captions()
        return [captions[i].text for i in self.caption_ids.tolist()]


# Constant tensors are built once per device: a copy to the GPU inside the training loop would stall it.
@lru_cache(maxsize=None)
def _table_on(device: str) -> dict[str, torch.Tensor]:
    """The caption attribute table and word ids (indexed by caption id) on ``device``."""
    return {**{k: v.to(device) for k, v in attribute_table().items()}, "tokens": caption_tokens().to(device)}


@lru_cache(maxsize=None)
def _colours_on(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The palette ``(colours, 3)`` and the background colour ``(3,)`` on ``device``."""
    return torch.tensor(PALETTE, device=device), torch.tensor(BACKGROUND, device=device)


@lru_cache(maxsize=None)
def _split_on(split: str, device: str) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The layouts present in ``split``, their sampling weights and, per layout, its caption ids, on ``device``."""
    ids = split_ids(split)
    layouts = attribute_table()["layout"][ids]
    present = [i for i in range(len(LAYOUTS)) if bool((layouts == i).any())]
    weights = torch.tensor([LAYOUT_WEIGHTS[LAYOUTS[i]] for i in present])
    pools = tuple(ids[layouts == i].to(device) for i in present)
    return torch.tensor(present, device=device), weights.to(device), pools


def _uniform(low: torch.Tensor | float, high: torch.Tensor | float, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def sample_caption_ids(count: int, split: str, generator: torch.Generator) -> torch.Tensor:
    """``count`` caption ids of ``split`` on the generator's device: a layout drawn by ``LAYOUT_WEIGHTS``, then a
    caption of that layout uniformly."""
    device = generator.device
    present, weights, pools = _split_on(split, str(device))
    chosen = present[torch.multinomial(weights, count, replacement=True, generator=generator)]
    picks = torch.zeros(count, dtype=torch.long, device=device)
    for layout, pool in zip(present.unbind(), pools):
        index = torch.randint(len(pool), (count,), generator=generator, device=device)
        picks = torch.where(chosen == layout, pool[index], picks)
    return picks


def _single_layout(n: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = _uniform(*SIZES["single"], (n, 1), generator, device).expand(n, MAX_SHAPES).contiguous()
    half = sizes[:, :1] / 2
    centre = _uniform(MARGIN + half, IMAGE_SIZE - MARGIN - half, (n, 2), generator, device)
    return centre[:, None, :].expand(n, MAX_SHAPES, 2).contiguous(), sizes


def _pair_layout(n: int, relation: torch.Tensor, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two shapes, the first above (relation 0) or left of (relation 1) the second: apart along that axis by
    more than along the other one, and never touching."""
    sizes = _uniform(*SIZES["pair"], (n, MAX_SHAPES), generator, device)
    half_a, half_b = sizes[:, 0] / 2, sizes[:, 1] / 2
    longest = IMAGE_SIZE - 2 * MARGIN - half_a - half_b  # distance between centres along the axis that still fits
    distance = _uniform(half_a + half_b + GAP, longest, (n,), generator, device)
    main_a = _uniform(MARGIN + half_a, IMAGE_SIZE - MARGIN - half_b - distance, (n,), generator, device)
    main_b = main_a + distance
    cross_a = _uniform(MARGIN + half_a, IMAGE_SIZE - MARGIN - half_a, (n,), generator, device)
    offset = _uniform(-distance / 2, distance / 2, (n,), generator, device)
    cross_b = torch.minimum(torch.maximum(cross_a + offset, MARGIN + half_b), IMAGE_SIZE - MARGIN - half_b)
    vertical = relation == 0
    a = torch.stack([torch.where(vertical, cross_a, main_a), torch.where(vertical, main_a, cross_a)], -1)
    b = torch.stack([torch.where(vertical, cross_b, main_b), torch.where(vertical, main_b, cross_b)], -1)
    return torch.stack([a, b, b], 1), sizes


def _grid_layout(n: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes in distinct cells of a grid, jittered as far as keeps ``GAP`` pixels between neighbours."""
    sizes = _uniform(*SIZES["grid"], (n, MAX_SHAPES), generator, device)
    cell = IMAGE_SIZE / GRID
    cells = torch.argsort(torch.rand(n, GRID * GRID, generator=generator, device=device), dim=1)[:, :MAX_SHAPES]
    origin = torch.stack([cells % GRID, cells // GRID], -1).float() * cell + cell / 2
    slack = ((cell - sizes - GAP) / 2).clamp(min=0)[..., None]
    return origin + _uniform(-slack, slack, (n, MAX_SHAPES, 2), generator, device), sizes


def sample_layout(caption_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``(B, 3, 2)`` and sizes ``(B, 3)`` of the shapes of each caption.

    Single shapes anywhere; pairs, and two identical shapes (in a random relation), along an axis;
    three identical shapes on a grid. Every layout is drawn for the whole batch, then picked per sample.
    """
    device, n = caption_ids.device, len(caption_ids)
    table = {k: v[caption_ids] for k, v in _table_on(str(device)).items()}
    random_relation = torch.randint(len(RELATIONS), (n,), generator=generator, device=device)
    relation = torch.where(table["relation"] >= 0, table["relation"], random_relation)
    centres, sizes = _single_layout(n, generator, device)
    pair_centres, pair_sizes = _pair_layout(n, relation, generator, device)
    grid_centres, grid_sizes = _grid_layout(n, generator, device)
    as_pair = table["count"] == 2
    as_grid = table["count"] == 3
    centres = torch.where(as_pair[:, None, None], pair_centres, torch.where(as_grid[:, None, None], grid_centres, centres))
    sizes = torch.where(as_pair[:, None], pair_sizes, torch.where(as_grid[:, None], grid_sizes, sizes))
    return centres, sizes


def shape_masks(kinds: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Boolean masks ``(B, S, H, W)`` of the shapes (kind ``-1``: empty), sampled at pixel centres.

    A circle has diameter ``size``, a square side ``size``, a triangle (apex up) base and height ``size``.
    """
    coords = torch.arange(image_size, device=centres.device, dtype=centres.dtype) + 0.5
    dx = coords.view(1, 1, 1, -1) - centres[..., 0, None, None]
    dy = coords.view(1, 1, -1, 1) - centres[..., 1, None, None]
    r = (sizes / 2)[..., None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r) & (dy.abs() <= r)
    triangle = (dy <= r) & (dx.abs() <= (dy + r) / 2)
    kinds = kinds[..., None, None]
    return ((kinds == 0) & circle) | ((kinds == 1) & square) | ((kinds == 2) & triangle)


def render(colours: torch.Tensor, kinds: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1]: the shapes painted in slot order on the background."""
    masks = shape_masks(kinds, centres, sizes)
    palette, background = _colours_on(str(centres.device))
    n = len(colours)
    images = background.view(1, 3, 1, 1).expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for slot in range(colours.shape[1]):
        colour = palette[colours[:, slot].clamp(min=0)].view(n, 3, 1, 1)
        images = torch.where(masks[:, slot, None], colour, images)
    return images.contiguous()


def sample_batch(
    count: int,
    split: str = "train",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> ShapeBatch:
    """``count`` fresh samples of ``split``, from ``generator`` (on the batch's device) or a new one seeded ``seed``."""
    if (generator is None) == (seed is None):
        raise BlockpruneError("pass either generator= or seed= to sample_batch (exactly one of them)")
    if generator is None:
        generator = torch.Generator(device or "cpu").manual_seed(seed)
    return batch_for_captions(sample_caption_ids(count, split, generator), generator)


def batch_for_captions(caption_ids: torch.Tensor, generator: torch.Generator) -> ShapeBatch:
    """Samples of the given captions (for example the prompts of a generation run), on the generator's device."""
    ids = caption_ids.to(generator.device)
    table = {k: v[ids] for k, v in _table_on(str(ids.device)).items()}
    centres, sizes = sample_layout(ids, generator)
    images = render(table["colour"], table["kind"], centres, sizes)
    return ShapeBatch(images, ids, table["tokens"], table["colour"], table["kind"], centres, sizes)


class ShapesDataset(torch.utils.data.Dataset):
    """Indexable view of the dataset: item ``i`` of ``split`` with ``seed`` is always the same sample.

    Each item is a dict with ``image`` (3, 32, 32), ``caption`` and its attributes.
    """

    def __init__(self, split: str = "train", seed: int = 0, length: int = 10_000) -> None:
        split_ids(split)  # checks the name
        self.split, self.seed, self.length = split, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} samples")
        batch = sample_batch(1, self.split, seed=self.seed * 1_000_003 + index)
        return {
            "image": batch.images[0],
            "caption": batch.captions[0],
            "caption_id": int(batch.caption_ids[0]),
            "colours": batch.colours[0],
            "kinds": batch.kinds[0],
            "centres": batch.centres[0],
            "sizes": batch.sizes[0],
        }
