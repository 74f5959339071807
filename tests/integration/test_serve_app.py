"""The Serve graph on a local Ray, through real HTTP on 127.0.0.1, with the `test` preset.

One Serve instance runs two applications for the whole module: `main`, the whole graph (open; its runs directory
holds two finished runs, `one` and `two`, with their own projectors and random LoRA adapters, served beside the
base model; remote images allowed from `localhost` only, to show that a listed host resolving to loopback is still refused; fetched through
the media sandbox: `localhost` answered from a table, a loopback-only transport recording every attempt), and
`guarded`, a second Ingress on main's Speech and Vision (an API key, one ongoing + one queued request, a 2 s request
timeout) with its own LanguageModel that answers one token per 10 ms whatever the model (test_token_delay_s), so a
3,000-token answer outlasts the timeout on any machine. The official `openai` client, raw httpx and a headless
Debian chromium (driven over the DevTools protocol; no background networking, no host but 127.0.0.1 resolvable)
talk to them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from trimodal.inference.media_fetch import read_attempts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root (Ray workers inherit the driver's sys.path)
KEY = "key-for-tests"
MODEL = "trimodal-test"
PATCHES = 16  # test preset: 64 px images, 16 px patches
COMMON = {"preset": "test", "run": "none", "threads": 1, "serving.max_tokens_limit": 4000,
          "serving.max_body_bytes": 2_000_000, "model.speech.max_seconds": 40}


@dataclass
class Server:
    url: str
    media_record: Path
    """Every remote-media fetch main's transport was asked to make (JSON lines)."""

    def post(self, path: str, body=None, raw=None, headers=None, timeout: float = 60) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, timeout=timeout,
                          headers={"Content-Type": "application/json", **(headers or {})})

    def ask(self, content, path: str = "/v1/chat/completions", **fields) -> httpx.Response:
        return self.post(path, {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs_dir):
    import ray
    from ray import serve

    from serve_app.app import bind_ingress, bind_lm, build_app_with_env
    from serve_app.settings import resolve_settings

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    record = tmp_path_factory.mktemp("media") / "fetch-attempts.jsonl"
    sandbox = {"record": str(record), "hosts": {"localhost": ["127.0.0.1", "::1"]}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app_with_env({**COMMON, "media_sandbox": sandbox, "runs_dir": str(runs_dir)},
                                 env={"TRIMODAL_ALLOWED_MEDIA_DOMAINS": "localhost"}),
              name="main", route_prefix="/")
    # A second front door: an API key, 1 ongoing + 1 queued request, a 2 s timeout, a steady 10 ms-per-token LM.
    guarded = resolve_settings({**COMMON, "serving.max_ongoing_requests": 1, "serving.max_queued_requests": 1,
                                "serving.request_timeout_s": 2, "test_token_delay_s": 0.01},
                               env={"TRIMODAL_API_KEY": KEY})
    media = [serve.get_deployment_handle(name, app_name="main") for name in ("Speech", "Vision")]
    serve.run(bind_ingress(guarded, *media, bind_lm(guarded)), name="guarded", route_prefix="/guarded")
    yield Server(f"http://127.0.0.1:{port}", record)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


CANDIDATE_PROMPTS = ("a", "slow", "b", "zz", "Tell me a long story", "x y z", "count", "q")


@pytest.fixture(scope="module")
def long_prompt(server) -> str:
    """A prompt the random LM of `main` answers greedily for 1000 tokens without stopping (about a second)."""
    for prompt in CANDIDATE_PROMPTS:
        if server.ask(prompt, max_tokens=1000).json()["choices"][0]["finish_reason"] == "length":
            return prompt
    pytest.fail("no prompt makes the random test LM generate 1000 tokens")


def lm_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("LanguageModel", app_name=app).stats.remote().result()


# -- media --------------------------------------------------------------------------------------------------------

def png(w: int = 64, h: int = 64, color=(220, 30, 30)) -> bytes:
    img = Image.new("RGB", (w, h), (245, 245, 245))
    img.paste(Image.new("RGB", (w // 2, h // 2), color), (w // 4, h // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def spoken_question() -> bytes:
    return (DATA / "what_color.wav").read_bytes()


# -- the openai client ----------------------------------------------------------------------------------------

def test_health_readiness_and_models(server, client):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert set(ready.json()["deployments"]) == {"Speech", "Vision", "LanguageModel"}
    model = client.models.list().data[0]
    assert model.id == MODEL
    details = model.model_extra["trimodal"]
    assert details["projector_trained"] is False and details["vision_tower_untrained"] is True
    assert "UNTRAINED" in details["note"] and details["run"] is None
    assert str(ROOT) not in httpx.get(server.url + "/v1/models").text  # no server paths


def test_text(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=8)
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 1 <= resp.usage.completion_tokens <= 8
    assert resp.object == "chat.completion" and resp.model == MODEL


def test_image_and_multiple_images(client):
    def ask(n: int):
        parts = [image_part(png(color=c)) for c in [(220, 30, 30), (30, 200, 30), (30, 30, 220)][:n]]
        return client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": parts + [text_part("What color is the square?")]}])

    one, three = ask(1), ask(3)
    assert isinstance(one.choices[0].message.content, str)
    assert three.usage.prompt_tokens - one.usage.prompt_tokens == 2 * (PATCHES + 1)  # every image reached the LM


def test_image_and_spoken_question(client):
    resp = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[
        {"role": "user", "content": [image_part(png()), audio_part(spoken_question())]}])
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert len(resp.model_extra["transcripts"]) == 1


@pytest.mark.parametrize("name", ["fox.flac", "fox.ogg", "fox.mp3"])
def test_audio_formats(server, name):
    path = DATA / name
    resp = server.ask([audio_part(path.read_bytes(), path.suffix[1:]), text_part("Repeat it.")], max_tokens=2)
    assert resp.status_code == 200, resp.text


def test_audio_over_30_seconds_is_transcribed_whole(server):
    resp = server.ask([audio_part(wav(35, rate=8000))], max_tokens=2)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["transcripts"]) == 1


def test_model_chooses_the_run_and_an_unknown_model_is_not_found(server, client, runs_dir, test_cfg, make_run):
    """Each id answers as that run does in process (its projector and adapter; the base: neither); a run finished
    after start is found; an unknown id is a 404 and the server answers afterwards."""
    import openai

    from trimodal.inference.requests import SamplingParams
    from trimodal.runs import load_engine

    assert [m.id for m in client.models.list().data] == [MODEL, MODEL + "/base", "one", "two"]
    messages = [{"role": "user", "content": [image_part(png()), text_part("What color is the square?")]}]
    answers = {}
    for model, run in ((MODEL + "/base", None), ("one", runs_dir / "one" / "final"), ("two", runs_dir / "two" / "final")):
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
        expected = load_engine(test_cfg, run, speech=False).chat(messages, SamplingParams(max_tokens=12))
        assert resp.model == model and resp.choices[0].message.content == expected.text, model
        answers[model] = expected.text
    assert len(set(answers.values())) == 3  # the control: base, one and two answer differently
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="three", messages=messages, max_tokens=4)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    make_run(runs_dir, "three", 3)  # finished after the server started
    time.sleep(1.1)  # past the registry's rescan interval
    assert client.chat.completions.create(model="three", messages=messages, max_tokens=4).model == "three"
    assert "three" in [m.id for m in client.models.list().data]


def listed_ids(server: Server) -> list[str]:
    return [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]


def test_a_broken_run_is_a_424_naming_it_and_comes_back_once_its_files_are_rewritten(server, runs_dir, make_run,
                                                                                      tmp_path):
    """A truncated adapter (the LanguageModel loads it) and a missing projector (Vision loads it, for a text-only
    question too): 424 run_unavailable naming the run and the file, never a server path; both leave /v1/models,
    the other runs answer on the same replicas; rewritten correctly, each is listed and answers again."""
    cut = make_run(runs_dir, "broken/adapter", 21)
    weights = cut / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (make_run(runs_dir, "broken/projector", 22) / "projector.safetensors").unlink()
    time.sleep(1.1)  # past the registry's rescan interval
    assert {"broken/adapter", "broken/projector"} <= set(listed_ids(server))
    replicas = lm_stats("main")
    faults = {"broken/adapter": "adapter/adapter_model.safetensors is not a readable safetensors file",
              "broken/projector": "projector.safetensors is missing"}
    for model, fault in faults.items():
        answer = server.post("/v1/chat/completions", {"model": model, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hello"}]})
        error = answer.json()["error"]
        assert answer.status_code == 424 and error["code"] == "run_unavailable", answer.text
        assert error["message"].startswith(f"the run {model!r} cannot be loaded: {fault}") and \
            str(runs_dir) not in answer.text, error
    assert not {"broken/adapter", "broken/projector"} & set(listed_ids(server))
    for model in ("one", "two", MODEL):
        assert server.post("/v1/chat/completions", {"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": [image_part(png()), text_part("What color?")]}]}).status_code == 200
    fresh = make_run(tmp_path, "fresh", 23)
    shutil.copy2(fresh / "adapter" / "adapter_model.safetensors", weights)
    shutil.copy2(fresh / "projector.safetensors", runs_dir / "broken" / "projector" / "final")
    time.sleep(1.1)
    assert {"broken/adapter", "broken/projector"} <= set(listed_ids(server))
    for model in faults:
        answer = server.post("/v1/chat/completions", {"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": [image_part(png()), text_part("What color?")]}]})
        assert answer.status_code == 200 and answer.json()["model"] == model, answer.text
    after = lm_stats("main")  # the same replica throughout: its counters went on from where they were
    assert after["prompts"] >= replicas["prompts"] + 6 and after["adapter_loads"] > replicas["adapter_loads"]

