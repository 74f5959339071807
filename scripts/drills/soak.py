"""Soak drill: serve a run for a bounded time under mixed traffic and watch memory, file descriptors, latency,
status codes and replica restarts drift, window by window.

Starts the serving graph (a preset and a run or runs directory, engine builtin or vllm, or both in turn) on
127.0.0.1 at a free port, like the other drills, and sends `--concurrency` clients of mixed traffic for `--seconds`:
text, image and spoken questions (tests/data/what_color.wav with a shapes image), three-turn conversations,
streaming (some clients close the stream after two chunks on purpose), requests for every other run by `model`, and
the bad-input sweep's cases for the served preset's model id and limits (bad_input_sweep.cases_for, one every ten
requests, in turn), after a priming pass that sends every one of those cases once (`pre` in the table). Media URLs
go through the sweep's sandbox (hosts from a table, a loopback-only transport), so nothing leaves the machine. Every
client stops by itself at the deadline or after `--max-requests`, whichever comes first.

Each window (`--window-s`, a minute by default) it prints and records: requests, status-code counts, p50/p95 latency
of the valid traffic's answers (bad inputs are in the counts only: their 17 MB bodies and image bombs would be the
p95), p50/p95 time to the first streamed token, and per Serve replica (actor pid from the Ray state API, with the
processes under it: vLLM's engine core) RSS and open file descriptors; the first window is the warm-up, and growth
is measured from its end. Then the checks: no 5xx, no unanswered request, every bad input answered as the sweep
expects, every 200 answer valid under the official `openai` client's schema (ChatCompletion / ChatCompletionChunk),
no replica restarted or replaced, RSS growth <= `--max-rss-growth-pct` and fd growth <= `--max-fd-growth` per
replica (`--rss-bound DEPLOYMENT=PCT`: one deployment's own), and p95 in the last window <= `--max-p95-ratio` x the
second window's. Exit status 1 with one line per failed check; `--out` writes everything as JSON.

    python scripts/drills/soak.py --preset cpu --engine both --out runs/soak.json          # 10 min per engine
    python scripts/drills/soak.py --runs-dir /tmp/runs --engine builtin --seconds 300 --window-s 30
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

import bad_input_sweep
from drillkit import ROOT, actors, local_ray, start_serve

WAV = ROOT / "tests" / "data" / "what_color.wav"
REPLICA_PREFIX = "ServeReplica:main:"
VLLM_TEST_OVERRIDES = {"model.language_model.random_shape.num_heads": 2}
"""The `test` preset's tiny Llama on the vllm engine: vLLM's CPU attention needs a head size of at least 32."""
MIX = ("text", "image", "stream", "conversation", "speech", "other_run", "stream_disconnect", "text", "image", "bad")
"""The kinds of request, in turn across all clients (a conversation is three requests)."""
VALID_KINDS = frozenset(MIX) - {"bad"}
MAX_TOKENS = 16


@dataclass
class Record:
    """One request's outcome."""

    kind: str
    """Its kind in MIX (a conversation's turns are each a `conversation` record)."""
    status: str
    """HTTP status code, or `none` (no answer) or `stream-error` (an error event inside a 200 stream)."""
    end_s: float
    """When it finished, seconds from the start of the traffic."""
    latency_s: float
    ttft_s: float | None = None
    """Seconds to the first streamed content (streams only)."""
    parsed: bool = True
    """A 200 answer validated as ChatCompletion / ChatCompletionChunks (bad inputs: answered as expected)."""
    detail: str = ""
    """What went wrong, when something did."""


@dataclass
class ReplicaSample:
    """One Serve replica's process (and those under it) at one instant."""

    deployment: str
    actor_id: str
    pid: int
    rss_mb: float
    fds: int


@dataclass
class Window:
    """What one window saw."""

    index: int
    end_s: float
    requests: int
    statuses: dict[str, int]
    p50_s: float | None
    p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    unparsed: int
    replicas: list[ReplicaSample]
    restarts: int
    """Replica processes gone or started since the traffic began, cumulative."""
    kinds: dict[str, int] = field(default_factory=dict)
    """Requests by kind in MIX, whatever their status."""
    answered: dict[str, int] = field(default_factory=dict)
    """200 answers by kind in MIX."""


