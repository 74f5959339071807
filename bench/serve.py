"""Serving benchmark: image questions at concurrency 1, 4, 8 and 16, three ways, one table with ratios.

  (a) serve   the Ray Serve graph over HTTP (streaming), on a private local Ray, once per LM engine (--engine):
              builtin (dynamic batching over our KV-cache decoder) and vllm (continuous batching, paged KV cache;
              make install-vllm). Requests arrive as a Poisson process; at most `concurrency` are in flight.
  (b) engine  the in-process engine: each wave of `concurrency` requests decoded as one KV-cache batch
  (c) seed    the serving loop of the capstone project this platform grew from (bench/reference_decoding.py):
              full re-forward per token, no KV cache, one request at a time, no streaming.
              Measured once, request by request; at concurrency c its latencies are those service times
              queued in waves of c (what a one-at-a-time server does), and its time to first token is the
              whole latency (nothing is streamed).

Arrival rate at concurrency c: load x c / (mean latency of one request alone on the first engine; --load, default
2), the same for every engine: each level offers more than c streams at single-request speed could take, so the
concurrency cap binds and the rows compare capacity, with Poisson bursts. Latency and TTFT count from sending.

Per row: output tokens/s (all completion tokens / wall time), p50/p95 latency, p50/p95 time to first token.
Ratios: tokens/s over the seed's; tokens/s and TTFT p50 over the builtin engine's Serve row at the same level.
Then a second turn on the same image (the first answer and a follow-up sent back with the image, as an OpenAI
client does): its time to first token against the first turn's, per engine. What makes it faster: the Vision
replica's media cache (the image is not encoded again) and, with vllm, its prefix cache where it applies.

    python bench/serve.py --preset test --requests 8 --max-tokens 16     # seconds: checks it works
    python bench/serve.py --preset cpu --requests 16 --max-tokens 48      # SmolLM2 + tiny CLIP, minutes
    python bench/serve.py --preset cpu --engine builtin,vllm --modes serve,seed   # both engines, one table
    python bench/serve.py --preset test --engine builtin,vllm --modes serve,seed --requests 8 --max-tokens 16 \
        --set model.language_model.random_shape.num_heads=2                       # seconds: checks it works
    python bench/serve.py --scenario multiturn --preset cpu                # 3-turn chats, media cache on vs off
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root
COLORS = [(220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 40), (140, 60, 170), (240, 140, 30)]
QUESTION = "What color is the shape?"


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="preset name or YAML path (default cpu)")
    p.add_argument("--run", default="none", help="a finished run's final/ (default none: untrained projector)")
    p.add_argument("--requests", type=int, default=16, help="requests per mode and concurrency")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--question", default=QUESTION,
                   help="the question asked with every image (a long-answer one makes the rows decode-bound)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma list")
    p.add_argument("--engine", default="builtin", help="LM engines of the Serve graph: builtin, vllm or both (comma)")
    p.add_argument("--load", type=float, default=2.0,
                   help="arrival rate at concurrency c: load x c / (one request's latency alone, first engine)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every mode (repeatable), e.g. serving.vllm.dtype=float32")
    p.add_argument("--second-turns", type=int, default=4, help="conversations for the second-turn measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the LM")
    p.add_argument("--device", default="cpu", help="cpu or cuda (Serve then asks for GPU fractions)")
    p.add_argument("--modes", default="serve,engine,seed", help="subset of serve,engine,seed")
    p.add_argument("--scenario", default="concurrency", choices=("concurrency", "multiturn"),
                   help="multiturn: 3-turn chats resending an image and a spoken question, media cache on vs off "
                        "(bench/multiturn.py)")
    p.add_argument("--conversations", type=int, default=6, help="multiturn: timed conversations per setting")
    return p.parse_args(argv)


def make_images(n: int) -> list[bytes]:
    """n small PNGs: one coloured circle, square or triangle each (shapes-set style)."""
    out = []
    for i in range(n):
        img = Image.new("RGB", (224, 224), (245, 245, 240))
        draw, color = ImageDraw.Draw(img), COLORS[i % len(COLORS)]
        left, top, right, bottom = 62 + i % 5, 62, 162, 162 - i % 7
        if i % 3 == 0:
            draw.ellipse((left, top, right, bottom), fill=color)
        elif i % 3 == 1:
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) // 2, top)], fill=color)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def messages_for(png: bytes, question: str = QUESTION) -> list[dict]:
    """One user turn: the image, then the question."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def summarize(mode: str, concurrency: int, samples: list[Sample], wall: float, rate: float | None = None) -> dict:
    lat = np.array([s.latency for s in samples])
    ttft = np.array([s.ttft for s in samples])
    tokens = sum(s.tokens for s in samples)
    return {"mode": mode, "c": concurrency, "rate": rate, "n": len(samples), "tokens": tokens, "tok_s": tokens / wall,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "ttft50": float(np.percentile(ttft, 50)), "ttft95": float(np.percentile(ttft, 95))}


