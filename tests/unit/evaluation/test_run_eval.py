"""Question jobs and per-type accuracies of the evaluation (the model-free parts of run_eval)."""

from __future__ import annotations

from trimodal.evaluation.run_eval import _accuracies, question_jobs


def _conversation() -> dict:
    return {"id": "000001000001_0", "image_id": 1000001, "turns": [
        {"role": "user", "text": "Describe the image."},
        {"role": "assistant", "text": "A yellow circle and an orange triangle."},
        {"role": "user", "text": "What color is the circle?"},
        {"role": "assistant", "text": "The circle is yellow."},
    ]}


def test_question_jobs_mark_the_opening_question_and_keep_reference_history() -> None:
    jobs = question_jobs([_conversation()])
    assert [(j["type"], j["first_turn"]) for j in jobs] == [("describe", True), ("color", False)]
    first, second = jobs
    assert [t.role for t in first["history"]] == ["user"] and first["history"][0].text.endswith("Describe the image.")
    assert second["history"][1].text == "A yellow circle and an orange triangle."  # the reference, not a prediction
    assert second["reference"] == "The circle is yellow."


def test_accuracies_report_all_turns_and_first_turns_separately() -> None:
    tally = {("color", True): [1, 4], ("color", False): [5, 6], ("count", False): [2, 2]}
    out = _accuracies(tally)
    assert out["color"]["accuracy"] == 0.6 and (out["color"]["correct"], out["color"]["total"]) == (6, 10)
    assert out["color"]["first_turn"] == {"accuracy": 0.25, "correct": 1, "total": 4}
    assert out["count"]["first_turn"] == {"accuracy": None, "correct": 0, "total": 0}  # no opening count question
    assert out["count"]["accuracy"] == 1.0