@dataclass
class Bounds:
    """The limits the summary check applies."""

    max_rss_growth_pct: float = 5.0
    """Per replica, RSS at the end over RSS at the end of the warm-up window."""
    max_fd_growth: int = 16
    """Per replica, open file descriptors at the end minus at the end of the warm-up window."""
    max_p95_ratio: float = 1.2
    """p95 latency of the last window over the second window's (the first after warm-up)."""
    rss_growth_pct_of: dict[str, float] = field(default_factory=dict)
    """A deployment's own RSS bound in place of max_rss_growth_pct (by deployment name, e.g. Ingress)."""

    def rss_bound(self, deployment: str) -> float:
        return self.rss_growth_pct_of.get(deployment, self.max_rss_growth_pct)


@dataclass
class Soak:
    """One soak of one engine."""

    engine: str
    settings: dict
    seconds: float
    window_s: float
    concurrency: int
    models: list[str]
    windows: list[Window] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """One line per failed check."""
    bad_cases: int = 0
    """How many of the sweep's cases were sent."""
    prime: Window | None = None
    """The priming pass before the timed traffic: every bad case once (its index is -1)."""


def shapes_png() -> bytes:
    """A 96x96 image: a red square and a blue circle on light grey."""
    img = Image.new("RGB", (96, 96), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 44, 44), fill=(220, 30, 30))
    draw.ellipse((52, 52, 88, 88), fill=(30, 30, 220))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Traffic:
    """What the clients send, handed out in turn: the kind of each request, the runs to ask, the bad cases."""

    def __init__(self, url: str, models: list[str], bad_cases: list):
        self.url, self.models, self.bad_cases = url, models, bad_cases
        self.image = bad_input_sweep.image(shapes_png())
        self.audio = bad_input_sweep.audio(WAV.read_bytes())
        self._kinds = itertools.cycle(MIX)
        self._bad = itertools.cycle(range(len(bad_cases)))
        self._others = itertools.cycle(models[1:] or models)
        self._lock = threading.Lock()
        self.bad_sent: set[int] = set()

    def next_kind(self) -> str:
        with self._lock:
            return next(self._kinds)

    def next_bad(self):
        with self._lock:
            index = next(self._bad)
            self.bad_sent.add(index)
            return self.bad_cases[index]

    def next_other_model(self) -> str:
        with self._lock:
            return next(self._others)

    def messages(self, kind: str) -> list[dict]:
        """The user message of a one-shot request of `kind`."""
        if kind == "image":
            content = [self.image, {"type": "text", "text": "Which shapes are in the picture?"}]
        elif kind == "speech":
            content = [self.image, self.audio]
        elif kind.startswith("stream"):
            content = [self.image, {"type": "text", "text": "Describe the picture."}]
        else:
            content = "What is the capital of France?"
        return [{"role": "user", "content": content}]


def chat_once(client, model: str, messages: list[dict], kind: str, t0: float) -> tuple[Record, str]:
    """One non-streaming chat completion through the openai client; (its record, the answer's text)."""
    import openai
    from openai.types.chat import ChatCompletion

    start = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=MAX_TOKENS)
    except openai.APIStatusError as exc:
        return _record(kind, str(exc.status_code), start, t0, detail=exc.message[:200]), ""
    except openai.APIConnectionError as exc:
        return _record(kind, "none", start, t0, detail=type(exc).__name__), ""
    try:  # validated, not just constructed: the client itself builds its models without validation
        answer = ChatCompletion.model_validate(raw.http_response.json())
        text = answer.choices[0].message.content
        ok = isinstance(text, str) and answer.model == model
    except (ValueError, IndexError) as exc:  # not JSON, or not the schema (pydantic's error is a ValueError)
        return _record(kind, str(raw.http_response.status_code), start, t0, parsed=False, detail=str(exc)[:200]), ""
    return _record(kind, str(raw.http_response.status_code), start, t0, parsed=ok,
                   detail="" if ok else f"model {answer.model!r}, content {text!r}"), text or ""