# -- (b) the in-process engine ----------------------------------------------------------------------------------

def engine_wave(engine, chats: list[list[dict]], params) -> list[Sample]:
    """One wave: prepare every request (images encoded), then decode them together; times from the wave start."""
    start = time.perf_counter()
    prompts = [engine.prepare(chat) for chat in chats]
    first: dict[int, float] = {}
    samples: dict[int, Sample] = {}
    for delta in engine.generator.stream(prompts, [params] * len(prompts)):
        now = time.perf_counter() - start
        if delta.text or delta.finish_reason:
            first.setdefault(delta.row, now)
        if delta.finish_reason:
            samples[delta.row] = Sample(now, first[delta.row], delta.completion_tokens)
    return [samples[i] for i in range(len(chats))]


def bench_engine(engine, chats: list[list[dict]], concurrency: int, params) -> tuple[list[Sample], float]:
    start = time.perf_counter()
    samples: list[Sample] = []
    for i in range(0, len(chats), concurrency):
        samples += engine_wave(engine, chats[i:i + concurrency], params)
    return samples, time.perf_counter() - start


# -- (c) seed: full re-forward per token, one request at a time -------------------------------------------------

def seed_service_times(engine, chats: list[list[dict]], max_tokens: int) -> list[tuple[float, int]]:
    """(seconds, tokens) per request: prepare, then re-run the whole sequence for every new token."""
    from reference_decoding import greedy_without_cache

    out = []
    for chat in chats:
        start = time.perf_counter()
        prompt = engine.prepare(chat)
        tokens = greedy_without_cache(engine.generator.lm, engine.generator.embed(prompt), max_tokens,
                                      engine.generator.eos_ids)
        out.append((time.perf_counter() - start, len(tokens)))
    return out


def seed_at(service: list[tuple[float, int]], concurrency: int) -> tuple[list[Sample], float]:
    """Queue the measured service times in waves of `concurrency` on one worker."""
    samples = []
    for i in range(0, len(service), concurrency):
        clock = 0.0
        for seconds, tokens in service[i:i + concurrency]:
            clock += seconds
            samples.append(Sample(clock, clock, tokens))
    return samples, sum(s for s, _ in service)


# -- (a) the Serve graph over HTTP ------------------------------------------------------------------------------

