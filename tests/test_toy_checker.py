"""The checker reads dataset images back into their shapes (≥ 98 %) and judges captions strictly."""

import torch

from blockprune.toy import (
    all_captions,
    detect,
    image_features,
    judge,
    parse_caption,
    sample_batch,
)
from blockprune.toy.captions import COLOURS, KINDS
from blockprune.toy.checker import FEATURES
from blockprune.toy.dataset import render


def _expected_centre(kind: str, centre: list[float], size: float) -> tuple[float, float]:
    if kind == "triangle":  # the centroid of an apex-up triangle lies a third of the half-height below the box centre
        return centre[0], centre[1] + size / 6
    return centre[0], centre[1]


def test_checker_reads_dataset_images_at_98_percent():
    right = total = 0
    for split, count in (("train", 300), ("held_out", 100)):
        batch = sample_batch(count, split, seed=11)
        for index, shapes in enumerate(detect(batch.images)):
            truth = [
                (COLOURS[c], KINDS[k], _expected_centre(KINDS[k], batch.centres[index, s].tolist(), float(batch.sizes[index, s])))
                for s, (c, k) in enumerate(zip(batch.colours[index].tolist(), batch.kinds[index].tolist())) if k >= 0
            ]
            matched = len(shapes) == len(truth) and all(
                any(s.colour == c and s.kind == k and abs(s.centre[0] - x) < 1 and abs(s.centre[1] - y) < 1 for s in shapes)
                for c, k, (x, y) in truth
            )
            right += matched and judge(shapes, all_captions()[int(batch.caption_ids[index])]).correct
            total += 1
    assert right / total >= 0.98


def test_judge_names_what_is_wrong():
    colours = torch.tensor([[0, 2, -1]])  # a red circle left of a blue square
    kinds = torch.tensor([[0, 1, -1]])
    centres = torch.tensor([[[8.0, 16.0], [24.0, 16.0], [0.0, 0.0]]])
    sizes = torch.tensor([[11.0, 11.0, 0.0]])
    shapes = detect(render(colours, kinds, centres, sizes))[0]
    assert judge(shapes, parse_caption("a red circle left of a blue square")).correct
    flipped = judge(shapes, parse_caption("a blue square left of a red circle"))
    assert not flipped.correct and flipped.relation is False and flipped.count and flipped.colours and flipped.kinds
    wrong_colour = judge(shapes, parse_caption("a green circle left of a blue square"))
    assert not wrong_colour.correct and not wrong_colour.colours and wrong_colour.kinds
    assert not judge(shapes, parse_caption("a red circle")).count
    assert not judge(shapes, parse_caption("two red circles")).correct
    assert judge([], parse_caption("a red circle")).correct is False


def test_features_count_shapes_and_colours():
    batch = sample_batch(32, seed=2)
    features = image_features(batch.images)
    assert features.shape == (32, FEATURES) and features.dtype == torch.float64
    counts = torch.tensor([len(parse_caption(c).objects) for c in batch.captions], dtype=torch.float64)
    assert torch.equal(features[:, :12].sum(1), counts) and torch.equal(features[:, 12], counts)
    assert torch.allclose(features[:, 13:19].sum(1), torch.ones(32, dtype=torch.float64))  # pixel shares sum to 1
    blank = image_features(torch.ones(1, 3, 32, 32) * 0.95)
    assert blank[0, 12] == 0 and blank[0, 14] == 1  # no shapes, all background
