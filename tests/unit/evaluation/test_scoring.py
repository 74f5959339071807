"""The strict answer scorer, the shapes set's question typing and phrasing sets, answer parsing, and the
lenient-vs-strict re-scoring.

Every "wrong" case below is one the lenient rule (`lenient_answer_correct`) counts as right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trimodal.data.shapes.drawing import ShapeObject
from trimodal.data.shapes.questions import questions_for
from trimodal.data.shapes.vocabulary import ANSWERS, COLORS, PHRASINGS, SHAPES
from trimodal.evaluation.scoring import (
    answer_correct,
    described_objects,
    format_rescore,
    lenient_answer_correct,
    parse_answer,
    phrasing_of,
    question_type,
    rescore_predictions,
    rescore_rows,
)

ROOT = Path(__file__).resolve().parents[3]

RIGHT = [
    ("color", "It is red.", "The circle is red."),
    ("color", "red", "The circle is red."),
    ("color", "The circle is RED!", "The circle is red."),
    ("color", "The red circle is red.", "The circle is red."),
    ("color", "The square is reddish... no, orange.", "The square is orange."),  # "reddish" is no colour
    ("shape", "It is a circle.", "It is a circle."),
    ("shape", "circles", "It is a circle."),
    ("shape", "A squared-off square.", "It is a square."),  # "squared" is no shape
    ("count", "There are two shapes.", "There are two shapes."),
    ("count", "2", "There are two shapes."),
    ("count", "There are 2 shapes.", "There are two shapes."),
    ("count", "one", "There is one shape."),
    ("describe", "A red circle and a blue square.", "A red circle and a blue square."),
    ("describe", "a blue square and a red circle", "A red circle and a blue square."),
    ("describe", "An image showing a red circle and a blue square on a light background.",
     "A red circle and a blue square."),
    ("describe", "A green square.", "A green square."),
    ("side", "It is purple.", "The shape on the left is purple."),
    ("side", "The red one.", "Red."),
    ("exists", "Yes.", "Yes, there is a red circle."),
    ("exists", "No, there is no blue square.", "No."),
    ("exists", "no", "No, I cannot see a blue square."),
    ("exists", "I see a circle. There is no square, so no.", "I see a square. The square is green, so no."),
    ("exists", "I see a circle and a square. The square is red, so yes.", "Yes."),
]

WRONG_BUT_LENIENTLY_RIGHT = [  # right for the lenient scorer, wrong for the strict one
    ("color", "red and blue", "The circle is red."),
    ("color", "It is red, blue, green, yellow, purple or orange.", "The circle is red."),
    ("color", "The red circle is blue.", "The circle is red."),
    ("shape", "It is a circle or a square.", "It is a circle."),
    ("shape", "circles and triangles", "It is a circle."),
    ("count", "There are two shapes, not one.", "There is one shape."),
    ("count", "one or two", "There are two shapes."),
    ("count", "2 or 3", "There are two shapes."),
    ("describe", "A red square and a blue circle.", "A red circle and a blue square."),
    ("describe", "A red circle, a blue square and a green triangle.", "A red circle and a blue square."),
    ("describe", "A red and blue circle and square.", "A red circle and a blue square."),
    ("describe", "A red circle and a red circle.", "A red circle."),
    ("describe", "A circle that is red.", "A red circle."),
    ("side", "red or blue", "The left shape is red."),
    ("side", "The left shape is blue, the right one is red.", "The left shape is red."),
    ("exists", "Yes, or no.", "Yes, there is a red circle."),
    ("exists", "I see a circle. There is no square, so yes.", "I see a square. The square is red, so yes."),
]

WRONG_BOTH = [
    ("color", "The circle is green.", "The circle is red."),
    ("color", "It is reddish.", "The circle is red."),
    ("color", "", "The circle is red."),
    ("shape", "It is squared.", "It is a square."),
    ("count", "There are two shapes.", "There is one shape."),
    ("count", "There are 3 shapes.", "There are two shapes."),
    ("count", "There is someone.", "There is one shape."),  # "one" only as a whole word
    ("describe", "An orange triangle.", "A yellow circle and an orange triangle."),
    ("describe", "A blue circle.", "A red circle."),
    ("describe", "Two red circles.", "A red circle."),
    ("side", "It is green.", "The shape on the right is red."),
    ("exists", "Yes, there is a red circle.", "No, there is no red circle."),
    ("exists", "There is a red circle.", "Yes, there is a red circle."),  # no yes or no: not an answer
    ("exists", "I see a circle. The circle is red, so yes.", "I see a circle. There is no square, so no."),
]


@pytest.mark.parametrize("qtype,predicted,reference", RIGHT)
def test_answers_naming_exactly_the_expected_thing_are_right(qtype, predicted, reference):
    assert answer_correct(qtype, predicted, reference) is True


@pytest.mark.parametrize("qtype,predicted,reference", WRONG_BUT_LENIENTLY_RIGHT)
def test_answers_naming_more_or_other_things_are_wrong_though_the_lenient_rule_took_them(qtype, predicted,
                                                                                           reference):
    assert lenient_answer_correct(qtype, predicted, reference) is True
    assert answer_correct(qtype, predicted, reference) is False


@pytest.mark.parametrize("qtype,predicted,reference", WRONG_BOTH)
def test_wrong_answers_are_wrong_under_both_rules(qtype, predicted, reference):
    assert answer_correct(qtype, predicted, reference) is False
    assert lenient_answer_correct(qtype, predicted, reference) is False


def test_nothing_to_score_is_none():
    assert answer_correct("other", "Paris", "Paris.") is None
    assert answer_correct("color", "red", "I cannot tell.") is None  # the reference names no colour
    assert answer_correct("count", "two", "Several.") is None
    assert answer_correct("describe", "a red circle", "An empty picture.") is None


def test_described_objects_pair_each_colour_with_the_next_shape():
    assert described_objects("a red circle and a blue square") == {("red", "circle"): 1, ("blue", "square"): 1}
    assert described_objects("two red circles") == {("red", "circle"): 2}
    assert described_objects("red squares") == {("red", "square"): 2}
    assert described_objects("a circle") == {(None, "circle"): 1}
    assert described_objects("a red and blue square") == {("red", None): 1, ("blue", "square"): 1}
    assert described_objects("a reddish squared thing") == {}


def _objects(*kinds: tuple[str, str]) -> list[ShapeObject]:
    return [ShapeObject(color, shape, 40 + 80 * i, 100, 30) for i, (color, shape) in enumerate(kinds)]


@pytest.mark.parametrize("kinds", [[("red", "circle")], [("yellow", "circle"), ("orange", "triangle")],
                                   [("blue", "triangle"), ("green", "triangle")]])
def test_the_shapes_set_questions_are_typed_and_their_own_answers_score_right(kinds):
    questions = questions_for(_objects(*kinds))
    assert {q.type for q in questions} >= {"count", "describe"}
    for q in questions:
        assert question_type(q.question) == q.type
        assert answer_correct(q.type, q.answer, q.answer) is True
        assert answer_correct(q.type, q.expected, q.answer) is True  # the bare keyword or caption is enough


SLOT_EXAMPLES = {"thing": ("the circle", "the shape", "the object", "the red object", "the blue shape",
                           "the orange one"),
                 "item": ("a red circle", "an orange square"), "side": ("left", "right")}


def _examples(template: str) -> list[str]:
    """The template filled with every example of its slot (at most one slot per template)."""
    for slot, fills in SLOT_EXAMPLES.items():
        if "{" + slot + "}" in template:
            return [template.format(**{slot: fill}) for fill in fills]
    return [template]


def _typed_example(qtype: str, text: str) -> bool:
    """Colour questions name a shape or 'the shape/object', shape questions a coloured object."""
    if qtype == "color":
        return not any(c in text for c in COLORS)
    if qtype == "shape":
        return any(c in text for c in COLORS)
    return True


@pytest.mark.parametrize("qtype", list(PHRASINGS))
def test_every_wording_of_every_type_is_typed_and_its_phrasing_set_known(qtype):
    for phrasing_set, templates in PHRASINGS[qtype].items():
        for template in templates:
            for text in (t for t in _examples(template) if _typed_example(qtype, t)):
                assert question_type(text) == qtype, text
                assert question_type(text.lower()) == qtype, text
                assert phrasing_of(text) == (qtype, phrasing_set), text


ANSWER_CASES = {  # question type -> (words to fill its ANSWERS templates with, a reference answer)
    "color": ({"Thing": "The circle", "color": "red", "Color": "Red"}, "The circle is red."),
    "shape": ({"Thing": "The red object", "shape": "circle"}, "It is a circle."),
    "count": ({"is": "are", "n": "two", "N": "Two", "shapes": "shapes", "objects": "objects"},
              "There are two shapes."),
    "describe": ({"caption": "a red circle and a blue square", "Caption": "A red circle and a blue square"},
                 "A red circle and a blue square."),
    "side": ({"side": "left", "color": "red", "Color": "Red", "shape": "circle"}, "The left shape is red."),
}


@pytest.mark.parametrize("qtype", list(ANSWERS))
def test_every_answer_wording_scores_right_and_listing_every_colour_scores_wrong(qtype):
    words, reference = ANSWER_CASES[qtype]
    for template in ANSWERS[qtype]:
        assert answer_correct(qtype, template.format(**words), reference) is True, template
    if qtype in ("color", "side"):
        assert answer_correct(qtype, "It is " + ", ".join(COLORS) + ".", reference) is False
    if qtype == "shape":
        assert answer_correct(qtype, "It is a " + " or a ".join(SHAPES) + ".", reference) is False


@pytest.mark.parametrize("seed", range(3))
def test_generated_questions_of_every_type_score_their_own_answers_and_not_all_colours(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    kinds = [[("red", "circle")], [("yellow", "circle"), ("orange", "triangle")],
             [("blue", "triangle"), ("green", "triangle")]]
    for held_out in (0.0, 1.0):
        for k in kinds:
            for q in questions_for(_objects(*k), rng, held_out):
                assert question_type(q.question) == q.type and phrasing_of(q.question) == (q.type, q.phrasing)
                assert answer_correct(q.type, q.answer, q.answer) is True
                if q.type in ("color", "side"):
                    assert answer_correct(q.type, " ".join(COLORS), q.answer) is False


def test_question_type_of_the_four_templates_and_other_questions():
    assert question_type("What color is the circle?") == "color"
    assert question_type("what colour is the square?") == "color"
    assert question_type("What shape is the red object?") == "shape"
    assert question_type("How many shapes are there?") == "count"
    assert question_type("Describe the image.") == "describe"
    assert question_type("What is the capital of France?") == "other"
    assert question_type("Which colour is the big shape on the left?") == "side"  # open patterns, no wording
    assert question_type("What color is the tiny circle?") == "color"
    assert question_type("Is there a pink star?") == "exists"


def test_phrasing_of_ignores_case_white_space_and_colour_spelling():
    assert phrasing_of("What color is the circle?") == ("color", "seen")
    assert phrasing_of("What shape is the red object?") == ("shape", "seen")
    assert phrasing_of("  what colour   IS the square? ") == ("color", "seen")
    assert phrasing_of("name the color of the circle.") == ("color", "held_out")  # Whisper's spelling, no capital
    assert phrasing_of("Which color does the circle have?") == ("color", "held_out")  # the demo's spoken question
    assert phrasing_of("What is the capital of France?") is None


def test_parse_answer():
    assert parse_answer("color", "The circle is Red.") == "red"
    assert parse_answer("shape", "It is a triangle.") == "triangle"
    assert parse_answer("shape", "Two squares") == "square"
    assert parse_answer("count", "There are 2 shapes.") == "two"
    assert parse_answer("count", "There is one shape.") == "one"
    assert parse_answer("color", "I cannot tell.") is None
    assert parse_answer("side", "The left shape is purple.") == "purple"
    assert parse_answer("exists", "No, there is no red circle.") == "no"
    assert parse_answer("describe", "A red circle. ") == "a red circle"
    with pytest.raises(ValueError, match="unknown question type"):
        parse_answer("size", "big")


def _rows() -> list[dict]:
    def row(qtype, first, predicted, reference):
        return {"kind": "question", "id": "x_0", "image_id": 1, "type": qtype, "question": "?",
                "first_turn": first, "predicted": predicted, "reference": reference, "correct": None}

    return [
        {"kind": "caption", "image_id": 1, "predicted": "a red circle", "references": ["a red circle"]},
        row("color", True, "red and blue", "The circle is red."),
        row("color", True, "It is red.", "The circle is red."),
        row("color", False, "The circle is green.", "The circle is red."),
        row("count", False, "2", "There are two shapes."),
        row("other", True, "Paris", "Paris."),
    ]


def test_rescore_rows_counts_both_rules_per_type_for_all_and_first_turns():
    table = rescore_rows(_rows())
    assert list(table) == ["color", "count"]  # captions and unscorable questions are left out
    assert table["color"]["all"] == {"lenient": [2, 3], "strict": [1, 3]}
    assert table["color"]["first_turn"] == {"lenient": [2, 2], "strict": [1, 2]}
    assert table["count"]["all"] == {"lenient": [1, 1], "strict": [1, 1]}
    assert table["count"]["first_turn"] == {"lenient": [0, 0], "strict": [0, 0]}
    text = format_rescore(table)
    assert "color     first_turn      1.000       2/2    0.500       1/2" in text
    assert "count     first_turn          -       0/0        -       0/0" in text


def test_rescore_script_prints_the_table_of_a_predictions_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert rescore_predictions(path) == rescore_rows(_rows())
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "rescore.py"), str(path)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == format_rescore(rescore_rows(_rows()))
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "rescore.py"), str(tmp_path / "none.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
