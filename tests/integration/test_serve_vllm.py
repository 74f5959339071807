"""The Serve graph with the vllm engine (serving.engine=vllm) on a local Ray, over real HTTP on 127.0.0.1, with the
official `openai` client: text, an image, a spoken question, streaming, and two runs chosen by `model` beside the
base model, each answer compared with the builtin engine's in this process (greedy, float32: the same text); more
runs than LoRA slots in turn (the least recently used adapter is evicted), and a run with a broken adapter (a 424
naming it, left out of /v1/models until it is rewritten).

The LanguageModel replica runs in `.venv-vllm` (runtime_env py_executable; make install-vllm, which CI runs). The
model is the `test` preset's tiny Llama with 2 heads (vLLM's CPU attention needs a head size of at least 32). Ray's
Prometheus export is scraped at the end: vLLM's own engine metrics from the replica sit beside trimodal's. Ray here
starts without the suite's telemetry settings, so the replica (and vLLM's engine process under it) has usage
statistics off only if the project's own settings for it do so.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "trimodal-test"
OVERRIDES = {"model.language_model.random_shape.num_heads": 2, "serving.vllm.max_loras": 3}  # two adapters + base
SETTINGS = {"preset": "test", "run": "none", "threads": 1, "serving.engine": "vllm", **OVERRIDES}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(color=(220, 30, 30)) -> bytes:
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    img.paste(Image.new("RGB", (32, 32), color), (16, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs_dir, monkeypatch_module):
    """(base url, metrics port) of a Serve app whose LanguageModel runs on the vllm engine."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vllm environment is not installed ({VLLM_PYTHON} missing): run `make install-vllm`")
    import ray
    from ray import serve

    from serve_app.app import build_app

    tmp = tmp_path_factory.mktemp("vllm-serve")
    monkeypatch_module.setenv("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))  # the replica inherits these
    monkeypatch_module.setenv("TRIMODAL_CACHE", str(tmp / "trimodal-cache"))
    for name in NO_TELEMETRY_ENV:  # Ray inherits this environment: the replica must not owe its settings to it
        monkeypatch_module.delenv(name, raising=False)
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = _free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({**SETTINGS, "runs_dir": str(runs_dir)}), name="main", route_prefix="/")
    yield f"http://127.0.0.1:{port}", metrics_port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def builtin(runs_dir):
    """chat(messages, run, max_tokens) -> the builtin engine's greedy text, in this process, same config."""
    from trimodal.config import load_config
    from trimodal.inference.requests import SamplingParams
    from trimodal.runs import load_engine

    cfg = load_config("test", OVERRIDES)
    engines = {}

    def chat(messages, run: str | None, max_tokens: int) -> str:
        if run not in engines:
            engines[run] = load_engine(cfg, runs_dir / run / "final" if run else None)
        return engines[run].chat(messages, SamplingParams(max_tokens=max_tokens)).text

    return chat


def test_the_replica_runs_the_vllm_engine(server, client):
    from ray import serve

    info = serve.get_deployment_handle("LanguageModel", app_name="main").describe.remote().result()
    assert info["engine"] == "vllm" and info["dtype"] == "float32"
    assert [m.id for m in client.models.list().data] == [MODEL, MODEL + "/base", "one", "two"]


def lm_replica():
    """The LanguageModel replica's Ray actor (Serve names it SERVE_REPLICA::main#LanguageModel#<id>)."""
    import ray

    names = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::main#LanguageModel#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0][0], namespace=names[0][1])


def test_the_replica_and_its_engine_process_send_no_usage_statistics(server):
    """Read from inside the running replica (Ray's `__ray_call__` runs a function in an actor's process, so the
    deployment needs no method for it): its environment, the environment of each process under it (vLLM's engine
    core, started from it), and vLLM's own verdict, usage_lib.is_usage_stats_enabled()."""
    import ray

    def inside(_replica, names: list[str]) -> dict:
        import os

        import psutil
        from vllm.usage.usage_lib import is_usage_stats_enabled

        children = {}
        for child in psutil.Process().children(recursive=True):
            try:
                children[f"{child.pid} {child.name()}"] = {n: child.environ().get(n) for n in names}
            except psutil.NoSuchProcess:
                continue
        return {"replica": {n: os.environ.get(n) for n in names}, "children": children,
                "usage_stats_enabled": is_usage_stats_enabled()}

    seen = ray.get(lm_replica().__ray_call__.remote(inside, sorted(NO_TELEMETRY_ENV)), timeout=120)
    assert seen["replica"] == NO_TELEMETRY_ENV, seen
    assert seen["children"], "vLLM's engine core runs in a process under the replica"
    assert all(env == NO_TELEMETRY_ENV for env in seen["children"].values()), seen["children"]
    assert seen["usage_stats_enabled"] is False


