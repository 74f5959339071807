"""Multi-turn benchmark: a 3-turn chat that resends its image and spoken question every turn, media cache on and off.

The OpenAI API is stateless, so turn k sends the whole conversation again: the first user message (an image and a
recorded question), the answers so far and the new question. With the media cache (serving.media_cache_mb > 0)
the Speech and Vision replicas answer turns 2 and 3 from their caches and skip Whisper and CLIP; with it off they
encode everything again. Both graphs are served in turn on one private local Ray over real HTTP; each
conversation uses a new image and a new take of the clip, so its first turn always encodes both.

Per (cache, turn): time to first token (the server's, from arrival to the first generated token) p50 / mean over
the conversations, and the ratio against turn 1 of the same
setting. Goal: turns 2-3 at <= 0.5x turn 1's TTFT with the cache on.

    python bench/serve.py --scenario multiturn --preset test --conversations 2     # seconds: checks it works
    python bench/serve.py --scenario multiturn --preset cpu --conversations 6      # SmolLM2 + Whisper base, minutes
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPOKEN = ROOT / "tests" / "data" / "what_color.wav"
"""The recorded first question (espeak-ng: "What color is the shape?")."""
FOLLOW_UPS = ("What shape is it?", "How many shapes are there?")
"""Turns 2 and 3, typed."""


def spoken_variant(wav: bytes, index: int) -> bytes:
    """The recorded question with `index` x 10 ms of silence appended: the same words, other samples, so each
    conversation's first turn transcribes afresh (the cache keys clips by their samples)."""
    import io

    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    padded = np.concatenate([samples, np.zeros((rate // 100 * index,) + samples.shape[1:], np.float32)])
    out = io.BytesIO()
    sf.write(out, padded, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def first_message(png: bytes, wav: bytes) -> dict:
    """The opening user message: an image and a spoken question."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    return {"role": "user", "content": [image, audio]}


async def streamed_turn(client, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """(time to first token, answer) of one streamed request. The time is the server's (`timings.first_token_s`
    on the final chunk: from the request's arrival to its first generated token), since an untrained model's
    first tokens may carry no visible text; the client's time to the first text is the fallback."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    start, first_text, server, text = time.perf_counter(), None, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            if first_text is None and (choice["delta"].get("content") or choice["finish_reason"]):
                first_text = time.perf_counter() - start
            server = (chunk.get("timings") or {}).get("first_token_s", server)
            text.append(choice["delta"].get("content") or "")
    fallback = first_text if first_text is not None else time.perf_counter() - start
    return (server if server is not None else fallback), "".join(text)


async def conversation(url: str, png: bytes, wav: bytes, max_tokens: int) -> list[float]:
    """One 3-turn chat; the time to first token of each turn."""
    import httpx

    messages, ttfts = [first_message(png, wav)], []
    async with httpx.AsyncClient(timeout=600) as client:
        for follow_up in (None, *FOLLOW_UPS):
            if follow_up:
                messages.append({"role": "user", "content": follow_up})
            ttft, answer = await streamed_turn(client, url, messages, max_tokens)
            ttfts.append(ttft)
            messages.append({"role": "assistant", "content": answer or "(no answer)"})  # an untrained LM may say nothing
    return ttfts


def start_serve() -> str:
    """A private local Ray and Serve on a free loopback port (no usage statistics from anything Ray starts); its
    base URL."""
    import ray
    from ray import serve

    from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

    os.environ.update(NO_TELEMETRY_ENV)  # Ray's processes inherit the driver's environment
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def measure(base: str, app_args: dict, cache_mb: float, pngs: list[bytes], wav: bytes, max_tokens: int) -> list:
    """Serve the graph with `cache_mb` of media cache, run one warm-up and then every conversation; TTFTs per
    conversation ([turn 1, turn 2, turn 3]). The application is deleted afterwards."""
    from ray import serve

    from serve_app.app import build_app

    name = f"cache{int(cache_mb)}"
    serve.run(build_app({**app_args, "serving.media_cache_mb": cache_mb}), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}"
    warm_up = len(pngs) - 1  # on an image and a clip the timed chats do not use
    asyncio.run(conversation(url, pngs[warm_up], spoken_variant(wav, warm_up), max_tokens))
    runs = []
    for i, png in enumerate(pngs[:-1]):
        runs.append(asyncio.run(conversation(url, png, spoken_variant(wav, i), max_tokens)))
        print(f"[bench] cache {cache_mb:g} MB, chat {i + 1}: TTFT " + ", ".join(f"{t:.3f}" for t in runs[-1]) + " s",
              flush=True)
    serve.delete(name)
    return runs


def table(results: dict[float, list], note: str) -> None:
    """Per setting and turn: TTFT p50 and mean, and p50 over turn 1's p50 of the same setting."""
    head = f"{'media cache':<13}{'turn':>5}{'TTFT p50 s':>12}{'TTFT mean s':>13}{'x turn 1':>10}"
    print(f"\n{note}\n{head}\n" + "-" * len(head))
    for cache_mb, runs in results.items():
        ttfts = np.array(runs)  # [conversations, 3]
        first = float(np.median(ttfts[:, 0]))
        label = f"{cache_mb:g} MB" if cache_mb else "off"
        for turn in range(ttfts.shape[1]):
            p50 = float(np.median(ttfts[:, turn]))
            print(f"{label:<13}{turn + 1:>5}{p50:>12.3f}{ttfts[:, turn].mean():>13.3f}{p50 / first:>10.2f}")


def run(args: argparse.Namespace, make_images) -> int:
    """The scenario, called by bench/serve.py --scenario multiturn (which owns the options and the images)."""
    import ray
    from ray import serve

    from trimodal.config import ServingConfig

    pngs, wav = make_images(args.conversations + 1), SPOKEN.read_bytes()
    app_args = {"preset": args.preset, "run": args.run, "threads": args.threads, "device": args.device}
    started, base = time.perf_counter(), start_serve()
    try:
        results = {size: measure(base, app_args, size, pngs, wav, args.max_tokens)
                   for size in (ServingConfig.media_cache_mb, 0.0)}
    finally:
        serve.shutdown()
        ray.shutdown()
    table(results, f"preset {args.preset} on {args.device}, run {args.run}, {args.conversations} conversations of 3 "
                   f"turns (image + spoken question, then typed follow-ups), max_tokens {args.max_tokens}, greedy; "
                   f"{time.perf_counter() - started:.0f} s in all")
    return 0
