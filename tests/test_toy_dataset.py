"""The toy shapes dataset: determinism, the held-out split, images that match their attributes."""

import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.toy import (
    ShapesDataset,
    all_captions,
    sample_batch,
    split_ids,
    vocabulary,
)
from blockprune.toy.captions import caption_tokens, parse_caption, tokenize, words
from blockprune.toy.checker import Shape, relation_holds
from blockprune.toy.dataset import IMAGE_SIZE, shape_masks


def test_same_seed_gives_the_same_samples_and_another_seed_others():
    a, b, c = sample_batch(64, seed=3), sample_batch(64, seed=3), sample_batch(64, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.centres, b.centres)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions
    dataset = ShapesDataset(seed=1, length=10)
    assert torch.equal(dataset[5]["image"], ShapesDataset(seed=1, length=10)[5]["image"])
    assert dataset[5]["caption"] == ShapesDataset(seed=1, length=10)[5]["caption"]
    assert not torch.equal(dataset[5]["image"], dataset[6]["image"])
    with pytest.raises(IndexError):
        dataset[10]


def test_held_out_captions_are_disjoint_from_training_and_never_sampled_there():
    train, held_out = set(split_ids("train").tolist()), set(split_ids("held_out").tolist())
    assert train.isdisjoint(held_out) and train | held_out == set(range(len(all_captions())))
    layouts = {all_captions()[i].layout for i in held_out}
    assert layouts == {"pair", "count"} and len(held_out) >= 30
    training_words = {w for i in train for w in words(all_captions()[i].text)}
    assert {w for i in held_out for w in words(all_captions()[i].text)} <= training_words  # combinations are new, words not
    assert set(sample_batch(512, "train", seed=0).caption_ids.tolist()) <= train
    assert set(sample_batch(128, "held_out", seed=0).caption_ids.tolist()) <= held_out


def test_every_layout_is_sampled_and_images_match_their_attributes():
    batch = sample_batch(256, seed=5)
    assert {parse_caption(c).layout for c in batch.captions} == {"single", "pair", "count"}
    assert batch.images.shape == (256, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= batch.images.min() and batch.images.max() <= 1
    masks = shape_masks(batch.kinds, batch.centres, batch.sizes)
    for index, caption in enumerate(batch.captions):
        parsed = parse_caption(caption)
        used = batch.kinds[index] >= 0
        assert int(used.sum()) == len(parsed.objects)
        assert int(masks[index].sum(0).max()) == 1  # shapes never overlap
        for slot in range(int(used.sum())):
            assert masks[index, slot].sum() > 40  # whole shapes inside the image
        if parsed.relation:
            first, second = (Shape("", "", tuple(batch.centres[index, s].tolist()), 0, 0.0) for s in (0, 1))
            assert relation_holds(parsed.relation, first, second)


def test_words_map_to_ids_with_padding_unknowns_and_cutting():
    vocab = vocabulary()
    ids = tokenize(["A red CIRCLE", "a purple circle", "a red circle left of a blue triangle and more"], vocab)
    assert ids.shape == (3, 8)
    assert [vocab[i] for i in ids[0, :4]] == ["a", "red", "circle", "<pad>"]
    assert vocab[ids[1, 1]] == "<unk>"
    assert [vocab[i] for i in ids[2]] == "a red circle left of a blue triangle".split()
    assert caption_tokens().shape == (len(all_captions()), 8)


def test_bad_split_and_sampling_arguments_are_errors():
    with pytest.raises(BlockpruneError, match="unknown split 'test'; use one of train, held_out, all"):
        sample_batch(4, "test", seed=0)
    with pytest.raises(BlockpruneError, match="exactly one of them"):
        sample_batch(4)
    with pytest.raises(BlockpruneError, match="is not a caption of the toy shapes dataset"):
        parse_caption("a red fox")
