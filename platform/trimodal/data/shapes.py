"""The synthetic "shapes" set: the embedded default's training and held-out data. Written in the COCO-captions and LLaVA-Instruct formats, so the same code path reads it.

Each 224x224 RGB image shows one or two non-overlapping shapes (circle, square, triangle) in six saturated
colours on a plain light background. The set is written in the COCO captions and LLaVA-Instruct formats so the
same code reads it as the real data, plus a ground-truth file for evaluation:

    DIR/train2017/000000000001.png ...             training images, COCO ids 1 .. n_train
    DIR/val2017/000001000001.png ...               held-out images, COCO ids VAL_ID_OFFSET + 1 ..
    DIR/annotations/captions_{train,val}2017.json  COCO captions, 3 per image (the first is the canonical one)
    DIR/llava_instruct.json                        LLaVA-Instruct conversations about the training images
    DIR/llava_instruct_val.json                    the same for the held-out images
    DIR/shapes_meta.json                           objects (colour, shape, bbox) and, per question, type, expected
                                                   answer and phrasing set

Questions come in six types (QUESTION_TYPES), each asked in many wordings (PHRASINGS) and answered in varied
wordings that always name exactly the expected colour, shape, number or objects. A fixed set of wordings per type is
held out: training conversations never use it, held-out ones ask both sets, and `phrasing_of` tells which set (and
type) a question's text comes from, so evaluation can score seen and held-out wordings apart.

Image k of a split depends only on (seed, split, k): never on how many images are generated. Re-running into the
same directory rewrites nothing that is already identical, and yields byte-identical files.

    summary = write_shapes_dataset("runs/demo/shapes", n_train=2000, n_val=200, seed=0)
"""

from __future__ import annotations

import io
import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from trimodal.files import is_scratch, write_bytes_atomic

IMAGE_SIZE = 224
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (240, 210, 0),
    "purple": (130, 30, 170),
    "orange": (255, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "describe", "exists", "side")
