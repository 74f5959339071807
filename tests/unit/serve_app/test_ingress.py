"""The Ingress as a plain class behind Starlette's TestClient, with plain deployments behind LocalHandles:
routes and shapes, the API key (Bearer and Basic), body limits, overload (503 + Retry-After), timeouts (504, or an
error event mid-stream), readiness apart from liveness, prompts refused by their length before the LM, and run
names instead of server paths. The full table of bad inputs runs over real HTTP in
tests/integration/test_serve_app.py."""

import asyncio
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_handles, next to this file

from local_handles import LocalHandle  # noqa: E402
from serve_app.ingress import Ingress, supplied_key  # noqa: E402
from serve_app.language_model import LanguageModel  # noqa: E402
from serve_app.settings import AppSettings, ingress_settings  # noqa: E402
from serve_app.speech import Speech  # noqa: E402
from serve_app.vision import Vision  # noqa: E402

ASK = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}


class Overloaded(Exception):
    """Stands in for Serve's BackPressureError."""


class ReplicaDied(Exception):
    """Stands in for Ray's ActorDiedError (the replica serving the call was killed)."""


@pytest.fixture(scope="module")
def parts(test_cfg):
    hidden = test_cfg.model.language_model.random_shape.hidden_size
    return Speech(test_cfg), Vision(test_cfg, None, hidden), LanguageModel(test_cfg, None)


def _client(test_cfg, parts, api_key=None, timeout_s=30.0, lm=None, speech=None, max_body=None,
            ready_timeout_s=2.0) -> TestClient:
    settings = ingress_settings(AppSettings(test_cfg, None, "no run (test)", api_key=api_key))
    settings.request_timeout_s = timeout_s
    settings.ready_timeout_s = ready_timeout_s
    settings.max_body_bytes = max_body or settings.max_body_bytes
    sp, vi, model = parts
    ingress = Ingress(LocalHandle(speech or sp), LocalHandle(vi), LocalHandle(lm or model), settings, (Overloaded,),
                      (ReplicaDied,))
    return TestClient(ingress.asgi_app())


def _wav(seconds: float, rate: int = 16000) -> str:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def _events(response) -> list:
    return [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_health_models_page_and_unknown_routes(test_cfg, parts):
    client = _client(test_cfg, parts)
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "trimodal-test" and model["trimodal"]["projector_trained"] is False
    assert "UNTRAINED" in model["trimodal"]["note"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="question"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    for path in ("/static/nope.js", "/nope"):
        missing = client.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_answer_and_stream_shapes(test_cfg, parts):
    client = _client(test_cfg, parts)
    body = client.post("/v1/chat/completions", json=ASK).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    streamed = client.post("/v1/chat/completions",
                           json={**ASK, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == body["choices"][0]["message"]["content"]  # greedy: the same answer both ways


def test_audio_is_transcribed_and_reported(test_cfg, parts):
    client = _client(test_cfg, parts)
    audio = {"type": "input_audio", "input_audio": {"data": _wav(1.0), "format": "wav"}}
    body = client.post("/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": [audio]}], "max_tokens": 4}).json()
    assert isinstance(body["transcripts"], list) and len(body["transcripts"]) == 1


def test_api_key_guards_all_but_healthz(test_cfg, parts):
    client = _client(test_cfg, parts, api_key="s3cret")
    assert client.get("/healthz").status_code == 200
    denied = client.post("/v1/chat/completions", json=ASK)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    page = client.get("/")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert client.post("/v1/chat/completions", json=ASK, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    basic = "Basic " + base64.b64encode(b"anyone:s3cret").decode()
    assert client.get("/", headers={"Authorization": basic}).status_code == 200
    assert supplied_key("Basic !!!") == "" and supplied_key("Token x") == ""


def test_bodies_over_the_limit_are_413_by_header_and_by_count(test_cfg, parts):
    client = _client(test_cfg, parts, max_body=1000)
    big = json.dumps({**ASK, "pad": "x" * 2000}).encode()
    assert client.post("/v1/chat/completions", content=big).status_code == 413
    chunked = client.post("/v1/chat/completions", content=iter([big[:600], big[600:]]))
    assert chunked.status_code == 413 and "over the limit of 1000" in chunked.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=ASK).status_code == 200


class OverloadedLM:
    def describe(self) -> dict:
        return {}

    async def generate(self, request):
        raise Overloaded()
        yield  # an async generator


class SlowSpeech:
    def describe(self) -> dict:
        return {}

    async def transcribe(self, audio):
        await asyncio.sleep(10)


class SlowLM(OverloadedLM):
    async def generate(self, request):
        yield {"prompt_tokens": 3}
        yield {"text": "a", "finish_reason": None, "completion_tokens": 1}
        await asyncio.sleep(10)


def test_overload_is_503_with_retry_after(test_cfg, parts):
    response = _client(test_cfg, parts, lm=OverloadedLM()).post("/v1/chat/completions", json=ASK)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


class DyingLM(OverloadedLM):
    """A LanguageModel whose replica dies before answering, or (after_first) once the answer has started."""

    def __init__(self, after_first: bool = False):
        self.after_first = after_first

    async def generate(self, request):
        if self.after_first:
            yield {"prompt_tokens": 3}
            yield {"text": "a", "finish_reason": None, "completion_tokens": 1}
        raise ReplicaDied("The actor died unexpectedly before finishing this task.")


def test_a_dead_replica_is_503_with_retry_after_and_an_error_event_mid_stream(test_cfg, parts):
    response = _client(test_cfg, parts, lm=DyingLM()).post("/v1/chat/completions", json=ASK)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and error["type"] == "server_error" and "retry" in error["message"]
    events = _events(_client(test_cfg, parts, lm=DyingLM(after_first=True)).post(
        "/v1/chat/completions", json={**ASK, "stream": True}))
    assert json.loads(events[-2])["error"]["code"] == "model_unavailable" and events[-1] == "[DONE]"
    assert _client(test_cfg, parts).post("/v1/chat/completions", json=ASK).status_code == 200


def test_deadline_is_504_before_the_answer_and_an_error_event_during_it(test_cfg, parts):
    audio = {"type": "input_audio", "input_audio": {"data": _wav(0.5), "format": "wav"}}
    slow = _client(test_cfg, parts, timeout_s=0.5, speech=SlowSpeech())
    response = slow.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [audio]}]})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    streaming = _client(test_cfg, parts, timeout_s=0.5, lm=SlowLM())
    events = _events(streaming.post("/v1/chat/completions", json={**ASK, "stream": True}))
    assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"


