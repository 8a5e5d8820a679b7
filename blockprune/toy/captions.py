"""The captions of the toy shapes dataset: grammar, attributes, vocabulary and the held-out split.

Every caption the dataset can produce is enumerated once, in a fixed order, so that a caption is
also an index (``caption_id``) into tensors of its attributes. Three layouts:

- ``single``: one shape, ``"a red circle"``;
- ``pair``: two different shapes in a spatial relation, ``"a red circle above a blue square"``;
- ``count``: two or three identical shapes, ``"two green triangles"``.

The held-out split is a fixed set of pair and count captions (combinations of words never seen
together in training); every word and every single shape still appears in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations

import torch

from ..errors import BlockpruneError

COLOURS = ("red", "green", "blue", "yellow")
KINDS = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
LAYOUTS = ("single", "pair", "count")
NUMBER_WORDS = {2: "two", 3: "three"}
MAX_SHAPES = 3
MAX_WORDS = 8  # "a red circle right of a blue triangle"
SPLITS = ("train", "held_out", "all")
PAD, UNKNOWN = "<pad>", "<unk>"

# Unordered object pairs whose pair captions (both orders, every relation) are held out.
HELD_OUT_PAIRS = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "circle")),
    (("blue", "circle"), ("red", "triangle")),
    (("yellow", "square"), ("green", "circle")),
    (("red", "square"), ("yellow", "triangle")),
    (("green", "square"), ("blue", "triangle")),
    (("yellow", "circle"), ("blue", "circle")),
    (("red", "triangle"), ("green", "triangle")),
)
HELD_OUT_COUNTS = ((2, "blue", "triangle"), (3, "red", "square"), (3, "yellow", "circle"), (2, "green", "circle"))


@dataclass(frozen=True)
class Caption:
    """One caption and what it says: layout, the shapes as ``(colour, kind)`` and, for pairs, the relation."""

    text: str
    layout: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    @property
    def held_out(self) -> bool:
        """Whether this caption belongs to the held-out split."""
        if self.layout == "pair":
            return frozenset(self.objects) in _held_out_pairs()
        if self.layout == "count":
            return (len(self.objects), *self.objects[0]) in HELD_OUT_COUNTS
        return False


@lru_cache(maxsize=None)
def _held_out_pairs() -> frozenset[frozenset[tuple[str, str]]]:
    return frozenset(frozenset(pair) for pair in HELD_OUT_PAIRS)


@lru_cache(maxsize=None)
def all_captions() -> tuple[Caption, ...]:
    """Every caption of the dataset in a fixed order: singles, pairs, counts."""
    objects = [(colour, kind) for colour in COLOURS for kind in KINDS]
    captions = [Caption(f"a {c} {k}", "single", ((c, k),)) for c, k in objects]
    for (c1, k1), (c2, k2) in permutations(objects, 2):
        for relation in RELATIONS:
            captions.append(Caption(f"a {c1} {k1} {relation} a {c2} {k2}", "pair", ((c1, k1), (c2, k2)), relation))
    for count, word in NUMBER_WORDS.items():
        for c, k in objects:
            captions.append(Caption(f"{word} {c} {k}s", "count", ((c, k),) * count))
    return tuple(captions)


@lru_cache(maxsize=None)
def _ids_by_text() -> dict[str, int]:
    return {caption.text: index for index, caption in enumerate(all_captions())}


def caption_id(text: str) -> int | None:
    """The index of the caption ``text`` (case and spacing ignored), or ``None`` if it is not a dataset caption."""
    return _ids_by_text().get(" ".join(words(text)))


def require_caption_id(text: str) -> int:
    """The index of the caption ``text``; an error if it is not one of the dataset's captions."""
    index = caption_id(text)
    if index is None:
        raise BlockpruneError(
            f"{text!r} is not a caption of the toy shapes dataset; use captions such as 'a red circle', "
            f"'a red circle above a blue square' or 'two green triangles' (see blockprune.toy.all_captions())"
        )
    return index


def parse_caption(text: str) -> Caption:
    """The :class:`Caption` that ``text`` is; an error if it is not one of the dataset's captions."""
    return all_captions()[require_caption_id(text)]


def split_ids(split: str) -> torch.Tensor:
    """Caption ids of ``split``: ``"train"``, ``"held_out"`` or ``"all"``."""
    if split not in SPLITS:
        raise BlockpruneError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return torch.tensor(
        [i for i, c in enumerate(all_captions()) if split == "all" or c.held_out == (split == "held_out")],
        dtype=torch.long,
    )


@lru_cache(maxsize=None)
def attribute_table() -> dict[str, torch.Tensor]:
    """Per-caption attribute tensors, indexed by caption id (``-1`` where a slot or relation is unused).

    ``layout`` (N,), ``count`` (N,), ``colour`` (N, 3), ``kind`` (N, 3), ``relation`` (N,).
    """
    captions = all_captions()
    colour = torch.full((len(captions), MAX_SHAPES), -1, dtype=torch.long)
    kind = torch.full_like(colour, -1)
    for index, caption in enumerate(captions):
        for slot, (c, k) in enumerate(caption.objects):
            colour[index, slot], kind[index, slot] = COLOURS.index(c), KINDS.index(k)
    return {
        "layout": torch.tensor([LAYOUTS.index(c.layout) for c in captions]),
        "count": torch.tensor([len(c.objects) for c in captions]),
        "colour": colour,
        "kind": kind,
        "relation": torch.tensor([RELATIONS.index(c.relation) if c.relation else -1 for c in captions]),
    }


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (letters only)."""
    return re.findall(r"[a-z]+", text.lower())


@lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    """The word-level vocabulary: padding, unknown, then every word of the captions, sorted."""
    found = {word for caption in all_captions() for word in words(caption.text)}
    return (PAD, UNKNOWN, *sorted(found))


def tokenize(prompts: list[str], vocab: tuple[str, ...] | list[str], max_words: int = MAX_WORDS) -> torch.Tensor:
    """Word ids ``(len(prompts), max_words)``: unknown words map to ``<unk>``, long prompts are cut, short ones padded."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = index[UNKNOWN]
    ids = torch.full((len(prompts), max_words), index[PAD], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [index.get(word, unknown) for word in words(prompt)][:max_words]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


@lru_cache(maxsize=None)
def caption_tokens() -> torch.Tensor:
    """Word ids of every caption, ``(N, MAX_WORDS)``, with the dataset's own vocabulary."""
    return tokenize([c.text for c in all_captions()], vocabulary())