PHRASING_SETS: tuple[str, ...] = ("seen", "held_out")
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "seen": ("What color is {thing}?", "What colour is {thing}?", "Which color is {thing}?",
                 "What is the color of {thing}?", "Tell me the colour of {thing}.", "Color of {thing}?",
                 "What color is it?", "Could you tell me what color {thing} in this image is?",
                 "In which colour is {thing} drawn?"),
        "held_out": ("Which color does {thing} have?", "Name the colour of {thing}.",
                     "Identify the color of {thing}."),
    },
    "shape": {
        "seen": ("What shape is {thing}?", "Which shape is {thing}?", "What kind of shape is {thing}?",
                 "What is the shape of {thing}?", "Tell me the shape of {thing}.", "Shape of {thing}?",
                 "What shape is it?", "Could you tell me what shape {thing} in this image has?",
                 "What form does {thing} have?"),
        "held_out": ("Which kind of shape is {thing}?", "Name the shape of {thing}.", "Identify the shape of {thing}."),
    },
    "count": {
        "seen": ("How many shapes are there?", "How many objects are there?", "How many shapes are in the image?",
                 "How many objects can you see?", "Count the shapes.", "What is the number of shapes?",
                 "Tell me how many shapes there are.", "How many shapes does the picture show?",
                 "Number of shapes?"),
        "held_out": ("How many things are drawn?", "Count the objects in the picture.",
                     "Identify the number of shapes."),
    },
    "describe": {
        "seen": ("Describe the image.", "Describe the picture.", "What is in the image?", "What do you see?",
                 "Tell me what the image shows.", "What does the picture show?", "Describe what you see.",
                 "List the shapes in the image.", "Give a short description of the image."),
        "held_out": ("What is shown in this picture?", "Name the objects in the image.",
                     "Identify everything in the picture."),
    },
    "exists": {
        "seen": ("Is there {item}?", "Is there {item} in the image?", "Do you see {item}?", "Can you see {item}?",
                 "Does the image contain {item}?", "Does the picture show {item}?", "Is {item} shown?",
                 "Tell me if there is {item}.", "Could you check whether the image has {item} in it?"),
        "held_out": ("Is {item} visible?", "Does this picture have {item}?", "Is {item} present in the picture?"),
    },
    "side": {
        "seen": ("What color is the shape on the {side}?", "What colour is the object on the {side}?",
                 "Which color is the {side} shape?", "What is the color of the {side} object?",
                 "Tell me the colour of the shape on the {side}.", "What color is the {side} one?",
                 "What color is the {side}most shape?", "Could you tell me what colour the shape on the {side} is?",
                 "The shape on the {side}: what color is it?"),
        "held_out": ("Which color does the {side} shape have?", "Name the colour of the object on the {side}.",
                     "Identify the color of the shape on the {side} side."),
    },
}
"""Question wordings per type and phrasing set. {thing}: the object asked about ('the circle'; in a one-object image
also 'the shape' or 'the object'; for `shape`, 'the red object' / 'the red shape' / 'the red one'); a colour or shape
wording without {thing} ('What color is it?') is asked about one-object images only. {item}: 'a red circle'.
{side}: left or right. The first seen wording of the first four types is the set's original wording ("What color is the {shape}?", ...)."""
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": ("{Thing} is {color}.", "It is {color}.", "It's {color}.", "{Color}.", "The color is {color}.",
              "{Thing} is colored {color}."),
    "shape": ("It is a {shape}.", "It's a {shape}.", "{Thing} is a {shape}.", "A {shape}.", "That is a {shape}."),
    "count": ("There {is} {n} {shapes}.", "There {is} {n} {objects}.", "{N}.", "I can see {n} {shapes}.",
              "The image shows {n} {shapes}."),
    "describe": ("{Caption}.", "The image shows {caption}.", "I see {caption}.", "It shows {caption}.",
                 "This is a picture of {caption}."),
    "yes": ("Yes, there is {item}.", "Yes.", "Yes, I can see {item}.", "Yes, the image shows {item}."),
    "no": ("No, there is no {color} {shape}.", "No.", "No, I cannot see {item}.",
           "No, the image shows no {color} {shape}."),
    "side": ("The {side} shape is {color}.", "It is {color}.", "{Color}.", "The shape on the {side} is {color}.",
             "The {side} one is {color}.", "It is the {color} {shape}."),
}
"""Answer wordings: `yes` / `no` answer `exists`; each names the expected colour, shape or number and no other."""
SIDE_MIN_DX = 40
"""Left/right questions are asked only when the two centres' x differ by at least this many px."""
SPLIT_DIRS: dict[str, str] = {"train": "train2017", "val": "val2017"}
CAPTION_FILES: dict[str, str] = {"train": "captions_train2017.json", "val": "captions_val2017.json"}
LLAVA_FILES: dict[str, str] = {"train": "llava_instruct.json", "val": "llava_instruct_val.json"}
META_FILE = "shapes_meta.json"
VAL_ID_OFFSET = 1_000_000
"""COCO ids of held-out images start after this, so they never collide with training ids."""
MIN_RADIUS, MAX_RADIUS = 25, 55
"""Radius range (px) of the circle every shape is inscribed in."""
EDGE_MARGIN = 4
"""Minimum gap (px) between a shape's bounding circle and the image border."""
GAP = 8
"""Minimum gap (px) between the bounding circles of two shapes."""
CAPTIONS_PER_IMAGE = 3
PNG_PARAMS: dict[str, Any] = {"format": "PNG", "compress_level": 6, "optimize": False}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{} on a light background",
    "{} on a plain background",
    "a simple drawing of {}",
    "a picture of {}",
    "an image showing {}",
)
_SPLIT_CODES = {"train": 0, "val": 1}
TWO_OBJECT_SHARE = 0.65
"""Chance that an image shows two shapes. Above one half because every question that needs colour bound to shape,
position or the whole set (colour and shape of one of two, left/right, two-object describe) is asked about them.
Against the earlier 0.5, an image stays the same unless its draw falls between the two cuts (then it gains a shape)."""
HELD_OUT_SHARE: dict[str, float] = {"train": 0.0, "val": 0.5}
"""Chance that a question of a split is worded from the held-out set: never in training."""
_IMAGE_NAME = re.compile(r"^\d{12}\.png$")


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape, inscribed in the circle of `radius` around (cx, cy); pixel coordinates."""

    color: str
    shape: str
    cx: int
    cy: int
    radius: int

    def vertices(self) -> list[tuple[int, int]]:
        """Polygon vertices (square, triangle) or the two corners of the ellipse box (circle)."""
        x, y, r = self.cx, self.cy, self.radius
        if self.shape == "circle":
            return [(x - r, y - r), (x + r, y + r)]
        if self.shape == "square":
            h = round(r / math.sqrt(2))
            return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
        dx, dy = round(r * math.sqrt(3) / 2), round(r / 2)
        return [(x, y - r), (x + dx, y + dy), (x - dx, y + dy)]

    def bbox(self) -> list[int]:
        """COCO-style [x, y, width, height] of the drawn pixels."""
        xs, ys = zip(*self.vertices(), strict=True)
        return [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1]

    def phrase(self) -> str:
        """'a red circle', 'an orange square'."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    """One question/answer pair with its machine-readable ground truth."""

    type: str
    """One of QUESTION_TYPES."""
    question: str
    answer: str
    expected: str
    """What a correct answer must say: a colour, a shape, a number word, yes / no, or the canonical caption."""
    phrasing: str = "seen"
    """Which of PHRASING_SETS the question's wording comes from."""


