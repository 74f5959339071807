"""Question jobs, per-type accuracies (seen / held-out wordings, describe on two shapes) and the printed table of the
evaluation (the model-free parts of run_eval)."""

from __future__ import annotations

import json

from trimodal.evaluation.run_eval import (_accuracies, conversation_scores, image_objects, print_table,
                                          question_jobs)
from trimodal.evaluation.scoring import rescore_rows


def _conversation() -> dict:
    return {"id": "000001000001_0", "image_id": 1000001, "turns": [
        {"role": "user", "text": "Describe the image."},
        {"role": "assistant", "text": "A yellow circle and an orange triangle."},
        {"role": "user", "text": "What color is the circle?"},
        {"role": "assistant", "text": "The circle is yellow."},
    ]}


def _opening(cid: str, question: str, answer: str) -> dict:
    return {"id": cid, "image_id": 1000002, "turns": [{"role": "user", "text": question},
                                                       {"role": "assistant", "text": answer}]}


def test_question_jobs_mark_the_opening_question_and_keep_reference_history() -> None:
    jobs = question_jobs([_conversation()])
    assert [(j["type"], j["first_turn"]) for j in jobs] == [("describe", True), ("color", False)]
    first, second = jobs
    assert [t.role for t in first["history"]] == ["user"] and first["history"][0].text.endswith("Describe the image.")
    assert second["history"][1].text == "A yellow circle and an orange triangle."  # the reference, not a prediction
    assert second["reference"] == "The circle is yellow."


def test_question_jobs_record_the_phrasing_set_and_the_new_types() -> None:
    conversations = [
        _opening("a_0", "Which color does the circle have?", "It is red."),
        _opening("b_0", "Is there a red circle?", "Yes, there is a red circle."),
        _opening("c_0", "Name the colour of the object on the left.", "The left shape is blue."),
        _opening("d_0", "What is the capital of France?", "Paris."),
    ]
    jobs = question_jobs(conversations)
    assert [(j["type"], j["phrasing"]) for j in jobs] == [
        ("color", "held_out"), ("exists", "seen"), ("side", "held_out"), ("other", None)]


def test_accuracies_report_all_turns_and_first_turns_separately() -> None:
    tally = {("color", True, "seen", 0): [1, 3], ("color", True, "held_out", 0): [0, 1],
             ("color", False, "seen", 0): [5, 6], ("count", False, "seen", 0): [2, 2]}
    out = _accuracies(tally)
    assert out["color"]["accuracy"] == 0.6 and (out["color"]["correct"], out["color"]["total"]) == (6, 10)
    assert out["color"]["first_turn"] == {"accuracy": 0.25, "correct": 1, "total": 4,
                                          "seen": {"accuracy": 1 / 3, "correct": 1, "total": 3},
                                          "held_out": {"accuracy": 0.0, "correct": 0, "total": 1}}
    none = {"accuracy": None, "correct": 0, "total": 0}
    assert out["count"]["first_turn"] == {**none, "seen": none, "held_out": none}  # no opening count question
    assert out["count"]["accuracy"] == 1.0
    assert "two_objects" not in out["color"]


def _scored() -> tuple[dict, list[dict]]:
    conversations = [
        _opening("a_0", "Describe the image.", "A red circle and a blue square."),
        _opening("b_0", "Name the objects in the image.", "The image shows a green triangle and a red square."),
        _opening("c_0", "What do you see?", "A purple circle."),
        _opening("d_0", "What color is the square?", "The square is blue."),
        _opening("e_0", "Identify the color of the circle.", "Red."),
    ]
    preds = ["A red circle.", "A red square and a green triangle.", "A purple circle.",
             "It is red, green, blue, yellow, purple or orange.", "It is red."]
    return conversation_scores(question_jobs(conversations), preds)


def test_describe_is_scored_by_exact_sets_and_split_by_objects_and_phrasing() -> None:
    result, rows = _scored()
    describe = result["describe"]
    assert (describe["correct"], describe["total"]) == (2, 3)
    assert describe["two_objects"]["correct"] == 1 and describe["two_objects"]["total"] == 2  # one object named only
    assert describe["two_objects"]["first_turn"]["total"] == 2
    assert describe["first_turn"]["seen"]["total"] == 2 and describe["first_turn"]["held_out"]["correct"] == 1
    assert result["color"]["first_turn"]["seen"]["correct"] == 0  # every colour listed: wrong
    assert result["color"]["first_turn"]["held_out"]["accuracy"] == 1.0
    assert [r["phrasing"] for r in rows] == ["seen", "held_out", "seen", "seen", "held_out"]
    assert rescore_rows(json.loads(json.dumps(rows)))["color"]["first_turn"] == {"lenient": [2, 2], "strict": [1, 2]}


def test_print_table_shows_seen_held_out_two_objects_and_all_types(capsys) -> None:
    questions, _ = _scored()
    print_table({"captions": {"BLEU-1": 0.5, "BLEU-4": 0.25, "CIDEr-D": 1.5, "images": 4}, "questions": questions})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["metric", "value", "n", "first", "turn", "n", "seen", "n", "held-out", "n"]
    assert lines[1].split() == ["captions", "BLEU-1", "0.5000", "4"]
    assert lines[4].split() == ["accuracy", "color", "0.500", "2", "0.500", "2", "0.000", "1", "1.000", "1"]
    assert lines[5].split() == ["accuracy", "describe", "0.667", "3", "0.667", "3", "0.500", "2", "1.000", "1"]
    assert lines[6].split() == ["describe", "2", "objects", "0.500", "2", "0.500", "2"]
    assert lines[7].split() == ["accuracy", "all", "types", "0.600", "5", "0.600", "5", "0.333", "3", "1.000", "2"]


def test_every_type_is_split_by_the_shapes_on_its_image() -> None:
    references = {1: ["a red circle and a blue square", "a red circle on the left and a blue square on the right"],
                  2: ["a green triangle", "a picture of a green triangle"], 3: ["A man on a moped."]}
    objects = image_objects(references)
    assert objects == {1: 2, 2: 1, 3: 0}
    conversations = [_opening("a_0", "What color is the square?", "The square is blue."),
                     _opening("b_0", "What color is the triangle?", "The triangle is green.")]
    conversations[0]["image_id"], conversations[1]["image_id"] = 1, 2
    result, _ = conversation_scores(question_jobs(conversations), ["It is red.", "It is green."], objects)
    assert result["color"]["two_objects"] == {"accuracy": 0.0, "correct": 0, "total": 1,
                                              "first_turn": {"accuracy": 0.0, "correct": 0, "total": 1}}
    assert result["color"]["first_turn"]["correct"] == 1 and result["color"]["total"] == 2
