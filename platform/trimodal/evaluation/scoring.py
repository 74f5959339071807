"""Question typing and answer scoring for conversations about held-out images.

An answer counts when it contains the expected word (the colour, shape or number that the reference answer
states). Questions of the shapes set are typed by their wording; other questions are typed `other` and are
not scored by keyword.
"""

from __future__ import annotations

import re

from trimodal.data.shapes import COLORS, SHAPES, parse_answer

QUESTION_PATTERNS: tuple[tuple[str, str], ...] = (
    ("color", r"^\s*what colou?r is\b"),
    ("shape", r"^\s*what shape is\b"),
    ("count", r"^\s*how many\b"),
    ("describe", r"^\s*describe\b"),
)


def question_type(question: str) -> str:
    """color, shape, count, describe or other."""
    lowered = question.lower()
    for name, pattern in QUESTION_PATTERNS:
        if re.search(pattern, lowered):
            return name
    return "other"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def answer_correct(qtype: str, predicted: str, reference: str) -> bool | None:
    """Whether `predicted` contains the expected word of `reference`; None when there is nothing to score.

    For `describe`, every colour and shape word of the reference must appear in the prediction.
    """
    if qtype == "other":
        return None
    if qtype == "describe":
        needed = _words(reference) & (set(COLORS) | set(SHAPES))
        return bool(needed) and needed <= _words(predicted.replace("squares", "square"))
    expected = parse_answer(qtype, reference)
    if expected is None:
        return None
    return parse_answer(qtype, predicted) == expected or expected in _words(predicted)
