"""Question typing and answer scoring for conversations about held-out images.

Questions of the shapes set are typed by their wording (`question_type`): every wording of the set's PHRASINGS
(`phrasing_of`, which also tells its phrasing set), else a few open patterns ("What colour is ...", "How many ...",
"Is there ..."); other questions are typed `other` and are not scored. An answer is scored strictly
(`answer_correct`): it counts only when it names exactly what the reference answer names, and nothing else of the
same kind.

- colour / shape: the set of colour (shape) words of the answer equals that of the reference. "It is red." is
  right for "The circle is red."; "red and blue" and "The circle is green." are wrong. `side` ("What color is the
  shape on the left?") is scored as colour.
- exists ("Is there a red circle?"): the set of yes / no words of the answer equals the reference's, so "Yes." is
  right for "Yes, there is a red circle." and "Yes and no." is wrong.
- count: the set of numbers the answer states equals the reference's; number words and digits are the same
  number ("2" == "two"), so "There are two shapes." is wrong for "There is one shape.".
- describe: the objects the answer names, each a (colour, shape) pair, equal the reference's, as a multiset in any
  order. A colour names the next shape word ("a red circle"); a shape without a colour before it, or a colour
  without a shape after it, is an object that matches nothing. A plural ("two red circles") names that many.

Words are whole tokens (runs of letters or digits): "reddish" is not a colour and "squared" not a shape; the
plural of a shape ("squares") is that shape.

`lenient_answer_correct` is the looser rule (an answer counts when it contains the expected word, `parse_answer`),
kept so that runs can be scored both ways and compared (`rescore_predictions`, `scripts/rescore.py`).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from trimodal.data.shapes.vocabulary import COLORS, NUMBER_WORDS, PHRASINGS, QUESTION_TYPES, SHAPES

QUESTION_PATTERNS: tuple[tuple[str, str], ...] = (
    ("side", r"^\s*(what|which) colou?r\b.*\b(left|right)(most)?\b"),
    ("color", r"^\s*(what|which) colou?r (is|does)\b"),
    ("shape", r"^\s*(what|which) (kind of )?shape (is|does)\b"),
    ("count", r"^\s*how many\b"),
    ("describe", r"^\s*describe\b"),
    ("exists", r"^\s*(is there|are there|do you see|can you see)\b"),
)
"""Open patterns, tried in order, for questions that are none of the shapes set's own wordings."""
NUMBERS: dict[str, int] = {word: n for n, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"))}
"""Number words an answer may state a count with; any run of digits is a number too."""
SHAPE_WORDS: dict[str, str] = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
"""Shape tokens (singular and plural) -> the shape."""
RULES: tuple[str, ...] = ("lenient", "strict")
"""The two scorers `rescore_predictions` compares."""


@lru_cache(maxsize=1)
def _phrasing_patterns() -> tuple[tuple[str, str, re.Pattern], ...]:
    """(type, phrasing set, pattern) of every wording of PHRASINGS, its slots filled by what the set asks about."""
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    slots = {
        "color": {"thing": rf"the (?:{shapes}|shape|object)"},
        "shape": {"thing": rf"the (?:{colors}) (?:object|shape|one)"},
        "exists": {"item": rf"an? (?:{colors}) (?:{shapes})"},
        "side": {"side": r"(?:left|right)"},
    }
    out = []
    for qtype, sets in PHRASINGS.items():
        for phrasing_set, templates in sets.items():
            for template in templates:
                regex = "".join(re.escape(_spelling(literal)) + (slots[qtype][field] if field else "")
                                for literal, field, _, _ in string.Formatter().parse(template))
                out.append((qtype, phrasing_set, re.compile(regex, re.IGNORECASE)))
    return tuple(out)


def _spelling(text: str) -> str:
    """One spelling of colour: a transcript (Whisper writes 'color') still matches a 'colour' wording."""
    return re.sub(r"colour", "color", text, flags=re.IGNORECASE)


def phrasing_of(question: str) -> tuple[str, str] | None:
    """(question type, phrasing set) of a question worded from PHRASINGS (case, runs of white space and colour /
    color ignored); None for any other question."""
    text = _spelling(" ".join(question.split()))
    for qtype, phrasing_set, pattern in _phrasing_patterns():
        if pattern.fullmatch(text):
            return qtype, phrasing_set
    return None


def question_type(question: str) -> str:
    """One of the shapes set's QUESTION_TYPES (color, shape, count, describe, exists, side), or other."""
    known = phrasing_of(question)
    if known is not None:
        return known[0]
    lowered = question.lower()
    for name, pattern in QUESTION_PATTERNS:
        if re.search(pattern, lowered):
            return name
    return "other"


def question_phrasing(question: str) -> str | None:
    """seen or held_out: the phrasing set of one of the shapes set's own wordings; None for any other question."""
    known = phrasing_of(question)
    return known[1] if known else None


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens: maximal runs of letters or digits ("It's 2 red-ish" -> it, s, 2, red, ish)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _number(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return NUMBERS.get(token)


def named(qtype: str, text: str) -> set:
    """What `text` names of a question type's kind: colours (color, side), shapes (plurals folded), numbers (as
    ints) or yes / no (exists)."""
    if qtype in ("color", "side"):
        return {t for t in tokens(text) if t in COLORS}
    if qtype == "exists":
        return {t for t in tokens(text) if t in ("yes", "no")}
    if qtype == "shape":
        return {SHAPE_WORDS[t] for t in tokens(text) if t in SHAPE_WORDS}
    if qtype == "count":
        return {n for n in map(_number, tokens(text)) if n is not None}
    raise ValueError(f"no single-kind words for question type {qtype!r}")


def described_objects(text: str) -> Counter:
    """The (colour, shape) objects a description names, with multiplicity; None marks a missing half.

    "a red circle and a blue square" -> {(red, circle): 1, (blue, square): 1}; "two red circles" ->
    {(red, circle): 2}; "a circle" -> {(None, circle): 1}; "a red and blue square" -> {(red, None): 1,
    (blue, square): 1}.
    """
    objects: Counter = Counter()
    colour, count = None, None
    for token in tokens(text):
        if token in COLORS:
            if colour is not None:
                objects[colour, None] += 1
            colour = token
        elif token in SHAPE_WORDS:
            plural = token != SHAPE_WORDS[token]
            objects[colour, SHAPE_WORDS[token]] += (count or 2) if plural else 1
            colour, count = None, None
        elif _number(token) is not None and colour is None:
            count = _number(token)
    if colour is not None:
        objects[colour, None] += 1
    return objects


def answer_correct(qtype: str, predicted: str, reference: str) -> bool | None:
    """Whether `predicted` names exactly what `reference` names (module docstring); None when there is nothing to
    score: an `other` question, or a reference that names nothing of its type's kind."""
    if qtype == "other":
        return None
    if qtype == "describe":
        expected = described_objects(reference)
        return None if not expected else described_objects(predicted) == expected
    expected = named(qtype, reference)
    return None if not expected else named(qtype, predicted) == expected


def parse_answer(question_type: str, text: str) -> str | None:
    """The ground-truth keyword a free-form answer states (its first colour, shape, number word, yes or no), or,
    for `describe`, the answer normalised like a canonical caption; None when the answer names none."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    if question_type == "describe":
        return text.lower().strip().rstrip(". ") or None
    if question_type == "count":
        vocab = {**{str(k): v for k, v in NUMBER_WORDS.items()}, **{v: v for v in NUMBER_WORDS.values()}}
    elif question_type == "exists":
        vocab = {"yes": "yes", "no": "no"}
    else:
        words = COLORS if question_type in ("color", "side") else SHAPES
        vocab = {**{w: w for w in words}, **{w + "s": w for w in words}}
    return next((vocab[token] for token in tokens(text) if token in vocab), None)


def lenient_answer_correct(qtype: str, predicted: str, reference: str) -> bool | None:
    """The looser rule, kept to score runs both ways: `predicted` counts when it contains the expected word of
    `reference` (so an answer listing every colour counts); for `describe`, when it contains every colour and
    shape word of the reference."""
    if qtype == "other":
        return None
    if qtype == "describe":
        needed = set(tokens(reference)) & (set(COLORS) | set(SHAPES))
        return bool(needed) and needed <= set(tokens(predicted.replace("squares", "square")))
    expected = parse_answer(qtype, reference)
    if expected is None:
        return None
    return parse_answer(qtype, predicted) == expected or expected in tokens(predicted)


def rescore_rows(rows: list[dict]) -> dict:
    """Score evaluation rows with both rules: {type: {"all" | "first_turn": {rule: [correct, total]}}}.

    Only rows of kind "question" count; the type is the row's own (else typed from its question), and a row a rule
    cannot score (None) is left out of that rule's total.
    """
    scorers = {"lenient": lenient_answer_correct, "strict": answer_correct}
    table: dict = defaultdict(lambda: {"all": {r: [0, 0] for r in RULES}, "first_turn": {r: [0, 0] for r in RULES}})
    for row in rows:
        if row.get("kind") != "question":
            continue
        qtype = row.get("type") or question_type(row["question"])
        for rule, scorer in scorers.items():
            ok = scorer(qtype, row["predicted"], row["reference"])
            if ok is None:
                continue
            for turns in ("all", "first_turn") if row.get("first_turn") else ("all",):
                table[qtype][turns][rule][0] += int(ok)
                table[qtype][turns][rule][1] += 1
    return {qtype: table[qtype] for qtype in sorted(table)}


def rescore_predictions(path: str | Path) -> dict:
    """Re-score a run's `predictions.jsonl` (rows of evaluation/run_eval.py) with the lenient and the strict rule;
    the result of `rescore_rows`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return rescore_rows([json.loads(line) for line in lines if line.strip()])


def format_rescore(table: dict) -> str:
    """A text table of `rescore_rows`'s result: per type and turns, accuracy and correct/total of both rules."""
    out = [f"{'type':<10}{'turns':<12}{'lenient':>19}{'strict':>19}"]
    for qtype, by_turns in table.items():
        for turns, by_rule in by_turns.items():
            cells = ""
            for correct, total in (by_rule[r] for r in RULES):
                shown = f"{correct / total:.3f}" if total else "-"
                cells += f"{shown:>9}{f'{correct}/{total}':>10}"
            out.append(f"{qtype:<10}{turns:<12}{cells}")
    return "\n".join(out)