def stream_once(client, model: str, messages: list[dict], kind: str, t0: float) -> Record:
    """One streamed chat completion, every chunk validated; `stream_disconnect` closes it after two chunks."""
    import openai
    from openai.types.chat import ChatCompletionChunk

    start, ttft, seen = time.monotonic(), None, 0
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, stream=True)
        with contextlib.closing(stream):
            for chunk in stream:
                ChatCompletionChunk.model_validate(chunk.to_dict())
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - start
                seen += 1
                if kind == "stream_disconnect" and seen == 2:
                    break  # the client goes away mid-stream; closing drops the connection
    except openai.APIStatusError as exc:
        return _record(kind, str(exc.status_code), start, t0, detail=exc.message[:200])
    except openai.APIConnectionError as exc:
        return _record(kind, "none", start, t0, detail=type(exc).__name__)
    except openai.APIError as exc:  # an error event inside the 200 stream
        return _record(kind, "stream-error", start, t0, detail=str(exc)[:200])
    except ValueError as exc:  # a chunk off the schema (pydantic's ValidationError is a ValueError)
        return _record(kind, "200", start, t0, parsed=False, detail=str(exc)[:200])
    return _record(kind, "200", start, t0, ttft=ttft, parsed=seen > 0, detail="" if seen else "no chunks")


def conversation(client, model: str, t0: float) -> list[Record]:
    """Three turns, each carrying the answers so far."""
    messages, records = [], []
    for question in ("Hello, who are you?", "What can you do?", "Say that again, shorter."):
        messages.append({"role": "user", "content": question})
        record, answer = chat_once(client, model, messages, "conversation", t0)
        records.append(record)
        if record.status != "200":
            break
        messages.append({"role": "assistant", "content": answer})
    return records


def bad_once(http: httpx.Client, traffic: Traffic, t0: float) -> Record:
    """One of the sweep's cases, sent the sweep's way; `parsed` says it was answered as the sweep expects."""
    case = traffic.next_bad()
    start = time.monotonic()
    outcome = bad_input_sweep.send(http, traffic.url, case)
    status = "none" if outcome.status is None else str(outcome.status)
    expected = outcome.status in case.expect
    return _record("bad", status, start, t0, parsed=expected,
                   detail="" if expected else f"{case.name}: expected {case.expect}")


def _record(kind: str, status: str, start: float, t0: float, ttft: float | None = None, parsed: bool = True,
            detail: str = "") -> Record:
    now = time.monotonic()
    return Record(kind, status, now - t0, now - start, ttft, parsed, detail)


def one_turn(client, http: httpx.Client, traffic: Traffic, t0: float) -> list[Record]:
    """The next request (or conversation) in MIX."""
    kind, base = traffic.next_kind(), traffic.models[0]
    if kind == "bad":
        return [bad_once(http, traffic, t0)]
    if kind == "conversation":
        return conversation(client, base, t0)
    if kind.startswith("stream"):
        return [stream_once(client, base, traffic.messages(kind), kind, t0)]
    model = traffic.next_other_model() if kind == "other_run" else base
    return [chat_once(client, model, traffic.messages("image" if kind == "other_run" else kind), kind, t0)[0]]