def test_prompt_over_the_limit_is_400(test_cfg, parts):
    response = _client(test_cfg, parts).post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2000}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


class DeadLM(OverloadedLM):
    """Every call fails the way a call to a SIGKILLed replica does."""

    async def describe(self) -> dict:
        raise ReplicaDied("The actor died unexpectedly before finishing this task.")


class LoadingLM(OverloadedLM):
    """A replica still loading its model: no call is answered."""

    async def describe(self) -> dict:
        await asyncio.Event().wait()


READY = {"Speech": "ready", "Vision": "ready", "LanguageModel": "ready"}


def test_readyz_is_200_while_every_part_answers_and_503_naming_the_part_that_does_not(test_cfg, parts):
    ready = _client(test_cfg, parts, api_key="k").get("/readyz")  # like /healthz, open to probes
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "deployments": READY}
    dead = _client(test_cfg, parts, lm=DeadLM()).get("/readyz")
    assert dead.status_code == 503 and dead.headers["retry-after"] == "1"
    assert dead.json() == {"status": "not ready", "not_ready": ["LanguageModel"],
                           "deployments": {**READY, "LanguageModel": "unavailable (ReplicaDied)"}}
    loading = _client(test_cfg, parts, lm=LoadingLM(), ready_timeout_s=0.2)
    body = loading.get("/readyz").json()
    assert body["not_ready"] == ["LanguageModel"] and body["deployments"]["Vision"] == "ready"
    assert body["deployments"]["LanguageModel"].startswith("no answer within 0.2 s")
    assert loading.get("/healthz").json() == {"status": "ok"}  # liveness says nothing about the deployments


def test_a_prompt_far_over_the_limit_is_refused_by_its_length_before_the_lm(test_cfg, parts):
    lm = parts[2]
    client, before = _client(test_cfg, parts), lm.stats()["prompts"]
    for content in ("x" * 1_000_000, [{"type": "text", "text": "y" * 60_000}] * 2):
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded", error
        assert error["param"] == "messages" and "far over the limit of 768 tokens" in error["message"]
    assert lm.stats()["prompts"] == before  # never reached the LanguageModel
    near = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2000}]})
    assert near.json()["error"]["message"].startswith("prompt is ")  # under the bound: the LM counts tokens
    assert lm.stats()["prompts"] == before + 1


def _trained_run(runs: Path, cfg) -> Path:
    """A finished run of the test preset with its own vision tower directory (as stage 0 + stage 1 leave one)."""
    from safetensors.torch import save_file

    from trimodal.models.projector import build_projector
    from trimodal.models.vision import random_vision_tower

    tower = random_vision_tower(cfg.model.vision)
    tower.model.save_pretrained(runs / "clip" / "tower", safe_serialization=True)
    final = runs / "pretrain" / "final"
    final.mkdir(parents=True)
    projector = build_projector(tower.info.hidden_size, cfg.model.language_model.random_shape.hidden_size)
    save_file(projector.state_dict(), str(final / "projector.safetensors"))
    (final / "run.json").write_text(json.dumps({"preset": "test", "vision_tower": str(runs / "clip" / "tower")}))
    return final


