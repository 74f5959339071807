"""What is said about an image: its captions, and its question/answer pairs grouped into conversations. Every answer
names exactly the expected colour, shape, number or objects, whatever its wording."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trimodal.data.shapes.drawing import ShapeObject
from trimodal.data.shapes.vocabulary import ANSWERS, CAPTION_TEMPLATES, COLORS, NUMBER_WORDS, PHRASINGS, SHAPES

CAPTIONS_PER_IMAGE = 3
SIDE_MIN_DX = 40
"""Left/right questions are asked only when the two centres' x differ by at least this many px."""
EXISTS_SPARE_DRAW = 4
"""A yes/no question draws one integer below this from the wording stream and uses none of it: the shapes set's
questions drawn after it (left/right), and so its held-out questions, are the ones that every earlier set had."""


@dataclass(frozen=True)
class Question:
    """One question/answer pair with its machine-readable ground truth."""

    type: str
    """One of QUESTION_TYPES."""
    question: str
    """The question's text."""
    answer: str
    """The reference answer's text."""
    expected: str
    """What a correct answer must say: a colour, a shape, a number word, yes / no, or the canonical caption."""
    phrasing: str = "seen"
    """Which of PHRASING_SETS the question's wording comes from."""


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """The canonical caption: 'a red circle' / 'a red circle and a blue square'."""
    return " and ".join(o.phrase() for o in objects)


def captions_for(rng: np.random.Generator, objects: tuple[ShapeObject, ...]) -> tuple[str, ...]:
    """The canonical caption first, then paraphrases (other wording, or the other object order).

    No caption says where a shape is: stage 0 grounded such phrases ("a red circle on the left") without its
    patch features learning position (docs/training.md, "Position"); the projector's position embeddings carry it."""
    canonical = caption_for(objects)
    variants = [t.format(canonical) for t in CAPTION_TEMPLATES]
    if len(objects) > 1:
        variants.append(caption_for(objects[::-1]))
    picks = rng.choice(len(variants), size=CAPTIONS_PER_IMAGE - 1, replace=False)
    return (canonical, *(variants[int(i)] for i in picks))


def side_by_side(objects: Sequence[ShapeObject]) -> bool:
    """Two shapes whose centres are far enough apart in x to call one left and the other right."""
    return len(objects) == 2 and abs(objects[0].cx - objects[1].cx) >= SIDE_MIN_DX


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
    if side_by_side(objects):
        out.append(_side_question(rng, held_out, objects))
    return out


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _wording(rng: np.random.Generator, qtype: str, held_out: float, single: bool = True) -> tuple[str, str]:
    """(phrasing set, question template); colour/shape templates without {thing} only when `single`."""
    phrasing_set = "held_out" if rng.random() < held_out else "seen"
    templates = [t for t in PHRASINGS[qtype][phrasing_set]
                 if single or qtype not in ("color", "shape") or "{thing}" in t]
    return phrasing_set, _pick(rng, templates)


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _color_question(rng: np.random.Generator, held_out: float, obj: ShapeObject, single: bool) -> Question:
    phrasing_set, template = _wording(rng, "color", held_out, single)
    thing = _pick(rng, [f"the {obj.shape}"] + (["the shape", "the object"] if single else []))
    named = thing if "{thing}" in template else f"the {obj.shape}"  # "What color is it?" -> "The circle is red."
    answer = _pick(rng, ANSWERS["color"]).format(Thing=_capital(named), color=obj.color, Color=_capital(obj.color))
    return Question("color", template.format(thing=thing), answer, obj.color, phrasing_set)


def _shape_question(rng: np.random.Generator, held_out: float, obj: ShapeObject, single: bool) -> Question:
    phrasing_set, template = _wording(rng, "shape", held_out, single)
    thing = _pick(rng, [f"the {obj.color} {noun}" for noun in ("object", "shape", "one")])
    named = thing if "{thing}" in template else f"the {obj.color} object"
    answer = _pick(rng, ANSWERS["shape"]).format(Thing=_capital(named), shape=obj.shape)
    return Question("shape", template.format(thing=thing), answer, obj.shape, phrasing_set)


def _count_question(rng: np.random.Generator, held_out: float, n: int) -> Question:
    phrasing_set, template = _wording(rng, "count", held_out)
    words = {"is": "is" if n == 1 else "are", "n": NUMBER_WORDS[n], "N": _capital(NUMBER_WORDS[n]),
             "shapes": "shape" if n == 1 else "shapes", "objects": "object" if n == 1 else "objects"}
    return Question("count", template, _pick(rng, ANSWERS["count"]).format(**words), NUMBER_WORDS[n], phrasing_set)


def _describe_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    phrasing_set, template = _wording(rng, "describe", held_out)
    caption = caption_for(objects)
    answer = _pick(rng, ANSWERS["describe"]).format(caption=caption, Caption=_capital(caption))
    return Question("describe", template, answer, caption, phrasing_set)


def _exists_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    """'Is there a red circle?': yes about a drawn object, or no about a plausible other one (a drawn colour with
    another shape, or a drawn shape with another colour)."""
    phrasing_set, template = _wording(rng, "exists", held_out)
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
    rng.integers(EXISTS_SPARE_DRAW)
    answer = exists_answer(objects, shape, yes)
    return Question("exists", template.format(item=item), answer, "yes" if yes else "no", phrasing_set)


def exists_answer(objects: Sequence[ShapeObject], shape: str, yes: bool) -> str:
    """'I see a circle and a triangle. The triangle is blue, so no.': the drawn shapes by name, left to right, then
    the asked shape's colours (or that none is drawn), then the verdict.

    Each step compares one word with text the answer has already said, a check stage 2 does learn; a verdict first
    must decide presence and binding in its first token, and a lookup first ("The triangle is ...") copies the
    question's colour when the asked shape is not drawn (docs/training.md, "Binding")."""
    named = " and ".join(f"a {o.shape}" for o in objects)  # "a circle and a circle": named one by one, as drawn
    colors = [o.color for o in objects if o.shape == shape]
    if not colors:
        lookup = f"There is no {shape}"
    elif len(colors) == 1:
        lookup = f"The {shape} is {colors[0]}"
    else:
        lookup = f"The {shape}s are {' and '.join(colors)}"
    return f"I see {named}. {lookup}, so {'yes' if yes else 'no'}."


def _side_question(rng: np.random.Generator, held_out: float, objects: Sequence[ShapeObject]) -> Question:
    """The colour of the left or the right shape (by centre x) of a two-shape image."""
    phrasing_set, template = _wording(rng, "side", held_out)
    side = _pick(rng, ("left", "right"))
    obj = min(objects, key=lambda o: o.cx) if side == "left" else max(objects, key=lambda o: o.cx)
    words = {"side": side, "color": obj.color, "Color": _capital(obj.color), "shape": obj.shape}
    answer = _pick(rng, ANSWERS["side"]).format(**words)
    return Question("side", template.format(side=side), answer, obj.color, phrasing_set)


def group_questions(rng: np.random.Generator, questions: list[Question]) -> tuple[tuple[Question, ...], ...]:
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