def test_streaming(client):
    messages = [{"role": "user", "content": [image_part(png()), text_part("Describe the image.")]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


# -- bad input ----------------------------------------------------------------------------------------------------

def _messages(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


BAD_INPUTS = [
    ("invalid JSON", b"{not json", 400, "not valid JSON"),
    ("JSON array", b"[1]", 400, "must be a JSON object"),
    ("deeply nested JSON", b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nested too deeply"),
    ("no messages", {}, 400, "messages is required"),
    ("empty messages", {"messages": []}, 400, "non-empty list"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "needs a role"),
    ("empty content", _messages(""), 400, "content is empty"),
    ("unknown part type", _messages([{"type": "video", "video": {}}]), 400, "unknown content part type 'video'"),
    ("invalid base64", _messages([url_part("data:image/png;base64,@@not-base64@@")]), 400, "invalid base64"),
    ("non-image bytes", _messages([image_part(b"this is not an image")]), 400, "not a readable image"),
    ("truncated image", _messages([image_part(png()[:60])]), 400, "not a readable image"),
    ("image over the pixel limit", _messages([image_part(png(3000, 3000))]), 400, "over the limit of 4194304"),
    ("too many images", _messages([image_part(png())] * 5), 400, "too many images"),
    ("remote URL, host not allowed", _messages([url_part("https://example.com/cat.png")]), 400,
     "not in the allowed media domains"),
    ("remote URL, allowed host on loopback", _messages([url_part("http://localhost:9/cat.png")]), 400,
     "non-public address"),
    ("audio format", _messages([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}]), 400,
     "format 'aac' is not one of"),
    ("undecodable audio", _messages([audio_part(b"RIFF....garbage")]), 400, "cannot decode the audio"),
    ("audio over the duration limit", _messages([audio_part(wav(45, rate=8000))]), 400, "40 s"),
    ("max_tokens 0", {**_messages("hi"), "max_tokens": 0}, 400, "between 1 and 4000"),
    ("max_tokens over the limit", {**_messages("hi"), "max_tokens": 4001}, 400, "between 1 and 4000"),
    ("max_tokens not an integer", {**_messages("hi"), "max_tokens": "ten"}, 400, "must be an integer"),
    ("temperature out of range", {**_messages("hi"), "temperature": 3}, 400, "temperature must be in"),
    ("top_p out of range", {**_messages("hi"), "top_p": 0}, 400, "top_p must be in"),
    ("stop of the wrong type", {**_messages("hi"), "stop": 7}, 400, "stop must be a string or a list"),
    ("several choices", {**_messages("hi"), "n": 3}, 400, "n must be 1"),
    ("prompt over the length limit", _messages("x" * 5000), 400, "over the limit of 768"),
    ("prompt far over the length limit", _messages("x" * 1_000_000), 400, "far over the limit of 768 tokens"),
    ("body over max_body_bytes", b'{"pad": "' + b"x" * 2_100_000 + b'"}', 413, "over the limit of 2000000"),
]


@pytest.mark.parametrize("name, body, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_the_server_keeps_serving(server, name, body, status, message):
    resp = server.post("/v1/chat/completions", raw=body) if isinstance(body, bytes) else server.post(
        "/v1/chat/completions", body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert server.ask("still there?", max_tokens=2).status_code == 200
    assert read_attempts(server.media_record) == []  # no remote fetch was even attempted, loopback or not


def test_a_million_character_prompt_is_refused_by_the_ingress_and_never_reaches_the_lm(server, client):
    import openai

    before = lm_stats("main")["prompts"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 1_000_000}])
    assert refused.value.status_code == 400 and refused.value.code == "context_length_exceeded"
    assert "1,000,000 characters" in refused.value.message
    assert lm_stats("main")["prompts"] == before
    assert server.ask("hi", max_tokens=2).status_code == 200 and lm_stats("main")["prompts"] == before + 1


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    resp = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60)
    assert resp.status_code == 413 and "over the limit" in resp.json()["error"]["message"]
    assert server.ask("still there?", max_tokens=2).status_code == 200


def test_unknown_routes_are_json_errors(server):
    missing = httpx.get(server.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


# -- cancellation, overload, timeout, the API key -----------------------------------------------------------------

def test_client_disconnect_stops_generation(server, long_prompt):
    before = lm_stats("main")
    body = {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert any('"content"' in line and '"content":""' not in line for line in lines)  # text is flowing
    deadline = time.time() + 10
    while time.time() < deadline and not (lm_stats("main")["cancelled"] > before["cancelled"]
                                          and lm_stats("main")["active"] == 0):
        time.sleep(0.2)
    after = lm_stats("main")
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0


def test_overload_is_503_with_retry_after_and_slow_requests_time_out(server):
    """`guarded` takes 1 request + 1 queued; its LM needs 30 s for 3,000 tokens, past the 2 s timeout."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 3000}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: server.post("/guarded/v1/chat/completions", body, headers=auth),
                                  range(8)))
    statuses = sorted(r.status_code for r in responses)
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and all(int(r.headers["retry-after"]) >= 1 for r in rejected), statuses
    timed_out = [r for r in responses if r.status_code == 504]
    assert timed_out and {r.json()["error"]["code"] for r in timed_out} == {"timeout"}, statuses
    assert set(statuses) == {503, 504}, statuses  # no answer can finish in time
    ok = server.post("/guarded/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2}, headers=auth)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "xx"
    deadline = time.time() + 30
    while time.time() < deadline and lm_stats("guarded")["active"]:
        time.sleep(0.2)
    stats = lm_stats("guarded")
    assert stats["active"] == 0 and stats["cancelled"] >= 1  # the timed-out rows were cancelled


def test_api_key_on_and_off(server):
    from openai import AuthenticationError, OpenAI

    guarded = server.url + "/guarded"
    assert httpx.get(guarded + "/healthz").status_code == 200
    denied = httpx.get(guarded + "/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    page = httpx.get(guarded + "/")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(guarded + "/", auth=("me", KEY)).status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    keyed = OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0)
    resp = keyed.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert resp.choices[0].message.content is not None
    assert httpx.get(server.url + "/v1/models").status_code == 200  # the main app has no key


# -- the web page in headless chromium ------------------------------------------------------------------------------

class Chromium:
    """Headless Debian chromium driven over the DevTools protocol (websockets; no extra packages)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--remote-debugging-port=0",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no host but 127.0.0.1 resolves
             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a fake microphone (a beep)

    def __init__(self, executable: str, profile: Path):
        self.proc = subprocess.Popen([executable, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port(profile / "DevToolsActivePort")
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def _devtools_port(self, path: Path) -> int:
        deadline = time.time() + 30
        while time.time() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


WATCH_STREAMING = """
window.__seen = [];
new MutationObserver(() => {
  const msg = document.querySelector('.msg.assistant');
  if (msg) window.__seen.push([msg.dataset.state, msg.querySelector('.text').textContent.length]);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true, attributes: true});
"""


def record_and_ask(browser: Chromium) -> dict:
    """Record ~1 s from the (fake) microphone, let the page encode it as WAV, send it, wait for the answer."""
    browser.eval("document.getElementById('record').click()")
    browser.wait_for("document.getElementById('record').classList.contains('recording')")
    time.sleep(1.2)
    browser.eval("document.getElementById('record').click()")
    browser.wait_for("!document.getElementById('audio-preview').hidden")
    browser.eval("document.getElementById('send').click()")
    browser.wait_for("document.querySelectorAll('.msg.assistant').length === 2 && "
                     "document.querySelectorAll('.msg.assistant')[1].dataset.state !== 'streaming'")
    return browser.eval("({label: [...document.querySelectorAll('.msg.user')].pop().querySelector('.meta')"
                        "?.textContent || '', state: [...document.querySelectorAll('.msg.assistant')].pop()"
                        ".dataset.state, status: document.getElementById('status').textContent, timings: "
                        "[...document.querySelectorAll('.msg.assistant')].pop().querySelector('.timings')"
                        "?.textContent || ''})")


def test_web_page_in_headless_chromium(server, tmp_path, require_binary):
    executable = require_binary("chromium")
    image = tmp_path / "red-square.png"
    image.write_bytes(png())
    browser = Chromium(executable, tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait_for(f"document.readyState === 'complete' && "
                         f"document.getElementById('model').value === '{MODEL}'")
        picker = browser.eval("[...document.getElementById('model').options].map(o => o.value)")
        assert "UNTRAINED" in browser.eval("document.getElementById('note').textContent")
        browser.eval("const m = document.getElementById('model'); m.value = 'one';"
                     "m.dispatchEvent(new Event('change'))")
        run_note = browser.eval("document.getElementById('note').textContent")
        browser.eval(f"const p = document.getElementById('model'); p.value = '{MODEL}';"
                     "p.dispatchEvent(new Event('change'))")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#image-input")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
        browser.wait_for("document.querySelectorAll('#previews img').length === 1")
        browser.eval("document.getElementById('question').focus()")
        browser.send("Input.insertText", text="What color is the square?")
        browser.eval(WATCH_STREAMING + "document.getElementById('send').click()")
        browser.wait_for("document.querySelector('.msg.assistant')?.dataset.state === 'done'")
        answer = browser.eval("document.querySelector('.msg.assistant .text').textContent")
        timings = browser.eval("document.querySelector('.msg.assistant .timings')?.textContent || ''")
        seen = browser.eval("window.__seen")
        recorded = record_and_ask(browser)
        resources = browser.eval("performance.getEntriesByType('resource').map(e => e.name)")
    finally:
        browser.close()
    assert picker[:2] == [MODEL, MODEL + "/base"] and {"one", "two"} <= set(picker[2:])  # the model picker
    assert run_note == "run one"
    assert answer and any(state == "streaming" and length > 0 for state, length in seen)  # text appeared live
    assert recorded["label"].startswith("🎤 recording (") and recorded["state"] == "done", recorded
    # Under each answer, the server's stage timings: the image question's encode, the spoken one's transcription
    # (the image is resent with the history: from the media cache), both with first token and decode rate.
    stage = r"\d+\.\d\d s"
    assert re.fullmatch(rf"image encode {stage} · first token {stage}( · \d+\.\d tokens/s)?", timings), timings
    assert re.match(rf"transcribe {stage} · image encode {stage} · first token {stage}", recorded["timings"]), recorded
    assert all(r.startswith(server.url) for r in resources)  # no external assets
    direct = server.ask([image_part(image.read_bytes()), text_part("What color is the square?")],
                        max_tokens=128).json()
    assert answer == direct["choices"][0]["message"]["content"]  # the page showed the model's (greedy) answer
