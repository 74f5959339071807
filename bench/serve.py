"""Serving benchmark: image questions at concurrency 1, 4 and 8, three ways, one table with ratios.

  (a) serve   the Ray Serve graph over HTTP (streaming, dynamic batching, KV cache), on a private local Ray
  (b) engine  the in-process engine: each wave of `concurrency` requests decoded as one KV-cache batch
  (c) seed    the serving loop of the capstone project this platform grew from (bench/reference_decoding.py):
              full re-forward per token, no KV cache, one request at a time, no streaming.
              Measured once, request by request; at concurrency c its latencies are those service times
              queued in waves of c (what a one-at-a-time server does), and its time to first token is the
              whole latency (nothing is streamed).

Per row: output tokens/s (all completion tokens / wall time), p50/p99 latency, p50/p99 time to first token.
Ratios: each mode's tokens/s over the seed's, and serve over engine.

    python bench/serve.py --preset test --requests 8 --max-tokens 16     # seconds: checks it works
    python bench/serve.py --preset cpu --requests 16 --max-tokens 48      # SmolLM2 + tiny CLIP, minutes
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
    p.add_argument("--concurrency", default="1,4,8", help="comma list")
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


def messages_for(png: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def summarize(mode: str, concurrency: int, samples: list[Sample], wall: float) -> dict:
    lat = np.array([s.latency for s in samples])
    ttft = np.array([s.ttft for s in samples])
    tokens = sum(s.tokens for s in samples)
    return {"mode": mode, "c": concurrency, "n": len(samples), "tokens": tokens, "tok_s": tokens / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "ttft50": float(np.percentile(ttft, 50)), "ttft99": float(np.percentile(ttft, 99))}


# -- (b) the in-process engine ----------------------------------------------------------------------------------

def engine_wave(engine, pngs: list[bytes], params) -> list[Sample]:
    """One wave: prepare every request (images encoded), then decode them together; times from the wave start."""
    start = time.perf_counter()
    prompts = [engine.prepare(messages_for(png)) for png in pngs]
    first: dict[int, float] = {}
    samples: dict[int, Sample] = {}
    for delta in engine.generator.stream(prompts, [params] * len(prompts)):
        now = time.perf_counter() - start
        if delta.text or delta.finish_reason:
            first.setdefault(delta.row, now)
        if delta.finish_reason:
            samples[delta.row] = Sample(now, first[delta.row], delta.completion_tokens)
    return [samples[i] for i in range(len(pngs))]


def bench_engine(engine, pngs: list[bytes], concurrency: int, params) -> tuple[list[Sample], float]:
    start = time.perf_counter()
    samples: list[Sample] = []
    for i in range(0, len(pngs), concurrency):
        samples += engine_wave(engine, pngs[i:i + concurrency], params)
    return samples, time.perf_counter() - start


# -- (c) seed: full re-forward per token, one request at a time -------------------------------------------------

def seed_service_times(engine, pngs: list[bytes], max_tokens: int) -> list[tuple[float, int]]:
    """(seconds, tokens) per request: prepare, then re-run the whole sequence for every new token."""
    from reference_decoding import greedy_without_cache

    out = []
    for png in pngs:
        start = time.perf_counter()
        prompt = engine.prepare(messages_for(png))
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

def start_serve(args: argparse.Namespace) -> str:
    """A private local Ray + Serve with the graph; returns its base URL."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"preset": args.preset, "run": args.run, "threads": args.threads, "device": args.device,
                "serving.max_tokens_limit": max(args.max_tokens, 1024)}
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def http_request(client, url: str, png: bytes, max_tokens: int) -> Sample:
    """One streamed request: latency, time to its first text, completion tokens (from usage)."""
    body = {"messages": messages_for(png), "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and (chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["finish_reason"]):
                ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    return Sample(latency, ttft if ttft is not None else latency, tokens)


async def bench_http(url: str, pngs: list[bytes], concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request when the last one ends."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for png in pngs:
        queue.put_nowait(png)
    samples: list[Sample] = []

    async def worker(client) -> None:
        while not queue.empty():
            samples.append(await http_request(client, url, queue.get_nowait(), max_tokens))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return samples, time.perf_counter() - start


# -- the table --------------------------------------------------------------------------------------------------

def print_table(rows: list[dict], args: argparse.Namespace, note: str) -> None:
    """One table, with throughput ratios against the seed's way and the engine."""
    seed = {r["c"]: r["tok_s"] for r in rows if r["mode"] == "seed"}
    engine = {r["c"]: r["tok_s"] for r in rows if r["mode"] == "engine"}
    print(f"\npreset {args.preset} on {args.device}, run {args.run}, {args.requests} image requests per row, "
          f"max_tokens {args.max_tokens}, greedy, {args.threads} torch threads; {note}")
    head = (f"{'mode':<7}{'conc':>5}{'tokens':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'TTFT p50':>10}"
            f"{'TTFT p99':>10}{'x seed':>8}{'x engine':>9}")
    print(head + "\n" + "-" * len(head))
    for r in sorted(rows, key=lambda r: (r["c"], ["serve", "engine", "seed"].index(r["mode"]))):
        vs_seed = f"{r['tok_s'] / seed[r['c']]:.1f}" if r["c"] in seed else "-"
        vs_engine = f"{r['tok_s'] / engine[r['c']]:.2f}" if r["mode"] == "serve" and r["c"] in engine else ""
        print(f"{r['mode']:<7}{r['c']:>5}{r['tokens']:>8}{r['tok_s']:>9.1f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
              f"{r['ttft50']:>10.3f}{r['ttft99']:>10.3f}{vs_seed:>8}{vs_engine:>9}")


def engine_for(args: argparse.Namespace):
    """The in-process engine for modes (b) and (c), with the same preset, run and threads as the graph."""
    import torch

    from serve_app.settings import resolve_settings
    from trimodal.runs import load_engine

    torch.set_num_threads(args.threads)
    settings = resolve_settings({"preset": args.preset, "run": args.run}, env={})
    return load_engine(settings.cfg, settings.run_dir, args.device, speech=False)


def main(argv: list[str] | None = None) -> int:
    """Per concurrency level: serve, then engine (side by side, same conditions); the seed's way once."""
    from trimodal.inference.requests import SamplingParams

    args = parse_args(argv)
    if args.scenario == "multiturn":
        import multiturn

        return multiturn.run(args, make_images)
    modes, levels = set(args.modes.split(",")), [int(c) for c in args.concurrency.split(",")]
    pngs, rows, started = make_images(args.requests), [], time.perf_counter()
    params = SamplingParams(max_tokens=args.max_tokens)
    engine = engine_for(args) if modes & {"engine", "seed"} else None
    url = start_serve(args) if "serve" in modes else None
    if url:
        asyncio.run(bench_http(url, pngs[:2], 2, args.max_tokens))  # warm-up
    if engine:
        engine_wave(engine, pngs[:2], params)  # warm-up
    for c in levels:
        if url:
            rows.append(summarize("serve", c, *asyncio.run(bench_http(url, pngs, c, args.max_tokens))))
        if "engine" in modes:
            rows.append(summarize("engine", c, *bench_engine(engine, pngs, c, params)))
        print(f"[bench] c={c}: " + ", ".join(f"{r['mode']} {r['tok_s']:.1f} tok/s" for r in rows if r["c"] == c),
              flush=True)
    if "seed" in modes:
        service = seed_service_times(engine, pngs, args.max_tokens)
        rows += [summarize("seed", c, *seed_at(service, c)) for c in levels]
        print(f"[bench] seed: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    print_table(rows, args, f"{time.perf_counter() - started:.0f} s in all")
    if url:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
