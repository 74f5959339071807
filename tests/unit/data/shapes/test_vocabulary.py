"""The shapes set's wordings: many per type, the seen and held-out sets disjoint, DESIGN.md's forms seen."""

from __future__ import annotations

from trimodal.data.shapes.vocabulary import PHRASINGS, QUESTION_TYPES


def test_every_type_has_many_wordings_and_the_design_forms_are_seen() -> None:
    assert set(PHRASINGS) == {"color", "shape", "count", "describe", "exists", "side"} == set(QUESTION_TYPES)
    for qtype, sets in PHRASINGS.items():
        assert len(sets["seen"]) >= 8 and 2 <= len(sets["held_out"]) <= 3, qtype
        assert not set(sets["seen"]) & set(sets["held_out"])
    design = {"color": "What color is {thing}?", "shape": "What shape is {thing}?",
              "count": "How many shapes are there?", "describe": "Describe the image."}
    for qtype, form in design.items():
        assert PHRASINGS[qtype]["seen"][0] == form
