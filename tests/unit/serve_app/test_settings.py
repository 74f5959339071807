"""What the builder resolves (no Ray): preset and overrides from args over env, the run, the API key, domains."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.settings import choose_run, ingress_settings, lm_hidden_size, newest_run, resolve_settings  # noqa: E402


def _finished_run(path: Path, age_s: float = 0.0) -> Path:
    final = path / "final"
    final.mkdir(parents=True)
    (final / "run.json").write_text(json.dumps({"vision_tower": None}))
    stamp = time.time() - age_s
    os.utime(final / "run.json", (stamp, stamp))
    return final


def test_the_newest_finished_run_is_the_default(tmp_path):
    assert newest_run(tmp_path) is None
    _finished_run(tmp_path / "old", age_s=100)
    new = _finished_run(tmp_path / "stage2" / "new")
    (tmp_path / "unfinished" / "final").mkdir(parents=True)  # no run.json: not finished
    assert newest_run(tmp_path) == new.resolve()
    run_dir, note = choose_run(None, tmp_path)
    assert run_dir == str(new.resolve()) and "newest" in note


def test_a_given_run_none_and_a_missing_run(tmp_path):
    final = _finished_run(tmp_path / "r")
    assert choose_run(str(tmp_path / "r"), tmp_path)[0] == str(final.resolve())  # a run dir is accepted too
    assert choose_run("none", tmp_path) == (None, "no run (TRIMODAL_RUN=none)")
    assert "no finished run" in choose_run(None, tmp_path / "empty")[1]
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        choose_run(str(tmp_path / "missing"), tmp_path)


def test_args_override_env_and_env_is_read_once_here(tmp_path):
    env = {"TRIMODAL_PRESET": "test", "TRIMODAL_RUN": "none", "TRIMODAL_API_KEY": "k",
           "TRIMODAL_ALLOWED_MEDIA_DOMAINS": "img.example.com, *.cdn.example.org"}
    s = resolve_settings({"serving.max_batch_size": "3", "threads": "2"}, env=env)
    assert s.cfg.name == "test" and s.cfg.serving.max_batch_size == 3 and s.threads == 2 and s.media_threads == 1
    assert s.run_dir is None and s.api_key == "k"
    assert s.allowed_media_domains == ("img.example.com", "*.cdn.example.org")
    ing = ingress_settings(s)
    assert ing.api_key == "k" and ing.model_id == "trimodal-test" and ing.limits.max_tokens_limit == 256
    assert resolve_settings({"preset": "test", "run": "none"}, env={}).api_key is None
    with pytest.raises(ValueError, match="unknown argument 'bogus'"):
        resolve_settings({"bogus": 1}, env=env)


def test_path_sources_become_absolute_and_hidden_size_needs_no_weights(tmp_path):
    s = resolve_settings({"preset": "cpu", "run": "none"}, env={})
    assert Path(s.cfg.model.vision.source.name).is_absolute()
    test = resolve_settings({"preset": "test", "run": "none"}, env={})
    assert lm_hidden_size(test.cfg) == test.cfg.model.language_model.random_shape.hidden_size