def test_text_matches_the_builtin_engine(client, builtin):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    assert resp.choices[0].message.content == builtin(messages, None, 16)
    assert resp.usage.prompt_tokens > 0 and 1 <= resp.usage.completion_tokens <= 16


def test_image_matches_the_builtin_engine(client, builtin):
    messages = [{"role": "user", "content": [image_part(png()), text_part("What color is the square?")]}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert resp.choices[0].message.content == builtin(messages, None, 12)


def test_spoken_question_with_an_image(client):
    wav = (ROOT / "tests" / "data" / "what_color.wav").read_bytes()
    resp = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[
        {"role": "user", "content": [image_part(png((30, 30, 220))), audio_part(wav)]}])
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens >= 1
    assert len(resp.model_extra["transcripts"]) == 1


def test_streaming_gives_the_whole_answer(client):
    messages = [{"role": "user", "content": [image_part(png()), text_part("Describe the image.")]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one piece


def test_two_runs_chosen_by_model_answer_as_in_process(client, builtin):
    """Each id decodes with its run's projector and LoRA adapter (the base id: neither), also when all three are
    asked at once and share vLLM's batches."""
    from concurrent.futures import ThreadPoolExecutor

    messages = [{"role": "user", "content": [image_part(png()), text_part("What color is the square?")]}]
    runs = {MODEL + "/base": None, "one": "one", "two": "two"}
    expected = {model: builtin(messages, run, 12) for model, run in runs.items()}
    assert len(set(expected.values())) == 3  # the control: base, one and two answer differently

    def ask(model: str) -> str:
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
        assert resp.model == model
        return resp.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, list(runs) * 2))
    assert answers == [expected[m] for m in list(runs) * 2]


def test_more_runs_than_slots_evict_the_least_recently_used_adapter(client, builtin, runs_dir, make_run):
    """max_loras 3 holds two adapters (one slot stays free for base rows): four runs asked in turn, then the first
    again, each answer as in process; the replica counts the evictions."""
    from ray import serve

    make_run(runs_dir, "three", 3)
    make_run(runs_dir, "four", 4)
    time.sleep(1.1)  # past the registry's rescan interval
    lm = serve.get_deployment_handle("LanguageModel", app_name="main")
    before = lm.stats.remote().result()
    messages = [{"role": "user", "content": [image_part(png()), text_part("What color is the square?")]}]
    order = ["one", "two", "three", "four", "one", MODEL + "/base"]
    for model in order:
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
        run = None if model.endswith("/base") else model
        assert resp.model == model and resp.choices[0].message.content == builtin(messages, run, 12), model
    after = lm.stats.remote().result()
    assert after["adapters_loaded"] <= OVERRIDES["serving.vllm.max_loras"] - 1
    assert after["adapter_evictions"] - before["adapter_evictions"] >= 3, (before, after)
    print("adapter loads, evictions:", after["adapter_loads"], after["adapter_evictions"])


def test_a_broken_adapter_is_a_424_and_the_run_comes_back_once_rewritten(server, client, runs_dir, make_run,
                                                                         tmp_path):
    import httpx

    weights = make_run(runs_dir, "cut", 5) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    time.sleep(1.1)
    ask = {"model": "cut", "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}
    answer = httpx.post(server[0] + "/v1/chat/completions", json=ask, timeout=120)
    error = answer.json()["error"]
    assert answer.status_code == 424 and error["code"] == "run_unavailable", answer.text
    assert error["message"].startswith("the run 'cut' cannot be loaded: adapter/adapter_model.safetensors")
    assert str(runs_dir) not in answer.text
    assert "cut" not in [m.id for m in client.models.list().data]
    assert client.chat.completions.create(model="one", messages=ask["messages"], max_tokens=4).model == "one"
    weights.write_bytes((make_run(tmp_path, "fresh", 5) / "adapter" / "adapter_model.safetensors").read_bytes())
    time.sleep(1.1)
    assert "cut" in [m.id for m in client.models.list().data]
    assert client.chat.completions.create(model="cut", messages=ask["messages"], max_tokens=4).model == "cut"

def test_vllm_engine_metrics_are_exported(server, client):
    """vLLM's own engine metrics (exported through Ray from the replica) sit beside trimodal's in one scrape."""
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    names: set[str] = set()
    deadline = time.monotonic() + 90  # Ray's metrics agent reports every few seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{server[1]}/metrics", timeout=30) as response:
            names = set(re.findall(r"^(ray_(?:vllm|trimodal)_\w+?)(?:\{|\s)", response.read().decode(), re.M))
        if any(n.startswith("ray_vllm_") for n in names) and "ray_trimodal_time_to_first_token_seconds_sum" in names:
            break
        time.sleep(3)
    vllm_names = sorted(n for n in names if n.startswith("ray_vllm_"))
    assert vllm_names and "ray_trimodal_time_to_first_token_seconds_sum" in names, sorted(names)
    print("vLLM metrics exported:", ", ".join(vllm_names))
