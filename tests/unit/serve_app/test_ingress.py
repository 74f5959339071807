"""The Ingress as a plain class behind Starlette's TestClient, with plain deployments behind LocalHandles:
routes and shapes, the API key (Bearer and Basic), body limits, overload (503 + Retry-After), timeouts (504, or an
error event mid-stream). The full table of bad inputs runs over real HTTP in tests/integration/test_serve_app.py."""

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

from serve_app.deployments import LanguageModel, Speech, Vision  # noqa: E402
from serve_app.ingress import Ingress, LocalHandle, supplied_key  # noqa: E402
from serve_app.settings import AppSettings, ingress_settings  # noqa: E402

ASK = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}


class Overloaded(Exception):
    """Stands in for Serve's BackPressureError."""


class ReplicaDied(Exception):
    """Stands in for Ray's ActorDiedError (the replica serving the call was killed)."""


@pytest.fixture(scope="module")
def parts(test_cfg):
    hidden = test_cfg.model.language_model.random_shape.hidden_size
    return Speech(test_cfg), Vision(test_cfg, None, hidden), LanguageModel(test_cfg, None)


def _client(test_cfg, parts, api_key=None, timeout_s=30.0, lm=None, speech=None, max_body=None) -> TestClient:
    settings = ingress_settings(AppSettings(test_cfg, None, "no run (test)", api_key=api_key))
    settings.request_timeout_s = timeout_s
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
