"""The language-model engines in process, side by side: start-up, one request, and N requests at once.

Each engine runs in its own environment and process: `builtin` in .venv (this interpreter), `vllm-float32` and
`vllm-bfloat16` in .venv-vllm (make install-vllm). `builtin` runs in the preset's `serving.dtype` and
`serving.attn_implementation`; `builtin-DTYPE` and `builtin-DTYPE-ATTN` (`builtin-float32-eager`) set them. Every
engine gets the same chat prompt (~110 tokens) and decodes greedily to exactly --max-tokens new tokens (EOS is not
a stop here), so the numbers compare like for like.

Per engine: start-up seconds (loading, and vLLM's engine processes), then for 1 request and for --requests at once
the aggregate output tokens/s and the time to first token (p50 over the requests).

    python bench/lm_engines.py --preset cpu --requests 8 --max-tokens 64
    python bench/lm_engines.py --preset test --engines builtin,vllm-float32 --max-tokens 16   # seconds: it works
    python bench/lm_engines.py --preset cpu --engines builtin-float32-eager,builtin-float32,builtin-bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPT = ("You are looking at a picture of simple coloured shapes on a plain background. " * 6 +
          "Describe, in a few sentences, what a picture like this usually shows and how you would tell the shapes "
          "and their colours apart.")
OVERRIDES = {"test": {"model.language_model.random_shape.num_heads": 2}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--engines", default="builtin,vllm-float32,vllm-bfloat16")
    p.add_argument("--requests", type=int, default=8, help="requests at once in the second measurement")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this engine in this process
    return p.parse_args(argv)


def _prompt_and_params(generator, max_tokens: int, count: int):
    from trimodal.inference.engine import Prompt
    from trimodal.inference.requests import SamplingParams
    from trimodal.models.chat import Turn

    prompt = Prompt(generator.encode([Turn("user", PROMPT)], 0), None)
    return [prompt] * count, [SamplingParams(max_tokens=max_tokens)] * count


def _summary(start: float, firsts: list[float], end: float, tokens: int) -> dict:
    return {"tok_s": tokens / (end - start), "ttft_p50_ms": 1000 * statistics.median(f - start for f in firsts)}


def builtin_settings(cfg, engine: str) -> None:
    """Set serving.dtype and serving.attn_implementation from a `builtin-DTYPE[-ATTN]` engine name."""
    parts = engine.split("-")[1:]
    if parts:
        cfg.serving.dtype = parts[0]
    if len(parts) > 1:
        cfg.serving.attn_implementation = parts[1]
    cfg.serving.validate("serving")


def measure_builtin(cfg, max_tokens: int, count: int) -> dict:
    from trimodal.runs import load_text_generator, read_run

    t0 = time.perf_counter()
    gen = load_text_generator(cfg, read_run(None))
    gen.eos_ids = set()  # exactly max_tokens each
    out = {"start_s": time.perf_counter() - t0}
    for label, n in (("one", 1), ("many", count)):
        prompts, params = _prompt_and_params(gen, max_tokens, n)
        start, firsts, tokens = time.perf_counter(), {}, 0
        for delta in gen.stream(prompts, params):
            firsts.setdefault(delta.row, time.perf_counter())
            if delta.finish_reason:
                tokens += delta.completion_tokens
        out[label] = _summary(start, list(firsts.values()), time.perf_counter(), tokens)
    return out


async def _vllm_wave(gen, prompts, params) -> dict:
    start, firsts, tokens = time.perf_counter(), {}, 0

    async def one(i: int) -> int:
        async for delta in gen.stream(prompts[i], params[i], row=i):
            firsts.setdefault(i, time.perf_counter())
            if delta.finish_reason:
                return delta.completion_tokens
        return 0

    tokens = sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    return _summary(start, list(firsts.values()), time.perf_counter(), tokens)


async def measure_vllm(cfg, dtype: str, max_tokens: int, count: int) -> dict:
    from trimodal.inference.vllm_engine import load_vllm_generator

    cfg.serving.vllm.dtype = dtype
    t0 = time.perf_counter()
    gen = load_vllm_generator(cfg)
    gen.eos_ids = set()
    gen.start()
    out = {"start_s": time.perf_counter() - t0}
    try:
        await _vllm_wave(gen, *_prompt_and_params(gen, 4, 1))  # warm-up
        for label, n in (("one", 1), ("many", count)):
            out[label] = await _vllm_wave(gen, *_prompt_and_params(gen, max_tokens, n))
    finally:
        gen.shutdown()
    return out


def run_one(args: argparse.Namespace) -> None:
    from trimodal.config import load_config

    cfg = load_config(args.preset, OVERRIDES.get(args.preset, {}))
    if args.one.startswith("builtin"):
        builtin_settings(cfg, args.one)
        result = measure_builtin(cfg, args.max_tokens, args.requests)
    else:
        result = asyncio.run(measure_vllm(cfg, args.one.split("-", 1)[1], args.max_tokens, args.requests))
    print("RESULT " + json.dumps(result), flush=True)


def run_all(args: argparse.Namespace) -> None:
    from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

    env = {**os.environ, **NO_TELEMETRY_ENV, "PYTHONPATH": str(ROOT)}  # each engine's process: no usage statistics
    rows = []
    for engine in args.engines.split(","):
        python = sys.executable if engine.startswith("builtin") else str(VLLM_PYTHON)
        cmd = [python, __file__, "--one", engine, "--preset", args.preset, "--requests", str(args.requests),
               "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[lm_engines] {engine} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append((engine, json.loads(line[7:])))
    print(f"\npreset {args.preset}, {args.max_tokens} new tokens per request, greedy; {args.requests} at once\n")
    print(f"| engine | start s | 1 request tok/s (TTFT ms) | {args.requests} at once tok/s (TTFT p50 ms) |")
    print("|---|---|---|---|")
    for engine, r in rows:
        one, many = r["one"], r["many"]
        print(f"| {engine} | {r['start_s']:.1f} | {one['tok_s']:.1f} ({one['ttft_p50_ms']:.0f}) | "
              f"{many['tok_s']:.1f} ({many['ttft_p50_ms']:.0f}) |")


if __name__ == "__main__":  # vLLM spawns its engine processes: nothing may run on import
    arguments = parse_args()
    run_one(arguments) if arguments.one else run_all(arguments)
