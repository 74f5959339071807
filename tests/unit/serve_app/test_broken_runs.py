"""A run whose files cannot be loaded, through the Ingress with real Speech, Vision and LanguageModel (builtin) in
one process: each kind of breakage is a 424 `run_unavailable` naming the run and the file (never a server path),
the run leaves /v1/models, every other run keeps answering, and a run whose files are rewritten comes back."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_handles, next to this file

from local_handles import LocalHandle  # noqa: E402
from serve_app.ingress import Ingress  # noqa: E402
from serve_app.language_model import LanguageModel  # noqa: E402
from serve_app.settings import ingress_settings, resolve_settings  # noqa: E402
from serve_app.speech import Speech  # noqa: E402
from serve_app.vision import Vision  # noqa: E402

ASK = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _widen(file: Path) -> None:
    """Every tensor one row longer: a file of another model's shapes."""
    save_file({k: torch.cat([v, v[:1]]) for k, v in load_file(str(file)).items()}, str(file))


BREAKAGES = {  # run name -> (how its files are broken, the fault its error names)
    "cut": (lambda f: _truncate(f / "adapter" / "adapter_model.safetensors"),
            "adapter/adapter_model.safetensors is not a readable safetensors file"),
    "notjson": (lambda f: (f / "adapter" / "adapter_config.json").write_text("{oops"),
                "adapter/adapter_config.json is not valid JSON"),
    "wide": (lambda f: _widen(f / "adapter" / "adapter_model.safetensors"), "adapter does not fit this model"),
    "noproj": (lambda f: (f / "projector.safetensors").unlink(), "projector.safetensors is missing"),
    "badproj": (lambda f: _widen(f / "projector.safetensors"), "projector.safetensors does not fit this model"),
}


@pytest.fixture(scope="module")
def served(test_cfg, make_run, tmp_path_factory):
    """(client, runs directory) of an Ingress over a runs directory with `good` and one run per BREAKAGES entry."""
    runs = tmp_path_factory.mktemp("runs")
    make_run(runs, "good", 1)
    for i, (name, (breakage, _)) in enumerate(BREAKAGES.items()):
        breakage(make_run(runs, name, 10 + i))
    settings = resolve_settings({"preset": "test", "runs_dir": str(runs), "run": "none"}, env={})
    hidden = test_cfg.model.language_model.random_shape.hidden_size
    parts = Speech(test_cfg), Vision(test_cfg, None, hidden), LanguageModel(test_cfg, None)
    ingress = Ingress(*(LocalHandle(p) for p in parts), ingress_settings(settings))
    return TestClient(ingress.asgi_app()), runs


def _ask(client: TestClient, model: str):
    return client.post("/v1/chat/completions", json={**ASK, "model": model})


def _listed(client: TestClient) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_a_broken_run_is_a_424_naming_it_and_leaves_the_listing(served, name):
    client, runs = served
    assert name in _listed(client)
    for attempt in range(2):  # the first loads and fails; the second is refused by the registry, same answer
        answer = _ask(client, name)
        error = answer.json()["error"]
        assert answer.status_code == 424, answer.text
        assert (error["code"], error["type"], error["param"]) == ("run_unavailable", "server_error", "model")
        assert error["message"].startswith(f"the run {name!r} cannot be loaded: {BREAKAGES[name][1]}"), error
        assert str(runs) not in answer.text
    assert name not in _listed(client)
    good = _ask(client, "good")
    assert good.status_code == 200 and good.json()["model"] == "good"


def test_a_rewritten_run_is_listed_and_answers_again(served, make_run, tmp_path):
    client, runs = served
    assert _ask(client, "cut").status_code == 424
    fresh = make_run(tmp_path, "fresh", 10)
    shutil.copy2(fresh / "adapter" / "adapter_model.safetensors", runs / "cut" / "final" / "adapter")
    deadline = time.monotonic() + 10  # the registry rescans at most once a second
    while "cut" not in _listed(client) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cut" in _listed(client)
    answer = _ask(client, "cut")
    assert answer.status_code == 200 and answer.json()["model"] == "cut", answer.text
    assert json.loads((runs / "cut" / "final" / "run.json").read_text())["preset"] == "test"  # run.json untouched
