"""What the builder resolves (no Ray): preset and overrides from args over env, the run (matching the preset,
named without server paths), the API key, domains, the media sandbox; and `serve run` refusing a run of another
preset in one line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root

from serve_app.settings import (RunChoice, SettingsError, choose_run, ingress_settings, lm_hidden_size,  # noqa: E402
                                newest_run, resolve_settings, run_preset)


def _finished_run(path: Path, age_s: float = 0.0, preset: str | None = "test", in_config: bool = False) -> Path:
    """A final/ directory; its preset in run.json (as training writes it), or only in config.yaml (older runs)."""
    final = path / "final"
    final.mkdir(parents=True)
    meta = {"vision_tower": None, **({"preset": preset} if preset and not in_config else {})}
    (final / "run.json").write_text(json.dumps(meta))
    if in_config:
        (final / "config.yaml").write_text(yaml.safe_dump({"name": preset}))
    stamp = time.time() - age_s
    os.utime(final / "run.json", (stamp, stamp))
    return final


def test_the_newest_finished_run_of_the_preset_is_the_default(tmp_path):
    assert newest_run(tmp_path) is None
    old = _finished_run(tmp_path / "old", age_s=100)
    new = _finished_run(tmp_path / "stage2" / "new", age_s=50)
    _finished_run(tmp_path / "cpu-run", preset="cpu")  # newest of all, but trained with another preset
    (tmp_path / "unfinished" / "final").mkdir(parents=True)  # no run.json: not finished
    assert newest_run(tmp_path, "test") == new.resolve() and newest_run(tmp_path, "cpu").parent.name == "cpu-run"
    assert choose_run(None, tmp_path, "test") == RunChoice(str(new.resolve()), "stage2/new",
                                                           "run stage2/new (the newest finished run)")
    os.utime(old / "run.json")  # now the old one is newest
    assert choose_run(None, tmp_path, "test").name == "old"


def test_no_run_of_the_preset_means_no_run_and_says_which_presets_there_are(tmp_path):
    _finished_run(tmp_path / "finetune", preset="cpu")
    choice = choose_run(None, tmp_path, "test")
    assert choice.directory is None and choice.name is None
    assert choice.note == "no finished run of preset test under the runs directory (only runs of preset cpu)"


def test_the_preset_is_read_from_run_json_else_from_config_yaml(tmp_path):
    assert run_preset(_finished_run(tmp_path / "a", preset="cpu")) == "cpu"
    assert run_preset(_finished_run(tmp_path / "b", preset="phi2", in_config=True)) == "phi2"
    assert run_preset(_finished_run(tmp_path / "c", preset=None)) is None


def test_a_given_run_of_another_preset_is_refused_in_one_line_naming_both(tmp_path):
    final = _finished_run(tmp_path / "finetune", preset="cpu", in_config=True)
    with pytest.raises(SettingsError) as refused:
        choose_run(str(tmp_path / "finetune"), tmp_path, "test")
    message = str(refused.value)
    assert "\n" not in message and str(final.resolve()) in message
    assert "trained with preset 'cpu' but the server's preset is 'test'" in message
    with pytest.raises(SettingsError, match="preset 'cpu' but the server's preset is 'test'"):
        resolve_settings({"preset": "test", "run": str(final)}, env={})


def test_a_given_run_none_and_a_missing_run(tmp_path):
    final = _finished_run(tmp_path / "r")
    given = choose_run(str(tmp_path / "r"), tmp_path, "test")  # a run dir is accepted too
    assert given == RunChoice(str(final.resolve()), "r", "run r")
    elsewhere = _finished_run(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "exp")
    assert choose_run(str(elsewhere), tmp_path, "test").name == "exp"  # outside the runs dir: its own name
    assert choose_run("none", tmp_path) == RunChoice(None, None, "no run (TRIMODAL_RUN=none)")
    assert "no finished run" in choose_run(None, tmp_path / "empty").note
    with pytest.raises(SettingsError, match="not a finished run"):
        choose_run(str(tmp_path / "missing"), tmp_path)


def test_clients_get_the_run_name_never_a_server_path(tmp_path):
    _finished_run(tmp_path / "runs" / "demo" / "finetune")
    s = resolve_settings({"preset": "test", "runs_dir": str(tmp_path / "runs")}, env={})
    assert s.run_dir == str((tmp_path / "runs" / "demo" / "finetune" / "final").resolve())
    ing = ingress_settings(s)
    assert ing.run_name == "demo/finetune" and ing.run_note == "run demo/finetune (the newest finished run)"
    assert str(tmp_path) not in repr(ing)


def test_serve_run_with_a_run_of_another_preset_exits_with_one_line(tmp_path):
    """`serve run serve_app:graph` exactly as a user types it; refused before Ray starts (a bogus address makes
    a regression fail fast instead of starting a cluster)."""
    _finished_run(tmp_path / "runs" / "finetune", preset="cpu", in_config=True)
    env = {**os.environ, "TRIMODAL_PRESET": "test", "TRIMODAL_RUN": str(tmp_path / "runs" / "finetune"),
           "PYTHONPATH": str(ROOT)}
    serve = Path(sys.executable).parent / "serve"
    done = subprocess.run([str(serve), "run", "--address", "127.0.0.1:9", "serve_app:graph"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert lines[-1].startswith("[serve_app] cannot serve: run ") and "Traceback" not in done.stderr, done.stderr
    assert "preset 'cpu' but the server's preset is 'test'" in lines[-1]


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
    with pytest.raises(SettingsError, match="unknown argument 'bogus'"):
        resolve_settings({"bogus": 1}, env=env)


def test_path_sources_become_absolute_and_hidden_size_needs_no_weights(tmp_path):
    s = resolve_settings({"preset": "cpu", "run": "none"}, env={})
    assert Path(s.cfg.model.vision.source.name).is_absolute()
    test = resolve_settings({"preset": "test", "run": "none"}, env={})
    assert lm_hidden_size(test.cfg) == test.cfg.model.language_model.random_shape.hidden_size
