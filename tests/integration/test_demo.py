"""The README's first command as a newcomer runs it: `scripts/demo.sh` (what `make demo` runs) end to end with a
fresh empty HOME (no ~/.ray token, no weights cache), on the `test` preset with a few steps per stage, on private
Ray ports and temp dir; then the stop command. Also the demo's own first-contact mistakes: its serving port taken,
a second demo while one runs, and a stop when nothing runs.

In every step, training included (sampled twice a second), every listening socket of its processes must be on
loopback, except the one Ray cannot be told to bind elsewhere (docs/troubleshooting.md, "Ports"): each Serve
replica's inter-deployment gRPC server, which Ray 2.60 binds to all interfaces and guards with the cluster token.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 1500
STEPS = ["1/10 install", "2/10 local Ray head", "3/10 synthetic shapes set", "4/10 stage 0", "5/10 preprocess",
         "6/10 stage 1", "7/10 stage 2", "8/10 serve run", "9/10 ask over HTTP", "10/10 evaluate"]
QUESTIONS = ["[text: What is the capital of France?]", "[image ", "[spoken question (what_color.wav)"]
LOOPBACK = ("127.", "::ffff:127.", "::1")
RAY_ONLY_ALL_INTERFACES = re.compile(r"^ray::ServeReplica:")
"""Processes allowed to listen beyond loopback: Serve replicas' token-guarded inter-deployment gRPC servers."""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine where Ray never ran: fresh HOME, private ports, temp dir and runs dir."""
    home = tmp_path_factory.mktemp("home")
    temp = Path(tempfile.mkdtemp(prefix="rdemo", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    ray, dash, serve, client, agent, agent_grpc, runtime_env, metrics = free_ports(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TRIMODAL_"))}
    env |= {"HOME": str(home), "RUNS": str(tmp_path_factory.mktemp("runs")), "PRESET": "test",
            "STEPS0": "2", "STEPS1": "2", "STEPS2": "2", "SHAPES_TRAIN": "16", "SHAPES_VAL": "4",
            "RAY_PORT": str(ray), "DASHBOARD_PORT": str(dash), "TRIMODAL_PORT": str(serve),
            "METRICS_PORT": str(metrics),
            "RAY_START_ARGS": f"--temp-dir={temp} --ray-client-server-port={client} "
                              f"--dashboard-agent-listen-port={agent} --dashboard-agent-grpc-port={agent_grpc} "
                              f"--runtime-env-agent-port={runtime_env} --metrics-export-port={metrics}"}
    yield env
    subprocess.run(["bash", "scripts/demo.sh", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def demo(env: dict[str, str], *args: str, timeout: float = DEMO_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/demo.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_taken_serving_port_stops_the_demo_before_any_work(newcomer):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(newcomer["TRIMODAL_PORT"])))
        squatter.listen()
        result = demo(newcomer, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"port {newcomer['TRIMODAL_PORT']} is taken" in lines[0] and "TRIMODAL_PORT=" in lines[0]
    assert "== 1/10" not in result.stdout  # nothing was started


def test_stop_when_nothing_runs_is_one_line(newcomer):
    result = demo(newcomer, "stop", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: nothing to stop"), lines


def test_the_demo_on_a_fresh_machine_then_stop(newcomer):
    first = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, env=newcomer, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    sampled: dict[tuple[str, int], tuple[str, str]] = {}  # (address, port) -> (first step seen, process name)
    done = threading.Event()
    sampler = threading.Thread(target=_sample_listeners, args=(newcomer, seen, sampled, done), daemon=True)
    try:
        for line in first.stdout:  # until the first demo holds its lock (step 1 began)
            seen.append(line)
            if line.startswith("== 1/10"):
                break
        sampler.start()
        second = demo(newcomer, timeout=120)
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        for line in first.stdout:
            seen.append(line)
            assert time.monotonic() < deadline, "".join(seen)[-4000:]
        first.wait(timeout=60)
        out = "".join(seen)
    finally:
        done.set()
        first.kill()
    assert first.returncode == 0, out[-6000:]
    _check_listeners_of_every_step(sampled)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode != 0 and len(lines) == 1 and "a demo is already running" in lines[0], second.stderr

    _check_steps_and_answers(out, newcomer)
    assert f"Prometheus metrics (Ray's and trimodal's): http://127.0.0.1:{newcomer['METRICS_PORT']}/metrics" in out
    _check_metrics(newcomer)
    token = Path(newcomer["HOME"]) / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert "[token] created" in out and token.read_text().strip() not in out  # made here, never printed

    sockets = _listeners(newcomer)
    exposed = [s for s in sockets if not s[0].startswith(LOOPBACK)]
    assert len(sockets) > 10 and not [s for s in exposed if not RAY_ONLY_ALL_INTERFACES.match(s[2])], sockets

    stopped = demo(newcomer, "stop", timeout=180)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped:"), stopped.stdout + stopped.stderr
    ports = [int(newcomer[k]) for k in ("RAY_PORT", "DASHBOARD_PORT", "TRIMODAL_PORT")]
    assert not [p for p in ports if listening(p)] and not [s for s in sockets if listening(s[1])]


def _sample_listeners(env: dict[str, str], lines: list[str], sampled: dict, done: threading.Event) -> None:
    """Until `done`: twice a second, every listening socket of the head's processes (training workers included)
    and of the server, with the demo step it was first seen in."""
    head = _local_head()
    pid_file = Path(env["RUNS"]) / "serve.pid"
    while not done.is_set():
        step = next((line[3:].strip() for line in reversed(lines) if line.startswith("== ")), "start")
        for ip, port, name in head.listeners(int(env["RAY_PORT"]), pid_file):
            first_step = sampled.get((ip, port), (step, name))[0]
            sampled[ip, port] = (first_step, name)  # a worker is renamed once its actor starts: keep the newest name
        done.wait(0.5)


def _check_listeners_of_every_step(sampled: dict[tuple[str, int], tuple[str, str]]) -> None:
    """No socket beyond loopback in any step (but Serve's replicas' own), and the training workers were sampled."""
    exposed = {(ip, port): seen for (ip, port), seen in sampled.items()
               if not ip.startswith(LOOPBACK) and not RAY_ONLY_ALL_INTERFACES.match(seen[1])}
    assert not exposed, exposed
    for stage in ("4/10 stage 0", "6/10 stage 1", "7/10 stage 2"):
        workers = [row for row, (step, name) in sampled.items()
                   if step.startswith(stage) and name.startswith("ray::RayTrain")]
        assert workers, f"no training worker's socket was sampled during {stage}: {sampled}"


def _local_head():
    spec = importlib.util.spec_from_file_location("local_head", ROOT / "scripts" / "local_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_steps_and_answers(out: str, env: dict[str, str]) -> None:
    for step in STEPS:
        block = out.split(f"== {step}", 1)
        assert len(block) == 2, f"step {step!r} did not run:\n{out[-4000:]}"
        assert re.search(rf"{re.escape(step)}[^\n]*: \d+ s\n", block[1]), f"step {step!r} has no time"
    answers = out.split("== 9/10", 1)[1].split("== 10/10", 1)[0]
    for question in QUESTIONS:
        after = answers.split(question, 1)
        assert len(after) == 2, f"{question!r} was not asked:\n{answers}"
        reply = [line for line in after[1].splitlines()[1:] if not line.strip().startswith("transcript used")]
        assert len(reply) >= 2 and all(line.startswith("  ") and line.strip() for line in reply[:2]), answers
        assert reply[0].split()[0] == "finetune" and reply[1].split()[0] == "base", answers  # side by side
    assert f"Web page:  open http://127.0.0.1:{env['TRIMODAL_PORT']}/" in out
    assert "make demo-stop" in out.split("Done.", 1)[1]


def _listeners(env: dict[str, str]) -> list[tuple[str, int, str]]:
    """`local_head.py listeners --check-loopback` as docs/troubleshooting.md tells a user to run it; its rows."""
    result = subprocess.run([sys.executable, "scripts/local_head.py", "listeners", "--check-loopback", "--port",
                             env["RAY_PORT"], "--serve-pid-file", str(Path(env["RUNS"]) / "serve.pid")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = []
    for line in result.stdout.splitlines():
        ip, port, name = line.split()[:3]
        rows.append((ip, int(port), name))
    return rows


TRIMODAL_METRICS = ("trimodal_requests_total", "trimodal_rejected_requests_total",
                    "trimodal_time_to_first_token_seconds_count", "trimodal_decode_tokens_per_second_count",
                    "trimodal_transcribe_seconds_count", "trimodal_image_encode_seconds_count",
                    "trimodal_lm_queue_wait_seconds_count", "trimodal_lm_batch_rows_count",
                    "trimodal_media_cache_hits_total", "trimodal_media_cache_misses_total")


def _post(env: dict[str, str], body: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{env['TRIMODAL_PORT']}/v1/chat/completions",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _check_metrics(env: dict[str, str]) -> None:
    """After a refused request and an image + spoken question asked twice (the second from the media caches), the
    head's Prometheus export (the port docs/serving.md says to scrape) has every trimodal metric, with values that
    fit what was sent."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, format="PNG")
    wav = (ROOT / "tests" / "data" / "what_color.wav").read_bytes()
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                   base64.b64encode(png.getvalue()).decode()}},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]
    ask = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    assert [_post(env, ask), _post(env, ask), _post(env, {**ask, "max_tokens": 0})] == [200, 200, 400]
    values: dict[str, float] = {}
    # Each replica process exports on its own few-second cycle (Speech's cache hit and Vision's can arrive in
    # different scrapes), so poll until every expected count is in, then assert each one.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _metrics_complete(values):
        time.sleep(3)
        values = _scrape(env["METRICS_PORT"])
    assert all(values.get(name) for name in TRIMODAL_METRICS), {n: values.get(n) for n in TRIMODAL_METRICS}
    assert values["trimodal_requests_total"] >= 6  # the demo's three questions, two here and one refused
    assert values["trimodal_rejected_requests_total"] >= 1
    assert values["trimodal_media_cache_hits_total"] >= 2  # the second ask: its image and its audio
    assert 0 < values["trimodal_time_to_first_token_seconds_sum"] < 600


def _metrics_complete(values: dict[str, float]) -> bool:
    """Whether a scrape holds every count `_check_metrics` expects (each replica's latest export included)."""
    return (all(values.get(name) for name in TRIMODAL_METRICS) and values["trimodal_requests_total"] >= 6
            and values["trimodal_rejected_requests_total"] >= 1 and values["trimodal_media_cache_hits_total"] >= 2)


def _scrape(port: str) -> dict[str, float]:
    """Sum of every `ray_trimodal_*` sample by metric name (labels dropped) in one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"ray_(trimodal_\w+?)(?:\{.*\})? ([0-9.eE+-]+)$", line)
        if match:
            values[match[1]] = values.get(match[1], 0.0) + float(match[2])
    return values