def client_loop(traffic: Traffic, records: list[Record], lock: threading.Lock, t0: float, deadline: float,
                max_requests: int) -> None:
    """Send requests back to back until the deadline or `max_requests` requests, whichever comes first."""
    from openai import OpenAI

    client = OpenAI(base_url=traffic.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with httpx.Client(timeout=120) as http, contextlib.closing(client):
        sent = 0
        while sent < max_requests and time.monotonic() < deadline:
            done = one_turn(client, http, traffic, t0)
            sent += len(done)
            with lock:
                records.extend(done)


def sample_replicas() -> list[ReplicaSample]:
    """RSS and open fds of every live Serve replica of app `main`, each with the processes it started."""
    import psutil

    samples = []
    for actor in actors(REPLICA_PREFIX):
        rss, fds = 0, 0
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(actor.pid)
            for proc in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):  # a child may end between listing and reading
                    rss, fds = rss + proc.memory_info().rss, fds + proc.num_fds()
        samples.append(ReplicaSample(actor.class_name.removeprefix(REPLICA_PREFIX), actor.actor_id, actor.pid,
                                     round(rss / 2**20, 1), fds))
    return sorted(samples, key=lambda s: s.deployment)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(index: int, records: list[Record], replicas: list[ReplicaSample], restarts: int,
              end_s: float) -> Window:
    """A window's figures from the requests that finished in it."""
    latencies = [r.latency_s for r in records if r.kind in VALID_KINDS and r.status == "200"
                 and r.kind != "stream_disconnect"]
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    return Window(index, round(end_s, 1), len(records), dict(Counter(r.status for r in records)),
                  _round(percentile(latencies, 0.5)), _round(percentile(latencies, 0.95)),
                  _round(percentile(ttfts, 0.5)), _round(percentile(ttfts, 0.95)),
                  sum(not r.parsed for r in records), replicas, restarts, dict(Counter(r.kind for r in records)),
                  dict(Counter(r.kind for r in records if r.status == "200")))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RestartWatch:
    """Replica processes (actor id, pid) seen since the start: those gone, and those started after it."""

    def __init__(self, first: list[ReplicaSample]):
        self.initial = {(s.actor_id, s.pid) for s in first}
        self.seen = set(self.initial)

    def update(self, now: list[ReplicaSample]) -> int:
        """Processes gone plus processes new since the start (a Serve replacement counts once each way: 2)."""
        alive = {(s.actor_id, s.pid) for s in now}
        self.seen |= alive
        return len(self.seen - alive) + len(self.seen - self.initial)


def print_header() -> None:
    print(f"{'win':>3} {'end s':>6} {'reqs':>5} {'p50 s':>6} {'p95 s':>6} {'ttft50':>6} {'ttft95':>6} {'bad':>3} "
          f"{'rst':>3}  statuses | per replica: RSS MB / fds", flush=True)


def print_window(w: Window) -> None:
    def fmt(v: float | None) -> str:
        return f"{v:6.2f}" if v is not None else "     -"

    statuses = " ".join(f"{k}:{n}" for k, n in sorted(w.statuses.items()))
    replicas = " ".join(f"{s.deployment}={s.rss_mb:.0f}/{s.fds}" for s in w.replicas)
    label = "pre" if w.index < 0 else str(w.index)
    print(f"{label:>3} {w.end_s:6.0f} {w.requests:5d} {fmt(w.p50_s)} {fmt(w.p95_s)} {fmt(w.ttft_p50_s)} "
          f"{fmt(w.ttft_p95_s)} {w.unparsed:3d} {w.restarts:3d}  {statuses} | {replicas}", flush=True)


