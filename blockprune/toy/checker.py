"""A deterministic checker that reads toy shapes images: which shapes, of which colour, where.

Segmentation: every pixel goes to the nearest of the background and palette colours (or to none
when it is far from all of them); connected pixels of one colour form a component; components
smaller than ``MIN_AREA`` are noise. Each shape is classified by the nearest of three prototypes
in a space of geometric features: its fill of its bounding box (circle about 0.8, square 1,
triangle about 0.55), the share of its area in the top half of the box (triangle, apex up: about
1/4; the others 1/2) and, with a small weight, the share of its box's corners it covers (square
all four, triangle the bottom two, circle none), which tells a coarsely pixelated circle (up to
90 % of its box) from a square.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .captions import COLOURS, KINDS, Caption
from .dataset import BACKGROUND, PALETTE

MIN_AREA = 10  # pixels; smaller components are noise
MAX_COLOUR_DISTANCE = 0.45  # RGB distance beyond which a pixel matches no reference colour
CORNER_WEIGHT = 0.1
PROTOTYPES = torch.tensor([[0.8, 0.5, 0.0], [1.0, 0.5, CORNER_WEIGHT], [0.55, 0.27, CORNER_WEIGHT / 2]])  # per kind
FEATURES = 25  # length of image_features()' vectors


@dataclass(frozen=True)
class Shape:
    """A shape found in an image: kind, colour, centre (x, y) in pixels, area in pixels and fill of its box."""

    kind: str
    colour: str
    centre: tuple[float, float]
    area: int
    fill: float


def colour_classes(images: torch.Tensor) -> torch.Tensor:
    """Per pixel ``(N, H, W)``: 0 background, 1.. the colours in ``COLOURS`` order, -1 none (far from all)."""
    references = torch.tensor((BACKGROUND, *PALETTE), dtype=images.dtype, device=images.device)
    distance = torch.cdist(images.permute(0, 2, 3, 1).reshape(len(images), -1, 3), references[None].expand(len(images), -1, -1))
    nearest, index = distance.min(-1)
    index = torch.where(nearest > MAX_COLOUR_DISTANCE, -1, index)
    return index.view(len(images), *images.shape[2:])


def _max_3x3(values: torch.Tensor) -> torch.Tensor:
    """3 × 3 maximum filter over the last two dimensions (zero outside), separably."""
    padded = F.pad(values, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def component_labels(masks: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean masks ``(N, C, H, W)``: one id per component (the largest flat
    pixel index in it), ``-1`` outside the masks. Ids spread by 3 × 3 maximum filtering until nothing changes
    (in int16, for speed: images up to 181 × 181 pixels)."""
    height, width = masks.shape[-2:]
    flat = masks.flatten(0, 1)
    used = flat.flatten(1).any(1)  # only masks with pixels take part
    inside = flat[used].to(torch.int16)
    labels = torch.arange(1, height * width + 1, dtype=torch.int16).view(height, width) * inside
    while True:
        updated = _max_3x3(labels) * inside
        if torch.equal(updated, labels):
            break
        labels = updated
    result = torch.zeros(flat.shape, dtype=torch.long)
    result[used] = labels.long()
    return (result - 1).view(masks.shape)