def start_ray() -> None:
    """A private local Ray; it and everything it starts (replicas, vLLM) send no usage statistics."""
    import ray

    from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

    os.environ.update(NO_TELEMETRY_ENV)  # Ray's processes inherit the driver's environment
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def start_serve(args: argparse.Namespace, engine: str) -> str:
    """The graph with this LM engine on the private local Ray (Serve restarted); returns its base URL."""
    from ray import serve

    from serve_app.app import build_app

    serve.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"preset": args.preset, "run": args.run, "threads": args.threads, "device": args.device,
                "serving.max_tokens_limit": max(args.max_tokens, 1024), "serving.engine": engine,
                **overrides(args)}
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def http_request(client, url: str, messages: list[dict], max_tokens: int) -> tuple[Sample, str]:
    """One streamed request: (latency, time to its first text, completion tokens from usage), and its text."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                continue
            text.append(chunk["choices"][0]["delta"].get("content") or "")
            if ttft is None and (text[-1] or chunk["choices"][0]["finish_reason"]):
                ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    return Sample(latency, ttft if ttft is not None else latency, tokens), "".join(text)


async def bench_http(url: str, chats: list[list[dict]], concurrency: int, max_tokens: int,
                     rate: float | None = None, seed: int = 0) -> tuple[list[Sample], float]:
    """Requests arrive as a Poisson process of `rate` per second (None: all at once); at most `concurrency` are in
    flight, later arrivals wait for a free slot."""
    import httpx

    gaps = np.random.default_rng(seed).exponential(1 / rate, len(chats)) if rate else np.zeros(len(chats))
    arrivals, slots = np.cumsum(gaps) - gaps[0], asyncio.Semaphore(concurrency)

    async def one(client, chat: list[dict], at: float) -> Sample:
        await asyncio.sleep(at)
        async with slots:
            return (await http_request(client, url, chat, max_tokens))[0]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        samples = await asyncio.gather(*(one(client, chat, float(at)) for chat, at in zip(chats, arrivals, strict=True)))
        return list(samples), time.perf_counter() - start


async def second_turns(url: str, pngs: list[bytes], question: str, max_tokens: int) -> list[tuple[float, float]]:
    """(first turn TTFT, second turn TTFT) per image, one conversation at a time: the second turn resends the image,
    the first answer and a follow-up question."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for png in pngs:
            first, answer = await http_request(client, url, messages_for(png, question), max_tokens)
            follow_up = messages_for(png, question) + [{"role": "assistant", "content": answer},
                                             {"role": "user", "content": "What shape is it?"}]
            second, _ = await http_request(client, url, follow_up, max_tokens)
            out.append((first.ttft, second.ttft))
    return out


def bench_serve(args: argparse.Namespace, engine: str, n_images: int, levels: list[int],
                unit: list[float]) -> tuple[list[dict], dict]:
    """Every concurrency level on the graph with this engine, then the second-turn measurement on new images.
    `unit`: [arrival rate per unit of concurrency], set by the first engine's warm-up and kept for the others."""
    url = start_serve(args, engine)
    chats = [messages_for(png, args.question) for png in make_images(n_images)]
    warm, _ = asyncio.run(bench_http(url, chats[:4], 1, args.max_tokens))  # warm-up, one at a time
    if not unit:
        unit.append(args.load / float(np.mean([s.latency for s in warm[1:]])))
    rows = []
    for c in levels:
        samples, wall = asyncio.run(bench_http(url, chats, c, args.max_tokens, c * unit[0], seed=c))
        rows.append(summarize(f"serve:{engine}", c, samples, wall, rate=c * unit[0]))
        print(f"[bench] {engine} c={c}: {rows[-1]['tok_s']:.1f} tok/s, TTFT p50 {rows[-1]['ttft50']:.3f} s",
              flush=True)
    fresh = make_images(n_images + args.second_turns)[n_images:]  # never sent before: turn 1 encodes them
    turns = asyncio.run(second_turns(url, fresh, args.question, args.max_tokens))
    return rows, {"engine": engine, "first": float(np.median([t[0] for t in turns])),
                  "second": float(np.median([t[1] for t in turns])), "n": len(turns)}


# -- the table --------------------------------------------------------------------------------------------------