def list_models(url: str) -> list[str]:
    """The ids /v1/models lists, the default first."""
    response = httpx.get(url + "/v1/models", timeout=60)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def prime(traffic: Traffic, concurrency: int, watch: "RestartWatch") -> tuple[Window, list[Record]]:
    """Every bad case once, `concurrency` at a time, before the timed traffic: the largest buffers the server
    ever allocates (17 MB bodies, image and audio bombs) are reached before RSS is measured, so growth after the
    warm-up is what repeats, not a first-time high-water mark."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(lambda _: bad_once(http, traffic, t0), traffic.bad_cases))
    end_s = time.monotonic() - t0
    replicas = sample_replicas()
    return summarize(-1, records, replicas, watch.update(replicas), end_s), records


def run_traffic(url: str, soak: Soak, bad_cases: list, max_requests: int) -> list[Record]:
    """Prime the server with every bad case, then send the mixed traffic for soak.seconds, recording a Window at
    the end of every window; every record."""
    traffic, lock = Traffic(url, soak.models, bad_cases), threading.Lock()
    watch = RestartWatch(sample_replicas())
    print_header()
    soak.prime, records = prime(traffic, soak.concurrency, watch)
    print_window(soak.prime)
    t0 = time.monotonic()
    deadline = t0 + soak.seconds
    threads = [threading.Thread(target=client_loop, args=(traffic, records, lock, t0, deadline, max_requests),
                                daemon=True) for _ in range(soak.concurrency)]
    for thread in threads:
        thread.start()
    taken = len(records)
    for index in range(math.ceil(soak.seconds / soak.window_s)):
        end_s = min(soak.seconds, (index + 1) * soak.window_s)
        time.sleep(max(0.0, t0 + end_s - time.monotonic()))
        if index == math.ceil(soak.seconds / soak.window_s) - 1:
            for thread in threads:  # the last window holds every request, those in flight at the deadline too
                thread.join(timeout=150)
        with lock:
            window_records, taken = records[taken:], len(records)
        replicas = sample_replicas()
        soak.windows.append(summarize(index, window_records, replicas, watch.update(replicas), end_s))
        print_window(soak.windows[-1])
    soak.bad_cases = len(traffic.bad_sent)
    return records


def check(soak: Soak, records: list[Record], bounds: Bounds) -> list[str]:
    """One line per failed check (empty: all passed)."""
    statuses = Counter(r.status for r in records)
    failures = []
    server_errors = {s: n for s, n in statuses.items() if s.startswith("5")}
    if server_errors:
        failures.append(f"5xx answers: {server_errors} ({_first_detail(records, lambda r: r.status[0] == '5')})")
    lost = statuses["none"] + statuses["stream-error"]
    if lost:
        failures.append(f"{lost} requests without a proper answer ({_first_detail(records, _lost)})")
    unparsed = [r for r in records if r.kind != "bad" and r.status == "200" and not r.parsed]
    if unparsed:
        failures.append(f"{len(unparsed)} 200 answers did not validate ({unparsed[0].detail})")
    wrong = [r for r in records if r.kind == "bad" and not r.parsed]
    if wrong:
        failures.append(f"{len(wrong)} bad inputs answered otherwise than expected ({wrong[0].detail})")
    silent = sorted(VALID_KINDS - {r.kind for r in records if r.status == "200"})
    if silent:
        failures.append(f"no 200 answer for: {', '.join(silent)}")
    if soak.windows and soak.windows[-1].restarts:
        failures.append(f"{soak.windows[-1].restarts} replica processes gone or started during the soak")
    return failures + growth_failures(soak.windows, bounds) + latency_failures(soak.windows, bounds)


def _lost(record: Record) -> bool:
    return record.status in ("none", "stream-error")


def _first_detail(records: list[Record], which) -> str:
    return next((f"first: {r.kind}: {r.detail}" for r in records if which(r)), "")


def growth_failures(windows: list[Window], bounds: Bounds) -> list[str]:
    """RSS and fd growth per replica from the end of the warm-up window to the end of the last."""
    if len(windows) < 2:
        return ["fewer than two windows: no growth measured (make --seconds at least twice --window-s)"]
    first = {s.actor_id: s for s in windows[0].replicas}
    failures = []
    for last in windows[-1].replicas:
        start = first.get(last.actor_id)
        if start is None:
            continue  # a replacement: counted as a restart
        growth_pct = 100.0 * (last.rss_mb - start.rss_mb) / start.rss_mb
        if growth_pct > bounds.rss_bound(last.deployment):
            failures.append(f"{last.deployment} RSS grew {growth_pct:.1f}% after warm-up ({start.rss_mb:.0f} -> "
                            f"{last.rss_mb:.0f} MB; bound {bounds.rss_bound(last.deployment):g}%)")
        if last.fds - start.fds > bounds.max_fd_growth:
            failures.append(f"{last.deployment} open fds grew by {last.fds - start.fds} after warm-up "
                            f"({start.fds} -> {last.fds}; bound {bounds.max_fd_growth})")
    return failures


def latency_failures(windows: list[Window], bounds: Bounds) -> list[str]:
    """p95 of the last window against the second window's (the first after warm-up)."""
    if len(windows) < 3 or windows[1].p95_s is None or windows[-1].p95_s is None:
        return ["p95 drift not measured: fewer than three windows with answers"]
    if windows[-1].p95_s > bounds.max_p95_ratio * windows[1].p95_s:
        return [f"p95 latency in the last window {windows[-1].p95_s:.2f} s > {bounds.max_p95_ratio:g} x the second "
                f"window's {windows[1].p95_s:.2f} s"]
    return []