def test_models_and_the_page_show_run_names_never_server_paths(test_cfg, tmp_path):
    from serve_app.settings import resolve_settings

    _trained_run(tmp_path / "runs", test_cfg)
    s = resolve_settings({"preset": "test", "runs_dir": str(tmp_path / "runs")}, env={})
    hidden = test_cfg.model.language_model.random_shape.hidden_size
    ingress = Ingress(LocalHandle(Speech(s.cfg)), LocalHandle(Vision(s.cfg, s.run_dir, hidden)),
                      LocalHandle(LanguageModel(s.cfg, s.run_dir)), ingress_settings(s))
    client = TestClient(ingress.asgi_app())
    models = client.get("/v1/models")
    details = models.json()["data"][0]["trimodal"]
    assert details["run"] == "pretrain" and details["vision_tower"] == "clip/tower"
    assert details["projector_trained"] is True and details["note"].startswith("run pretrain (the newest")
    for text in (models.text, client.get("/").text, client.get("/static/app.js").text):
        assert str(tmp_path) not in text and "/tmp" not in text


def test_model_picks_the_run_and_an_unknown_model_is_a_404(test_cfg, parts, tmp_path, make_run):
    from serve_app.settings import resolve_settings

    make_run(tmp_path / "runs", "demo/finetune", 1)
    make_run(tmp_path / "runs", "demo/pretrain", 2, adapter=False)
    s = resolve_settings({"preset": "test", "runs_dir": str(tmp_path / "runs"), "run": "none"}, env={})
    speech, vision, lm = parts
    client = TestClient(Ingress(LocalHandle(speech), LocalHandle(vision), LocalHandle(lm),
                                ingress_settings(s)).asgi_app())
    models = client.get("/v1/models")
    listed = models.json()["data"]
    assert [m["id"] for m in listed] == ["trimodal-test", "trimodal-test/base", "demo/finetune", "demo/pretrain"]
    assert all(m["owned_by"] == "trimodal" and isinstance(m["created"], int) for m in listed)
    assert listed[2]["trimodal"] == {"run": "demo/finetune", "base": False, "adapter": True, "projector_trained": True}
    assert str(tmp_path) not in models.text
    unknown = client.post("/v1/chat/completions", json={**ASK, "model": "demo/nothing"})
    assert unknown.status_code == 404 and unknown.json()["error"] == {
        "message": unknown.json()["error"]["message"], "type": "invalid_request_error", "code": "model_not_found",
        "param": "model"}
    assert "'demo/nothing' does not exist" in unknown.json()["error"]["message"]
    answers = {m: client.post("/v1/chat/completions", json={**ASK, "model": m}).json()
               for m in ("trimodal-test/base", "demo/finetune")}
    assert {m: a["model"] for m, a in answers.items()} == {m: m for m in answers}
    assert answers["trimodal-test/base"]["choices"][0]["message"]["content"] != \
        answers["demo/finetune"]["choices"][0]["message"]["content"]
    streamed = _events(client.post("/v1/chat/completions", json={**ASK, "model": "demo/pretrain", "stream": True}))
    assert {json.loads(e)["model"] for e in streamed if e != "[DONE]"} == {"demo/pretrain"}


def _png(color: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_answers_report_stage_timings_and_the_ingress_counts_requests_and_refusals(test_cfg, parts):
    settings = ingress_settings(AppSettings(test_cfg, None, "no run (test)", api_key="k"))
    sp, vi, model = parts
    ingress = Ingress(LocalHandle(sp), LocalHandle(vi), LocalHandle(model), settings)
    client, auth = TestClient(ingress.asgi_app()), {"Authorization": "Bearer k"}
    content = [{"type": "image_url", "image_url": {"url": _png("red")}},
               {"type": "input_audio", "input_audio": {"data": _wav(0.5), "format": "wav"}},
               {"type": "text", "text": "hello"}]
    whole = client.post("/v1/chat/completions", headers=auth,
                        json={"messages": [{"role": "user", "content": content}], "max_tokens": 6}).json()
    timings = whole["timings"]
    assert timings["transcribe_s"] > 0 and timings["encode_s"] > 0
    assert whole["usage"]["completion_tokens"] == 0 or timings["first_token_s"] >= timings["encode_s"]
    events = _events(client.post("/v1/chat/completions", headers=auth, json={**ASK, "stream": True}))
    finish = [json.loads(e) for e in events[:-1] if json.loads(e)["choices"][0]["finish_reason"]]
    assert finish and finish[0]["timings"]["transcribe_s"] is None and finish[0]["timings"]["encode_s"] is None
    assert client.post("/v1/chat/completions", json=ASK).status_code == 401
    assert client.post("/v1/chat/completions", headers=auth, json={**ASK, "max_tokens": 0}).status_code == 400
    tallies = ingress.metrics.tallies
    assert tallies[("requests", "/v1/chat/completions", 200)] == 2
    assert tallies[("rejected", "unauthorized")] == 1 and tallies[("rejected", "invalid")] == 1
    assert tallies[("requests", "/v1/chat/completions", 401)] == 1
