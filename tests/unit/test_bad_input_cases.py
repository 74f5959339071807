"""The bad-input sweep's cases, as the sweep and the soak drill send them to a server of any preset."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "drills"))

import bad_input_sweep  # noqa: E402

LIMIT = 16 << 20


def named_models(cases: list) -> list:
    return [c.body["model"] for c in cases if isinstance(c.body, dict) and "model" in c.body]


def test_cases_name_the_served_presets_model_so_they_are_refused_for_their_own_fault():
    default = bad_input_sweep.all_cases(LIMIT)
    for_cpu = bad_input_sweep.all_cases(LIMIT, "trimodal-cpu")
    assert [c.name for c in for_cpu] == [c.name for c in default]
    assert set(named_models(default)) == {"trimodal-test", 42}
    assert set(named_models(for_cpu)) == {"trimodal-cpu", 42}  # the wrong-type case keeps its wrong type
    assert len(named_models(for_cpu)) > 50  # most cases are whole chat requests


def test_the_pixel_limit_case_is_just_over_the_served_presets_limit():
    for preset, limit in (("test", 4096 * 1024), ("cpu", 4096 * 4096)):
        over = [c for c in bad_input_sweep.cases_for(preset) if "just over the pixel limit" in c.name]
        assert len(over) == 1 and over[0].expect == (400,)
        width, height = (int(v) for v in over[0].name.split(" PNG")[0].split(" x "))
        assert limit < width * height <= limit + 4096