def _components(classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of every connected single-colour component of every image (flat over all images)."""
    n, height, width = classes.shape
    masks = classes[:, None] == torch.arange(1, len(COLOURS) + 1, device=classes.device).view(1, -1, 1, 1)
    labels = component_labels(masks)  # (N, C, H, W)
    image, colour, y, x = torch.nonzero(labels >= 0, as_tuple=True)
    key = (image * len(COLOURS) + colour) * height * width + labels[image, colour, y, x]
    keys, inverse = torch.unique(key, return_inverse=True)
    count = len(keys)

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        start = torch.zeros(count, dtype=values.dtype, device=values.device)
        return start.scatter_reduce(0, inverse, values, how, include_self=False)

    ones = torch.ones_like(x, dtype=torch.float32)
    area = reduce(ones, "sum")
    x0, x1 = reduce(x, "amin"), reduce(x, "amax")
    y0, y1 = reduce(y, "amin"), reduce(y, "amax")
    box = ((x1 - x0 + 1) * (y1 - y0 + 1)).float()
    top = reduce((2 * (y - y0[inverse]) < (y1 - y0 + 1)[inverse]).float(), "sum")
    component_image = keys // (len(COLOURS) * height * width)
    component_colour = (keys // (height * width)) % len(COLOURS)
    component_label = keys % (height * width)
    corners = sum(
        (labels[component_image, component_colour, cy, cx] == component_label).float()
        for cy in (y0, y1) for cx in (x0, x1)
    ) / 4
    return {
        "image": component_image,
        "colour": component_colour,
        "area": area,
        "centre": torch.stack([reduce(x.float() + 0.5, "sum"), reduce(y.float() + 0.5, "sum")], -1) / area[:, None],
        "fill": area / box,
        "top": top / area,
        "corners": corners,
    }


def _classify(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    features = torch.stack([stats["fill"], stats["top"], CORNER_WEIGHT * stats["corners"]], -1)
    return torch.cdist(features, PROTOTYPES.to(features)).argmin(-1)


def detect(images: torch.Tensor) -> list[list[Shape]]:
    """The shapes in each image ``(N, 3, H, W)`` in [0, 1], left to right then top to bottom."""
    stats = _components(colour_classes(images.float().cpu()))
    kept = stats["area"] >= MIN_AREA
    kinds = _classify(stats)
    found: list[list[Shape]] = [[] for _ in range(len(images))]
    for index in torch.nonzero(kept).flatten().tolist():
        cx, cy = stats["centre"][index].tolist()
        shape = Shape(KINDS[int(kinds[index])], COLOURS[int(stats["colour"][index])], (cx, cy),
                      int(stats["area"][index]), float(stats["fill"][index]))
        found[int(stats["image"][index])].append(shape)
    return [sorted(shapes, key=lambda s: (s.centre[0], s.centre[1])) for shapes in found]


def image_features(images: torch.Tensor) -> torch.Tensor:
    """A vector of ``FEATURES`` checker features per image ``(N, FEATURES)``, float64, for Fréchet distances.

    Shapes per (colour, kind) (12), number of shapes, share of pixels per colour class and of unmatched
    pixels (6), mean centre x and y, mean area, fill and top share of the shapes (5, in [0, 1] units), and
    the number of noise components.
    """
    images = images.float().cpu()
    n, _, height, width = images.shape
    classes = colour_classes(images)
    stats = _components(classes)
    kept = stats["area"] >= MIN_AREA
    features = torch.zeros(n, FEATURES, dtype=torch.float64)
    kinds = _classify(stats)
    image = stats["image"]
    per_kind = image * len(COLOURS) * len(KINDS) + stats["colour"] * len(KINDS) + kinds
    counts = torch.zeros(n * len(COLOURS) * len(KINDS), dtype=torch.float64).index_add_(0, per_kind[kept], torch.ones(int(kept.sum()), dtype=torch.float64))
    features[:, :12] = counts.view(n, -1)
    shapes = features[:, :12].sum(1)
    features[:, 12] = shapes
    for column, value in enumerate(range(-1, len(COLOURS) + 1)):
        features[:, 13 + column] = (classes == value).flatten(1).double().mean(1)
    per_image = [
        stats["centre"][:, 0] / width, stats["centre"][:, 1] / height, stats["area"] / (height * width), stats["fill"], stats["top"],
    ]
    for column, values in enumerate(per_image):
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, image[kept], values[kept].double())
        features[:, 19 + column] = total / shapes.clamp(min=1)
    features[:, 24] = torch.zeros(n, dtype=torch.float64).index_add_(0, image[~kept], torch.ones(int((~kept).sum()), dtype=torch.float64))
    return features


@dataclass(frozen=True)
class Judgement:
    """Whether an image shows its caption: count, colours, kinds, the relation (pairs only) and all together."""

    count: bool
    colours: bool
    kinds: bool
    relation: bool | None
    correct: bool


def relation_holds(relation: str, first: Shape, second: Shape) -> bool:
    """Whether ``first`` is ``relation`` ``second``: the offset along the relation's axis has the right sign
    and is larger than the offset along the other axis."""
    dx, dy = first.centre[0] - second.centre[0], first.centre[1] - second.centre[1]
    along, across = {"above": (-dy, dx), "below": (dy, dx), "left of": (-dx, dy), "right of": (dx, dy)}[relation]
    return along > abs(across)


def judge(shapes: list[Shape], caption: Caption) -> Judgement:
    """Judge the shapes found in one image against its caption (GenEval-style: everything must hold)."""
    count = len(shapes) == len(caption.objects)
    colours = sorted(s.colour for s in shapes) == sorted(c for c, _ in caption.objects)
    kinds = sorted(s.kind for s in shapes) == sorted(k for _, k in caption.objects)
    objects = sorted((s.colour, s.kind) for s in shapes) == sorted(caption.objects)
    relation = None
    if caption.relation is not None:
        first = next((s for s in shapes if (s.colour, s.kind) == caption.objects[0]), None)
        second = next((s for s in shapes if (s.colour, s.kind) == caption.objects[1]), None)
        relation = first is not None and second is not None and relation_holds(caption.relation, first, second)
    return Judgement(count, colours, kinds, relation, objects and relation is not False)