@dataclass(frozen=True)
class ShapeSample:
    """Everything generated for one image: layout, captions and conversations."""

    split: str
    index: int
    image_id: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]
    """Sorted left to right; captions name them in this order."""
    captions: tuple[str, ...]
    conversations: tuple[tuple[Question, ...], ...]

    @property
    def file_name(self) -> str:
        return file_name_for(self.image_id)


@dataclass(frozen=True)
class QuestionTruth:
    """Ground truth of one question: the human message is conversations[2 * turn] of conversation_id."""

    conversation_id: str
    turn: int
    type: str
    question: str
    answer: str
    expected: str
    phrasing: str = "seen"


@dataclass(frozen=True)
class ImageTruth:
    """Ground truth of one image, as stored in shapes_meta.json."""

    image_id: int
    file_name: str
    split: str
    objects: tuple[ShapeObject, ...]
    questions: tuple[QuestionTruth, ...]


@dataclass(frozen=True)
class ShapesSummary:
    """What `write_shapes_dataset` wrote."""

    out_dir: Path
    seed: int
    n_train: int
    n_val: int
    n_captions: int
    n_conversations: int
    n_questions: int
    images_written: int
    """PNG files created or changed (identical files are left alone)."""
    images_removed: int
    """Stale PNG or temporary files removed from a previous, larger run."""
    files: tuple[Path, ...]
    """The annotation files."""
    seconds: float


def image_id_for(split: str, index: int) -> int:
    """COCO image id of image `index` (0-based) of a split."""
    _check_split(split)
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def file_name_for(image_id: int) -> str:
    """COCO-style file name: 000000000042.png."""
    return f"{image_id:012d}.png"


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """The canonical caption: 'a red circle' / 'a red circle and a blue square'."""
    return " and ".join(o.phrase() for o in objects)


def sample_image(seed: int, split: str, index: int) -> ShapeSample:
    """Generate image `index` of `split`; deterministic in (seed, split, index) only."""
    _check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    background = tuple(int(v) for v in rng.integers(228, 256, size=3))
    objects = _place(rng, _sample_kinds(rng))
    language = np.random.default_rng([seed, _SPLIT_CODES[split], index, 1])  # wordings: the captions stay as before
    questions = questions_for(objects, language, HELD_OUT_SHARE[split])
    return ShapeSample(
        split=split,
        index=index,
        image_id=image_id_for(split, index),
        background=background,  # type: ignore[arg-type]
        objects=objects,
        captions=_captions(rng, objects),
        conversations=_group_questions(rng, questions),
    )


