"""The models a request may name: the default id, the base id, every finished run of the preset by its name
(never a path; other presets' runs not listed), a run finished after start found by a rescan, unknown ids refused."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.registry import RunRegistry, UnknownModel, run_bundle  # noqa: E402


def _run(runs: Path, name: str, preset: str = "test", adapter: bool = True) -> Path:
    final = runs / name / "final"
    final.mkdir(parents=True)
    if adapter:
        (final / "adapter").mkdir()
    (final / "run.json").write_text(json.dumps({"preset": preset}))
    return final


def test_ids_are_the_default_the_base_and_each_run_of_the_preset(tmp_path):
    finetune = _run(tmp_path, "demo/finetune")
    _run(tmp_path, "demo/pretrain", adapter=False)
    _run(tmp_path, "other", preset="cpu")
    registry = RunRegistry(tmp_path, "test", run_bundle(finetune, "demo/finetune"))
    entries = registry.entries()
    assert [e.id for e in entries] == ["trimodal-test", "trimodal-test/base", "demo/finetune", "demo/pretrain"]
    assert entries[0].run == entries[2].run and entries[1].run is None
    assert entries[2].run.adapter == str(finetune.resolve() / "adapter") and entries[3].run.adapter is None
    assert registry.resolve(None).id == registry.resolve("").id == "trimodal-test"
    assert registry.resolve("trimodal-test/base").run is None
    assert registry.resolve("demo/pretrain").run.directory == str((tmp_path / "demo/pretrain/final").resolve())
    with pytest.raises(UnknownModel, match="'other' does not exist"):
        registry.resolve("other")  # trained with another preset


def test_a_run_finished_after_start_is_found_and_unknown_ids_are_refused(tmp_path):
    registry = RunRegistry(tmp_path / "runs", "test", rescan_interval_s=0.0)
    assert [e.id for e in registry.entries()] == ["trimodal-test", "trimodal-test/base"]
    assert registry.resolve("trimodal-test").run is None  # no default run: the base model answers
    with pytest.raises(UnknownModel, match="GET /v1/models"):
        registry.resolve("late")
    _run(tmp_path / "runs", "late")
    assert registry.resolve("late").run.name == "late"


def test_rescans_are_rate_limited_and_a_default_outside_the_runs_dir_is_listed_by_name(tmp_path):
    elsewhere = _run(tmp_path / "elsewhere", "exp")
    registry = RunRegistry(tmp_path / "runs", "test", run_bundle(elsewhere, "exp"), rescan_interval_s=3600)
    assert [e.id for e in registry.entries()] == ["trimodal-test", "trimodal-test/base", "exp"]
    assert registry.resolve("exp").run.directory == str(elsewhere.resolve())
    _run(tmp_path / "runs", "late")
    with pytest.raises(UnknownModel):
        registry.resolve("late")  # scanned less than an hour ago: no rescan for every unknown id
    registry.scan()
    assert registry.resolve("late").id == "late"


def test_a_broken_run_is_left_out_until_its_files_change(tmp_path):
    from serve_app.registry import RunUnavailable

    _run(tmp_path, "good")
    broken = _run(tmp_path, "broken")
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    registry = RunRegistry(tmp_path, "test", rescan_interval_s=0.0)
    entry = registry.resolve("broken")
    assert not registry.verified(entry) and registry.verified(registry.resolve("trimodal-test/base"))
    registry.mark_broken(entry, "adapter/adapter_model.safetensors is not a readable safetensors file")
    assert [e.id for e in registry.entries()] == ["trimodal-test", "trimodal-test/base", "good"]
    with pytest.raises(RunUnavailable, match="'broken' cannot be loaded: adapter/adapter_model.safetensors") as err:
        registry.resolve("broken")
    assert str(tmp_path) not in str(err.value)
    registry.scan()
    assert "broken" not in [e.id for e in registry.entries()]  # a rescan with the same files keeps it out
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"fixed, and longer than before")
    assert [e.id for e in registry.entries()][-2:] == ["broken", "good"]
    assert registry.resolve("broken").fingerprint != entry.fingerprint


def test_the_default_run_is_never_left_out(tmp_path):
    final = _run(tmp_path / "elsewhere", "exp")
    registry = RunRegistry(tmp_path / "runs", "test", run_bundle(final, "exp"))
    registry.mark_broken(registry.resolve(None), "projector.safetensors is missing")
    assert [e.id for e in registry.entries()] == ["trimodal-test", "trimodal-test/base", "exp"]