def print_table(rows: list[dict], turns: list[dict], args: argparse.Namespace, note: str) -> None:
    """One table, with ratios against the seed's way and the builtin engine's Serve row; then the second turns."""
    seed = {r["c"]: r["tok_s"] for r in rows if r["mode"] == "seed"}
    builtin = {r["c"]: r for r in rows if r["mode"] == "serve:builtin"}
    order = sorted({r["mode"] for r in rows}, key=lambda m: (m == "seed", m == "engine", m))
    print(f"\npreset {args.preset} on {args.device}, run {args.run}, {args.requests} image requests per row "
          f"asking {args.question!r}, "
          f"max_tokens {args.max_tokens}, greedy, {args.threads} torch threads; {note}")
    head = (f"{'mode':<14}{'conc':>5}{'req/s':>7}{'tokens':>8}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'TTFT p50':>10}"
            f"{'TTFT p95':>10}{'x seed':>8}{'x builtin':>10}{'TTFT x builtin':>15}")
    print(head + "\n" + "-" * len(head))
    for r in sorted(rows, key=lambda r: (r["c"], order.index(r["mode"]))):
        vs_seed = f"{r['tok_s'] / seed[r['c']]:.1f}" if r["c"] in seed else "-"
        base = builtin.get(r["c"]) if r["mode"].startswith("serve:") else None
        vs_tok = f"{r['tok_s'] / base['tok_s']:.2f}" if base else ""
        vs_ttft = f"{r['ttft50'] / base['ttft50']:.2f}" if base else ""
        rate = f"{r['rate']:.2f}" if r.get("rate") else "-"
        print(f"{r['mode']:<14}{r['c']:>5}{rate:>7}{r['tokens']:>8}{r['tok_s']:>9.1f}{r['p50']:>8.2f}{r['p95']:>8.2f}"
              f"{r['ttft50']:>10.3f}{r['ttft95']:>10.3f}{vs_seed:>8}{vs_tok:>10}{vs_ttft:>15}")
    if turns:
        print(f"\nsecond turn on the same image (TTFT p50 over {turns[0]['n']} conversations, one at a time)")
        print(f"{'engine':<10}{'turn 1 s':>10}{'turn 2 s':>10}{'x turn 1':>10}")
        for t in turns:
            print(f"{t['engine']:<10}{t['first']:>10.3f}{t['second']:>10.3f}{t['second'] / t['first']:>10.2f}")


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """--set KEY=VALUE options as settings arguments."""
    pairs = [item.split("=", 1) for item in args.set]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--set takes KEY=VALUE, got {args.set}")
    return dict(pairs)


def engine_for(args: argparse.Namespace):
    """The in-process engine for modes (b) and (c), with the same preset, run and threads as the graph."""
    import torch

    from serve_app.settings import resolve_settings
    from trimodal.runs import load_engine

    torch.set_num_threads(args.threads)
    settings = resolve_settings({"preset": args.preset, "run": args.run, **overrides(args)}, env={})
    return load_engine(settings.cfg, settings.run_dir, args.device, speech=False)


def main(argv: list[str] | None = None) -> int:
    """Per engine: the Serve graph at every level, then its second turns; the in-process engine and the seed's way
    on the same requests."""
    from trimodal.inference.requests import SamplingParams

    args = parse_args(argv)
    if args.scenario == "multiturn":
        import multiturn

        return multiturn.run(args, make_images)
    modes, levels = set(args.modes.split(",")), [int(c) for c in args.concurrency.split(",")]
    chats = [messages_for(png, args.question) for png in make_images(args.requests)]
    rows, turns, unit, started = [], [], [], time.perf_counter()
    params = SamplingParams(max_tokens=args.max_tokens)
    if "serve" in modes:
        start_ray()
        for engine in args.engine.split(","):
            engine_rows, engine_turns = bench_serve(args, engine, args.requests, levels, unit)
            rows, turns = rows + engine_rows, turns + [engine_turns]
        stop_ray()
    engine = engine_for(args) if modes & {"engine", "seed"} else None
    if "engine" in modes:
        engine_wave(engine, chats[:2], params)  # warm-up
        rows += [summarize("engine", c, *bench_engine(engine, chats, c, params)) for c in levels]
    if "seed" in modes:
        service = seed_service_times(engine, chats, args.max_tokens)
        rows += [summarize("seed", c, *seed_at(service, c)) for c in levels]
        print(f"[bench] seed: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    print_table(rows, turns, args, f"{time.perf_counter() - started:.0f} s in all")
    return 0


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