def _sample_kinds(rng: np.random.Generator) -> list[tuple[str, str]]:
    """One or two (colour, shape) pairs (two with chance TWO_OBJECT_SHARE); two shapes always have different
    colours."""
    colors = list(COLORS)
    first = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
    if rng.random() < 1 - TWO_OBJECT_SHARE:  # one shape below the draw's cut, as when the share was 0.5
        return [first]
    others = [c for c in colors if c != first[0]]
    return [first, (others[int(rng.integers(len(others)))], SHAPES[int(rng.integers(len(SHAPES)))])]


def _place(rng: np.random.Generator, kinds: list[tuple[str, str]]) -> tuple[ShapeObject, ...]:
    """Sizes and positions by rejection sampling until the bounding circles keep GAP px apart."""
    for _ in range(10_000):
        radii = [int(r) for r in rng.integers(MIN_RADIUS, MAX_RADIUS, size=len(kinds), endpoint=True)]
        low, high = (EDGE_MARGIN + r for r in radii), (IMAGE_SIZE - 1 - EDGE_MARGIN - r for r in radii)
        centers = [rng.integers(lo, hi, size=2, endpoint=True) for lo, hi in zip(low, high, strict=True)]
        objects = [ShapeObject(c, s, int(xy[0]), int(xy[1]), r)
                   for (c, s), xy, r in zip(kinds, centers, radii, strict=True)]
        if all(apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            return tuple(sorted(objects, key=lambda o: (o.cx, o.cy)))
    raise RuntimeError(f"could not place {len(kinds)} shapes without overlap")  # pragma: no cover


def apart(a: ShapeObject, b: ShapeObject, gap: int = GAP) -> bool:
    """True when the bounding circles of a and b are at least `gap` px apart."""
    return math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + gap


def _captions(rng: np.random.Generator, objects: tuple[ShapeObject, ...]) -> tuple[str, ...]:
    """The canonical caption first, then paraphrases (other wording, or the other object order)."""
    canonical = caption_for(objects)
    variants = [t.format(canonical) for t in CAPTION_TEMPLATES]
    if len(objects) > 1:
        variants.append(caption_for(objects[::-1]))
    picks = rng.choice(len(variants), size=CAPTIONS_PER_IMAGE - 1, replace=False)
    return (canonical, *(variants[int(i)] for i in picks))


def questions_for(objects: Sequence[ShapeObject], rng: np.random.Generator | None = None,
                  held_out: float = 0.0) -> list[Question]:
    """Every applicable question, each worded from the held-out set with chance `held_out` (else the seen set):
    colour of a shape only if that shape is unique in the image, shape of a colour only if that colour is unique,
    count, describe, one yes/no question (yes or no by a coin flip), and for two shapes clearly apart in x the
    colour of the left or the right one. `rng` (default: seed 0) picks wordings, answers and targets."""
    rng = np.random.default_rng(0) if rng is None else rng
    objects = list(objects)
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    out = [_color_question(rng, held_out, o, len(objects) == 1) for o in objects if shape_counts[o.shape] == 1]
    out += [_shape_question(rng, held_out, o, len(objects) == 1) for o in objects if color_counts[o.color] == 1]
    out.append(_count_question(rng, held_out, len(objects)))
    out.append(_describe_question(rng, held_out, objects))
    out.append(_exists_question(rng, held_out, objects))
    if len(objects) == 2 and abs(objects[0].cx - objects[1].cx) >= SIDE_MIN_DX:
        out.append(_side_question(rng, held_out, objects))
    return out


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _wording(rng: np.random.Generator, qtype: str, held_out: float, single: bool = True) -> tuple[str, str]:
    """(phrasing set, question template); colour/shape templates without {thing} only when `single`."""
    which = "held_out" if rng.random() < held_out else "seen"
    templates = [t for t in PHRASINGS[qtype][which] if single or qtype not in ("color", "shape") or "{thing}" in t]
    return which, _pick(rng, templates)


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _color_question(rng: np.random.Generator, held_out: float, obj: ShapeObject, single: bool) -> Question:
    which, template = _wording(rng, "color", held_out, single)
    thing = _pick(rng, [f"the {obj.shape}"] + (["the shape", "the object"] if single else []))
    named = thing if "{thing}" in template else f"the {obj.shape}"  # "What color is it?" -> "The circle is red."
    answer = _pick(rng, ANSWERS["color"]).format(Thing=_capital(named), color=obj.color, Color=_capital(obj.color))
    return Question("color", template.format(thing=thing), answer, obj.color, which)


def _shape_question(rng: np.random.Generator, held_out: float, obj: ShapeObject, single: bool) -> Question:
    which, template = _wording(rng, "shape", held_out, single)
    thing = _pick(rng, [f"the {obj.color} {noun}" for noun in ("object", "shape", "one")])
    named = thing if "{thing}" in template else f"the {obj.color} object"
    answer = _pick(rng, ANSWERS["shape"]).format(Thing=_capital(named), shape=obj.shape)
    return Question("shape", template.format(thing=thing), answer, obj.shape, which)


def _count_question(rng: np.random.Generator, held_out: float, n: int) -> Question:
    which, template = _wording(rng, "count", held_out)
    words = {"is": "is" if n == 1 else "are", "n": NUMBER_WORDS[n], "N": _capital(NUMBER_WORDS[n]),
             "shapes": "shape" if n == 1 else "shapes", "objects": "object" if n == 1 else "objects"}
    return Question("count", template, _pick(rng, ANSWERS["count"]).format(**words), NUMBER_WORDS[n], which)


def _describe_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    which, template = _wording(rng, "describe", held_out)
    caption = caption_for(objects)
    answer = _pick(rng, ANSWERS["describe"]).format(caption=caption, Caption=_capital(caption))
    return Question("describe", template, answer, caption, which)


def _exists_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    """'Is there a red circle?': yes about a drawn object, or no about a plausible other one (a drawn colour with
    another shape, or a drawn shape with another colour)."""
    which, template = _wording(rng, "exists", held_out)
    present = {(o.color, o.shape) for o in objects}
    base = objects[int(rng.integers(len(objects)))]
    color, shape = base.color, base.shape
    yes = bool(rng.random() < 0.5)
    if not yes:
        if rng.random() < 0.5:
            options = [(color, s) for s in SHAPES if (color, s) not in present]
        else:
            options = [(c, shape) for c in COLORS if (c, shape) not in present]
        color, shape = options[int(rng.integers(len(options)))]
    item = ShapeObject(color, shape, 0, 0, 0).phrase()
    answer = _pick(rng, ANSWERS["yes" if yes else "no"]).format(item=item, color=color, shape=shape)
    return Question("exists", template.format(item=item), answer, "yes" if yes else "no", which)


def _side_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    """The colour of the left or the right shape (by centre x) of a two-shape image."""
    which, template = _wording(rng, "side", held_out)
    side = _pick(rng, ("left", "right"))
    obj = min(objects, key=lambda o: o.cx) if side == "left" else max(objects, key=lambda o: o.cx)
    words = {"side": side, "color": obj.color, "Color": _capital(obj.color), "shape": obj.shape}
    return Question("side", template.format(side=side), _pick(rng, ANSWERS["side"]).format(**words), obj.color, which)


@lru_cache(maxsize=1)
def _phrasing_patterns() -> tuple[tuple[str, str, re.Pattern], ...]:
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    slots = {
        "color": {"thing": rf"the (?:{shapes}|shape|object)"},
        "shape": {"thing": rf"the (?:{colors}) (?:object|shape|one)"},
        "exists": {"item": rf"an? (?:{colors}) (?:{shapes})"},
        "side": {"side": r"(?:left|right)"},
    }
    out = []
    for qtype, sets in PHRASINGS.items():
        for which, templates in sets.items():
            for template in templates:
                regex = "".join(re.escape(_spelling(literal)) + (slots[qtype][field] if field else "")
                                for literal, field, _, _ in string.Formatter().parse(template))
                out.append((qtype, which, re.compile(regex, re.IGNORECASE)))
    return tuple(out)


def _spelling(text: str) -> str:
    """One spelling of colour: a transcript (Whisper writes 'color') still matches a 'colour' wording."""
    return re.sub(r"colour", "color", text, flags=re.IGNORECASE)


def phrasing_of(question: str) -> tuple[str, str] | None:
    """(question type, phrasing set) of a question worded from PHRASINGS (case, runs of white space and colour /
    color ignored); None for any other question."""
    text = _spelling(" ".join(question.split()))
    for qtype, which, pattern in _phrasing_patterns():
        if pattern.fullmatch(text):
            return qtype, which
    return None


def _group_questions(rng: np.random.Generator, questions: list[Question]) -> tuple[tuple[Question, ...], ...]:
    """Shuffle the questions into one or two conversations of 2-4 turns, covering every question once."""
    n = len(questions)
    options = [[n]] if 2 <= n <= 4 else []
    options += [[a, n - a] for a in range(2, 5) if 2 <= n - a <= 4]
    if not options:  # pragma: no cover - at most 6 questions exist for two shapes
        raise RuntimeError(f"cannot group {n} questions into conversations of 2-4 turns")
    sizes = options[int(rng.integers(len(options)))]
    order = [questions[int(i)] for i in rng.permutation(n)]
    starts = np.cumsum([0, *sizes])
    return tuple(tuple(order[s:e]) for s, e in zip(starts[:-1], starts[1:], strict=True))


def render(sample: ShapeSample) -> Image.Image:
    """Draw the image (no antialiasing)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), sample.background)
    draw = ImageDraw.Draw(image)
    for obj in sample.objects:
        if obj.shape == "circle":
            draw.ellipse(obj.vertices(), fill=COLORS[obj.color])
        else:
            draw.polygon(obj.vertices(), fill=COLORS[obj.color])
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fixed save parameters and no metadata, so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, **PNG_PARAMS)
    return buffer.getvalue()


def parse_answer(question_type: str, text: str) -> str | None:
    """The ground-truth keyword a free-form answer states (its first colour, shape, number word, yes or no), or,
    for `describe`, the answer normalised like a canonical caption; None when the answer names none."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    lowered = text.lower().strip()
    if question_type == "describe":
        return lowered.rstrip(". ") or None
    if question_type == "count":
        digits = {str(k): v for k, v in NUMBER_WORDS.items()}
        vocab = {**digits, **{v: v for v in NUMBER_WORDS.values()}}
    elif question_type == "exists":
        vocab = {"yes": "yes", "no": "no"}
    else:
        words = COLORS if question_type in ("color", "side") else SHAPES
        vocab = {**{w: w for w in words}, **{w + "s": w for w in words}}
    for token in re.findall(r"[a-z0-9]+", lowered):
        if token in vocab:
            return vocab[token]
    return None


def conversation_id(image_id: int, k: int) -> str:
    """LLaVA-style id of the k-th conversation about an image: '000000000042_0'."""
    return f"{image_id:012d}_{k}"


def llava_records(samples: Iterable[ShapeSample]) -> list[dict[str, Any]]:
    """Conversations in the LLaVA-Instruct-150K JSON format; `<image>\\n` opens the first human turn."""
    records = []
    for s in samples:
        for k, questions in enumerate(s.conversations):
            turns: list[dict[str, str]] = []
            for t, q in enumerate(questions):
                prompt = f"<image>\n{q.question}" if t == 0 else q.question
                turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": q.answer}]
            records.append({"id": conversation_id(s.image_id, k), "image": s.file_name, "conversations": turns})
    return records


def coco_captions(samples: Sequence[ShapeSample], split: str) -> dict[str, Any]:
    """The COCO captions file of one split; annotation ids are image_id * 10 + k."""
    return {
        "info": {
            "description": f"trimodal synthetic shapes ({split})",
            "version": "1.0",
            "contributor": "trimodal",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": [
            {"license": 1, "id": s.image_id, "file_name": s.file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
            for s in samples
        ],
        "annotations": [
            {"id": s.image_id * 10 + k, "image_id": s.image_id, "caption": c}
            for s in samples
            for k, c in enumerate(s.captions)
        ],
    }


def meta_record(seed: int, samples: Iterable[ShapeSample]) -> dict[str, Any]:
    """The ground-truth file: per image its objects, per question its type, expected answer and phrasing set."""
    images = []
    for s in samples:
        objects = [
            {"color": o.color, "shape": o.shape, "bbox": o.bbox(), "center": [o.cx, o.cy], "radius": o.radius}
            for o in s.objects
        ]
        questions = [
            {"conversation_id": conversation_id(s.image_id, k), "turn": t, "type": q.type,
             "question": q.question, "answer": q.answer, "expected": q.expected, "phrasing": q.phrasing}
            for k, conv in enumerate(s.conversations)
            for t, q in enumerate(conv)
        ]
        images.append({"image_id": s.image_id, "file_name": s.file_name, "split": s.split,
                       "width": IMAGE_SIZE, "height": IMAGE_SIZE, "background": list(s.background),
                       "objects": objects, "questions": questions})
    return {"version": 2, "seed": seed, "bbox_format": "xywh", "colors": {k: list(v) for k, v in COLORS.items()},
            "shapes": list(SHAPES), "question_types": list(QUESTION_TYPES),
            "phrasings": {t: {k: list(v) for k, v in sets.items()} for t, sets in PHRASINGS.items()},
            "images": images}


def read_shapes_meta(path: str | Path) -> list[ImageTruth]:
    """Load shapes_meta.json back into typed records."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for img in data["images"]:
        objects = tuple(
            ShapeObject(o["color"], o["shape"], o["center"][0], o["center"][1], o["radius"]) for o in img["objects"]
        )
        questions = tuple(
            QuestionTruth(q["conversation_id"], q["turn"], q["type"], q["question"], q["answer"], q["expected"],
                          q.get("phrasing", "seen"))  # version 1 files asked the four original (seen) wordings only
            for q in img["questions"]
        )
        out.append(ImageTruth(img["image_id"], img["file_name"], img["split"], objects, questions))
    return out


def write_shapes_dataset(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0) -> ShapesSummary:
    """Generate the set into `out_dir` (layout in the module docstring); returns what was written."""
    start = time.perf_counter()
    _check_sizes(n_train, n_val, seed)
    out = Path(out_dir)
    samples = {split: [sample_image(seed, split, i) for i in range(n)]
               for split, n in (("train", n_train), ("val", n_val))}
    written = removed = 0
    for split, items in samples.items():
        w, r = _write_images(out / SPLIT_DIRS[split], items)
        written, removed = written + w, removed + r
    documents: dict[Path, Any] = {out / META_FILE: meta_record(seed, samples["train"] + samples["val"])}
    for split, items in samples.items():
        documents[out / "annotations" / CAPTION_FILES[split]] = coco_captions(items, split)
        documents[out / LLAVA_FILES[split]] = llava_records(items)
    for path, document in documents.items():
        write_bytes_atomic(path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    everything = samples["train"] + samples["val"]
    return ShapesSummary(
        out_dir=out, seed=seed, n_train=n_train, n_val=n_val,
        n_captions=sum(len(s.captions) for s in everything),
        n_conversations=sum(len(s.conversations) for s in everything),
        n_questions=sum(len(c) for s in everything for c in s.conversations),
        images_written=written, images_removed=removed,
        files=tuple(documents), seconds=time.perf_counter() - start,
    )


def _write_images(directory: Path, samples: list[ShapeSample]) -> tuple[int, int]:
    """Write the PNGs of one split; remove stale ones from an earlier run. Returns (written, removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = sum(write_bytes_atomic(directory / s.file_name, encode_png(render(s))) for s in samples)
    keep = {s.file_name for s in samples}
    removed = 0
    for path in directory.iterdir():
        stale = _IMAGE_NAME.match(path.name) and path.name not in keep
        if (stale or is_scratch(path)) and path.is_file():
            path.unlink()
            removed += 1
    return written, removed


def _check_split(split: str) -> None:
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_DIRS)}")


def _check_sizes(n_train: int, n_val: int, seed: int) -> None:
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if n_train >= VAL_ID_OFFSET:
        raise ValueError(f"n_train must be < {VAL_ID_OFFSET} so train and val image ids stay apart")
