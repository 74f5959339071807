"""One image of the set: its COCO id, layout, captions and conversations. Image k of a split depends only on
(seed, split, k), never on how many images are generated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trimodal.data.shapes.drawing import ShapeObject, sample_layout
from trimodal.data.shapes.questions import Question, captions_for, group_questions, questions_for

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1}
"""Split -> the number that seeds its images apart from the other split's."""
VAL_ID_OFFSET = 1_000_000
"""COCO ids of held-out images start after this, so they never collide with training ids."""
HELD_OUT_SHARE: dict[str, float] = {"train": 0.0, "val": 0.5}
"""Chance that a question of a split is worded from the held-out set: never in training."""


@dataclass(frozen=True)
class ShapeSample:
    """Everything generated for one image: layout, captions and conversations."""

    split: str
    """train or val."""
    index: int
    """0-based position in its split."""
    image_id: int
    """COCO image id (`image_id_for`)."""
    background: tuple[int, int, int]
    """Background RGB."""
    objects: tuple[ShapeObject, ...]
    """Sorted left to right; captions name them in this order."""
    captions: tuple[str, ...]
    """The canonical caption first, then paraphrases."""
    conversations: tuple[tuple[Question, ...], ...]
    """One or two conversations of 2-4 turns, each question of the image asked once."""

    @property
    def file_name(self) -> str:
        return file_name_for(self.image_id)


def check_split(split: str) -> None:
    """Raise ValueError unless `split` is train or val."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_CODES)}")


def image_id_for(split: str, index: int) -> int:
    """COCO image id of image `index` (0-based) of a split."""
    check_split(split)
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def file_name_for(image_id: int) -> str:
    """COCO-style file name: 000000000042.png."""
    return f"{image_id:012d}.png"


def sample_image(seed: int, split: str, index: int) -> ShapeSample:
    """Generate image `index` of `split`; deterministic in (seed, split, index) only."""
    check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    background, objects = sample_layout(rng)
    # Wordings draw from their own stream, so the wording of questions can change without moving a shape or caption.
    language = np.random.default_rng([seed, SPLIT_CODES[split], index, 1])
    questions = questions_for(objects, language, HELD_OUT_SHARE[split])
    captions = captions_for(rng, objects)  # `rng` draws layout, captions, grouping in this order: it fixes the bytes
    return ShapeSample(
        split=split,
        index=index,
        image_id=image_id_for(split, index),
        background=background,
        objects=objects,
        captions=captions,
        conversations=group_questions(rng, questions),
    )