def server_args(preset: str, run: str | None, runs_dir: str | None, engine: str, overrides: dict,
                media_record: Path) -> dict:
    """The serving graph's arguments: the preset, run and engine, the sweep's media sandbox, one torch thread."""
    args = {"preset": preset, "threads": 1, "serving.engine": engine, **overrides,
            **bad_input_sweep.sandbox_args(media_record)}
    if engine == "vllm" and preset == "test":
        args = {**VLLM_TEST_OVERRIDES, **args}
    if run is not None:
        args["run"] = run
    if runs_dir is not None:
        args["runs_dir"] = runs_dir
    return args


def soak_engine(args: dict, seconds: float, window_s: float, concurrency: int, bounds: Bounds, bad_cases: list,
                max_requests: int = 100_000) -> Soak:
    """Serve `args` (Ray initialised in this process, with its dashboard), soak it, check it, shut Serve down."""
    from ray import serve

    url = start_serve(args, env={"TRIMODAL_ALLOWED_MEDIA_DOMAINS": bad_input_sweep.allowed_domains()})
    try:
        models = list_models(url)
        soak = Soak(args["serving.engine"], {k: v for k, v in args.items() if k != "media_sandbox"}, seconds,
                    window_s, concurrency, models)
        print(f"\nsoak: engine {soak.engine}, {url}, models {models}, {concurrency} clients, {seconds:g} s, "
              f"windows of {window_s:g} s (the first is the warm-up)", flush=True)
        records = run_traffic(url, soak, bad_cases, max_requests)
    finally:
        serve.shutdown()
    soak.failures = check(soak, records, bounds)
    kinds = Counter(r.kind for r in records)
    print(f"requests by kind: {dict(sorted(kinds.items()))}; bad-input cases sent: {soak.bad_cases}/{len(bad_cases)}")
    print("\n".join(f"FAILED: {line}" for line in soak.failures) or "all checks passed", flush=True)
    return soak


def parse_overrides(pairs: list[str], option: str = "--set") -> dict[str, str]:
    """`key=value` pairs as a dict of strings (config overrides: the config converts the values)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"soak: {option} {pair!r} is not key=value")
        overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="test")
    parser.add_argument("--run", help="the run to serve by default (path or name; `none`: the base model; "
                                      "default: the newest finished run of the preset)")
    parser.add_argument("--runs-dir", help="where the runs asked for by `model` live (default: runs)")
    parser.add_argument("--engine", choices=("builtin", "vllm", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=600.0, help="traffic per engine")
    parser.add_argument("--window-s", type=float, default=60.0, help="one table row; the first is the warm-up")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client: its loop's other bound")
    parser.add_argument("--max-rss-growth-pct", type=float, default=Bounds.max_rss_growth_pct)
    parser.add_argument("--rss-bound", action="append", default=[], metavar="DEPLOYMENT=PCT",
                        help="one deployment's own RSS growth bound, e.g. Ingress=50")
    parser.add_argument("--max-fd-growth", type=int, default=Bounds.max_fd_growth)
    parser.add_argument("--max-p95-ratio", type=float, default=Bounds.max_p95_ratio)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--num-cpus", type=int, default=8, help="the private Ray's logical CPUs")
    parser.add_argument("--out", type=Path, help="write every window and check as JSON here")
    args = parser.parse_args()
    bounds = Bounds(args.max_rss_growth_pct, args.max_fd_growth, args.max_p95_ratio,
                    {name: float(pct) for name, pct in parse_overrides(args.rss_bound, "--rss-bound").items()})
    engines = ("builtin", "vllm") if args.engine == "both" else (args.engine,)
    bad_cases = bad_input_sweep.cases_for(args.preset, parse_overrides(args.set))
    soaks = []
    with local_ray(num_cpus=args.num_cpus), tempfile.TemporaryDirectory(prefix="soak-media-") as tmp:
        for engine in engines:
            serve = server_args(args.preset, args.run, args.runs_dir, engine, parse_overrides(args.set),
                                Path(tmp) / f"fetch-attempts-{engine}.jsonl")
            soaks.append(soak_engine(serve, args.seconds, args.window_s, args.concurrency, bounds, bad_cases,
                                     args.max_requests))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(s) for s in soaks], indent=1))
    failed = [f"{s.engine}: {line}" for s in soaks for line in s.failures]
    if failed:
        print("\n".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
