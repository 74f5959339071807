"""GPU check: what the `phi2` preset costs on one CUDA GPU, in one command of at most ~8 minutes (one H100 80 GB).

Prints a table (and writes it as JSON to --out) with three parts, each run in its own process under a time budget,
so a crash or a hang in one part is reported and the next part still gets a clean GPU:

  1. train      one stage-2 training step of a phi2-shaped model with random weights (microsoft/phi-2's architecture,
                PhiForCausalLM, built from a PhiConfig on the GPU, no download), loaded the way stage 2 loads it:
                the weights are saved once and loaded by `trimodal.training.policies.stage2_model` (bf16, 4-bit NF4
                double-quant through bitsandbytes, LoRA r=64 alpha=16 dropout 0.1 on q_proj, k_proj, v_proj, dense,
                fc1, fc2 through peft, plus the projector Linear(640, 2560) + residual MLP from `build_projector`).
                Batch: the preset's stage2.batch_size (4) rows of its data.max_length (384) tokens, 49 of them image
                positions. Reported: the median step time after warm-up (CUDA-synchronised), the peak of
                torch.cuda.max_memory_allocated over the steps, and the parameter counts against the seed recipe's.
  2. vllm       vLLM bf16 decode tokens/s of a phi2-shaped model (load_format="dummy": random weights, the model
                directory holds only config.json and a tokenizer) at 1, 8 and 32 concurrent requests, started with
                the preset's own engine settings (`trimodal.inference.vllm_engine.engine_kwargs`: enforce_eager, as
                the preset serves) and again with CUDA graphs. Decode rate = extra tokens / extra time between a
                short and a long generation of the same shape, so prefill and start-up cancel. Each rate is shown as
                a fraction of the memory-bandwidth bound:
                    bound tokens/s = concurrency * bandwidth / (weight bytes + KV bytes read per step)
                with the bandwidth from BANDWIDTH_TBS (by GPU name) or --bandwidth-tbs.
  3. rehearsal  `pytest tests/integration/test_phi2_rehearsal.py` with CUDA visible ("missing" if the file is absent).

Without a CUDA GPU it prints one line, "needs a CUDA GPU", and exits 2. Exit status 1: some part failed.

Where it runs
-------------
A GPU node of the cluster (cluster.yaml; `make install`, and `make install-vllm` for part 2):

    make gpu-check                                     # .venv/bin/python bench/gpu_check.py --out runs/gpu_check.json

A lent device machine (the workplace's `run` tool: no internet, and the repository's venvs do not travel). Its image
has python3 (3.12) with torch, transformers, peft, accelerate, safetensors, tokenizers, tiktoken, pyyaml, pillow,
numpy and pytest (its package list); that torch and transformers are used. It lacks bitsandbytes (part 1), soundfile,
soxr and cffi (imported by trimodal.runs through trimodal.audio), openai-whisper (the GPT-2 BPE file), Ray and vLLM.
trimodal itself is found through platform/ (put on sys.path below), not installed; part 1 times
trimodal.training.step.train_step, which needs no Ray. Prepare here, once, in the repo root:

    echo /.gpu/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .gpu/whl bitsandbytes==0.50.2 soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1
    for w in .gpu/whl/*.whl; do python3 -m zipfile -e "$w" .gpu/site; done
    rm -rf .gpu/whl .gpu/site/bitsandbytes/libbitsandbytes_{cuda11,cuda12,rocm,xpu}*.so  # keep cuda13x (64 MiB cap)
    cp .venv/lib/python3.11/site-packages/whisper/assets/gpt2.tiktoken .gpu/

then run, with carry [".gpu"] and timeout_s 540:

    PYTHONPATH=.gpu/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --gpt2-tiktoken .gpu/gpt2.tiktoken \\
        --out $OUT/gpu_check.json

There part 2 reports "skipped": no vLLM is installed, and a CUDA vLLM wheel (hundreds of MB, pinned to its own
torch) cannot travel; part 2 runs where `make install-vllm VLLM_SPEC=vllm==0.32.0 ...` has built .venv-vllm. Part 3
fails there: the rehearsal drives .venv's Ray jobs and .venv-vllm's Serve replica, which exist only after `make install`
and `make install-vllm` (a cluster GPU node).

    --cpu-smoke   tiny Phi shapes on the CPU (no CUDA needed): checks that every code path runs; no numbers to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))  # trimodal from the checkout when it is not installed

BANDWIDTH_TBS = [
    (("H200",), 4.8, "H200: 4.8 TB/s (NVIDIA H200 Tensor Core GPU datasheet)"),
    (("H100", "NVL"), 3.9, "H100 NVL: 3.9 TB/s (NVIDIA H100 Tensor Core GPU datasheet)"),
    (("H100", "PCIE"), 2.0, "H100 PCIe: 2.0 TB/s (NVIDIA H100 Tensor Core GPU datasheet)"),
    (("H100",), 3.35, "H100 SXM: 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet)"),
    (("A100", "80GB", "PCIE"), 1.935, "A100 80GB PCIe: 1.935 TB/s (NVIDIA A100 Tensor Core GPU datasheet)"),
    (("A100", "80GB"), 2.039, "A100 80GB SXM: 2.039 TB/s (NVIDIA A100 Tensor Core GPU datasheet)"),
    (("A100", "40GB"), 1.555, "A100 40GB: 1.555 TB/s (NVIDIA A100 Tensor Core GPU datasheet)"),
]
"""(words all in the upper-cased GPU name, TB/s, source); first match wins, so specific rows come first. torch names
the H100 SXM 'NVIDIA H100 80GB HBM3', the PCIe card 'NVIDIA H100 PCIe', the A100s 'NVIDIA A100-SXM4-40GB' etc."""
VISION_DIM = 640
"""Width of TinyCLIP ViT-61M/32's patch features, the phi2 preset's vision tower (DESIGN.md section 3)."""
IMAGE_POSITIONS = 49
"""Patch features per image: 224 px / 32 px patches = 7 x 7."""
TARGET_SHARE = 0.5
"""Share of each row's text positions that are answer targets (sizes the vocabulary projection)."""
SEED_RECIPE_PARAMS = (94_371_840, 2_874_055_680)
"""Trainable and total parameters of the seed recipe's stage 2 (DESIGN.md section 3)."""
CONCURRENCY = (1, 8, 32)
PROMPT_TOKENS, SHORT_TOKENS = 128, 16
"""Prompt length of each decode request; new tokens of the short generation that prefill and start-up cancel against."""
DECODE_REPEATS = 3
"""Short/long generation pairs per decode rate (their median is reported)."""
CAP_S = {"train": 210, "vllm-eager": 100, "vllm-graphs": 150}
"""Most seconds each part may take; the rehearsal gets what is left."""
REHEARSAL_MIN_S = 60
"""Seconds kept back for the rehearsal while the parts before it run."""
REHEARSAL_TEST = "tests/integration/test_phi2_rehearsal.py"
GIB = 2**30


@dataclass(frozen=True)
class PhiShape:
    """The dimensions of a Phi (PhiForCausalLM) language model."""

    hidden: int = 2560
    """Width of the residual stream."""
    layers: int = 32
    """Decoder layers."""
    heads: int = 32
    """Attention heads (also key/value heads)."""
    intermediate: int = 10240
    """Width of the MLP (fc1 out, fc2 in)."""
    vocab: int = 51200
    """Rows of the embedding table and of lm_head."""
    partial_rotary_factor: float = 0.4
    """Share of each head's dimensions that get rotary position embeddings."""


PHI2 = PhiShape()
TINY = PhiShape(hidden=160, layers=2, heads=2, intermediate=640)
"""--cpu-smoke's shape: Phi-2's head size (80; vLLM's CPU attention takes only some sizes), two layers."""


@dataclass
class Row:
    """One line of the result table."""

    part: str
    """train, vllm or rehearsal."""
    measure: str
    """What was measured."""
    value: str
    """The result, formatted ('skipped', 'missing', 'failed' when there is none)."""
    number: float | None = None
    """The result as a number, in the unit `value` shows (None when there is none)."""
    detail: str = ""
    """Settings, the bound, or why there is no result."""
    failed: bool = False
    """The part crashed or ran out of time."""


@dataclass
class ChildSpec:
    """What a part's child process measures (written as JSON for it)."""

    part: str
    """train, vllm-eager or vllm-graphs."""
    shape: dict
    """PhiShape fields."""
    lm_dir: str
    """Directory with config.json and the tokenizer files."""
    work_dir: str
    """Scratch directory (the train part saves the random weights here)."""
    device: str
    """cuda, or cpu for --cpu-smoke."""
    steps: int = 5
    """Timed training steps (after warm-up)."""
    warmup: int = 2
    """Untimed training steps first."""
    decode_tokens: int = 128
    """New tokens per request that the decode rate is measured over."""
    deadline: float = field(default_factory=lambda: time.time() + 60)
    """Wall-clock time (time.time()) by which the child stops starting new measurements."""


# ---------------------------------------------------------------- pure arithmetic and formatting


def bandwidth_for(gpu_name: str) -> tuple[float, str] | None:
    """(TB/s, source) of the datasheet memory bandwidth of a GPU by its CUDA name; None if it is not in the table."""
    upper = gpu_name.upper()
    for words, tbs, source in BANDWIDTH_TBS:
        if all(w in upper for w in words):
            return tbs, source
    return None


def phi_param_count(shape: PhiShape) -> int:
    """Parameters of a PhiForCausalLM (biases on every linear, LayerNorms with bias, untied lm_head)."""
    h, f = shape.hidden, shape.intermediate
    attention = 4 * (h * h + h)  # q_proj, k_proj, v_proj, dense
    mlp = (h * f + f) + (f * h + h)  # fc1, fc2
    layer = attention + mlp + 2 * h  # + input_layernorm
    return shape.vocab * h + shape.layers * layer + 2 * h + (h * shape.vocab + shape.vocab)


def decode_weight_bytes(shape: PhiShape, dtype_bytes: int = 2) -> int:
    """Weight bytes one decode step reads: every parameter but the embedding table (a step reads one row of it)."""
    return (phi_param_count(shape) - shape.vocab * shape.hidden) * dtype_bytes


def kv_bytes_per_token(shape: PhiShape, dtype_bytes: int = 2) -> int:
    """KV-cache bytes of one token: a key and a value of `hidden` values in every layer."""
    return 2 * shape.layers * shape.hidden * dtype_bytes


def bound_tokens_per_s(concurrency: int, bandwidth_tbs: float, weight_bytes: int, kv_per_token: int,
                       mean_context: float) -> float:
    """Memory-bandwidth bound of decoding: each step reads the weights once and every sequence's KV cache."""
    step_bytes = weight_bytes + concurrency * kv_per_token * mean_context
    return concurrency * bandwidth_tbs * 1e12 / step_bytes


def part_budget(now: float, deadline: float, cap_s: float, reserve_s: float) -> float:
    """Seconds a part may run: its cap, within what is left after keeping `reserve_s` for later parts."""
    return max(0.0, min(cap_s, deadline - now - reserve_s))


def pytest_summary(output: str) -> str:
    """pytest's closing counts ('3 passed, 1 skipped in 12.01s'), or '' if the output has none."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\d+ (passed|failed|skipped|error|errors|deselected)\b|no tests ran", line):
            return line.strip(" =")
    return ""


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| part | measure | value | detail |", "|---|---|---|---|"]
    for row in rows:
        cells = [row.part, row.measure, row.value, row.detail]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def vllm_rows(mode: str, results: list[dict], shape: PhiShape, bandwidth_tbs: float | None,
              decode_tokens: int) -> list[Row]:
    """Table rows of one vLLM mode's rates ({"concurrency", "tokens_per_s"}) against the bandwidth bound."""
    mean_context = PROMPT_TOKENS + SHORT_TOKENS + decode_tokens / 2
    rows = []
    for r in results:
        n, rate = r["concurrency"], r["tokens_per_s"]
        measure = f"decode tokens/s, {n} concurrent ({mode})"
        detail = f"median of {DECODE_REPEATS}; prompt {PROMPT_TOKENS}, decode {decode_tokens} tokens"
        if rate is None:
            rows.append(Row("vllm", measure, "n/a", None, "no long generation took longer than its short one; "
                            + detail, failed=True))
            continue
        if bandwidth_tbs:
            bound = bound_tokens_per_s(n, bandwidth_tbs, decode_weight_bytes(shape), kv_bytes_per_token(shape),
                                       mean_context)
            detail = f"{rate / bound:.2f} of the bound {bound:.0f} tokens/s; " + detail
        rows.append(Row("vllm", measure, f"{rate:.0f}", rate, detail))
    return rows


def train_rows(m: dict) -> list[Row]:
    """Table rows of the train part's measurements (see `train_part`)."""
    median = statistics.median(m["step_s"])
    tokens = m["batch"] * m["length"]
    recipe = "matches" if (m["trainable"], m["total"]) == SEED_RECIPE_PARAMS else "differs from"
    loss = ", ".join(f"{x:.2f}" for x in m["losses"])
    return [
        Row("train", "stage-2 step (QLoRA + projector)", f"{median:.3f} s", median,
            f"median of {len(m['step_s'])} after {m['warmup']} warm-up; batch {m['batch']} x {m['length']} "
            f"({IMAGE_POSITIONS} image positions, {m['targets']} targets/row); {tokens / median:.0f} tokens/s; "
            f"{m['step_source']}; losses {loss}"),
        Row("train", "peak memory (steps)", f"{m['peak_bytes'] / GIB:.2f} GiB", m["peak_bytes"] / GIB,
            f"torch.cuda.max_memory_allocated over warm-up + timed steps; {m['loaded_bytes'] / GIB:.2f} GiB "
            "after loading"),
        Row("train", "parameters (trainable / total)", f"{m['trainable']:,} / {m['total']:,}", m["trainable"],
            f"{recipe} the seed recipe's {SEED_RECIPE_PARAMS[0]:,} / {SEED_RECIPE_PARAMS[1]:,}"),
        Row("train", "build + 4-bit load", f"{m['load_s']:.0f} s", m["load_s"],
            "random init on the device, save_pretrained, stage2_model's quantised from_pretrained"),
    ]


# ---------------------------------------------------------------- model directory and tokenizer


def lm_tokenizer(gpt2_tiktoken: str | None):
    """(tokenizer, where it came from): trimodal.models.rehearsal's Phi-2 tokenizer (GPT-2 BPE ranks from the
    installed openai-whisper); else GPT-2's BPE from a `gpt2_tiktoken` ranks file through that module's builder; else
    trimodal's byte-level tokenizer (the timings do not depend on the tokenizer: it only has to load)."""
    from trimodal.models import rehearsal

    try:
        return rehearsal.phi2_tokenizer(), "trimodal.models.rehearsal.phi2_tokenizer()"
    except FileNotFoundError as missing:  # no openai-whisper here
        reason = str(missing)
    if gpt2_tiktoken:
        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast

        bpe = rehearsal.gpt2_bpe(rehearsal.load_bpe_ranks(Path(gpt2_tiktoken)))
        bpe.add_special_tokens([AddedToken(rehearsal.EOS_TOKEN, special=True, normalized=False)])
        eos = rehearsal.EOS_TOKEN
        return (PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos),
                f"GPT-2 BPE from {gpt2_tiktoken}")
    from trimodal.models.language import build_tiny_tokenizer

    return build_tiny_tokenizer(), f"byte-level fallback ({reason}; or pass --gpt2-tiktoken)"


def phi_config(shape: PhiShape, eos_id: int):
    """A PhiConfig of `shape` with microsoft/phi-2's other settings (gelu_new, resid dropout 0.1, 2048 positions)."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                     partial_rotary_factor=shape.partial_rotary_factor, max_position_embeddings=2048,
                     resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new",
                     tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
                     architectures=["PhiForCausalLM"], dtype="bfloat16")


def write_lm_dir(shape: PhiShape, directory: Path, gpt2_tiktoken: str | None) -> str:
    """config.json + tokenizer files (what vLLM's dummy loader needs); returns where the tokenizer came from."""
    tokenizer, source = lm_tokenizer(gpt2_tiktoken)
    directory.mkdir(parents=True, exist_ok=True)
    phi_config(shape, tokenizer.eos_token_id).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return source


# ---------------------------------------------------------------- part 1: the stage-2 training step (child process)


def save_random_phi(lm_dir: Path, weights_dir: Path, device: str) -> None:
    """A random bf16 PhiForCausalLM built on `device` from lm_dir's config, saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(lm_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(weights_dir)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(weights_dir)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def step_function(stage, device: str):
    """(train_step, autocast, source): the training loop's own step (trimodal.training.step, no Ray needed)."""
    from trimodal.training.step import train_step, use_autocast

    return train_step, use_autocast(stage, device), "step: trimodal.training.step.train_step"


def make_batch(rows: int, length: int, vocab: int, targets: int, seed: int, device: str):
    """[image placeholders][random text] rows, the last `targets` text tokens as targets, random CLIP features."""
    import torch
    from trimodal.models.chat import IGNORE_INDEX, IMAGE_TOKEN_ID
    from trimodal.training.collate import Batch

    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(10, vocab, (rows, length - IMAGE_POSITIONS), generator=gen)
    ids = torch.cat([torch.full((rows, IMAGE_POSITIONS), IMAGE_TOKEN_ID), text], dim=1)  # [B, 49] + [B, L-49] -> [B, L]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -targets:] = ids[:, -targets:]
    features = torch.randn(rows, IMAGE_POSITIONS, VISION_DIM, generator=gen)  # [B, 49, 640]
    return Batch(ids.to(device), torch.ones_like(ids).to(device), labels.to(device), features.to(device))


def train_part(spec: ChildSpec) -> dict:
    """Build, load and time the stage-2 model; the measurements `train_rows` formats."""
    import torch
    from trimodal.config import load_config
    from trimodal.runs import RunInfo
    from trimodal.training.policies import stage2_model

    cuda = spec.device.startswith("cuda")
    start = time.perf_counter()
    weights_dir = Path(spec.work_dir) / "lm-weights"
    save_random_phi(Path(spec.lm_dir), weights_dir, spec.device)
    print(f"[gpu-check] train: random phi weights saved ({time.perf_counter() - start:.0f} s); loading in 4 bit",
          flush=True)
    cfg = load_config("phi2", {"model.language_model.source.kind": "path",
                               "model.language_model.source.name": str(weights_dir)})
    stage_model = stage2_model(cfg, VISION_DIM, RunInfo(None, None, False), device=spec.device)
    load_s = time.perf_counter() - start
    loaded = torch.cuda.memory_allocated() if cuda else 0
    step, autocast, source = step_function(cfg.stage2, spec.device)
    params = [p for p in stage_model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.stage2.lr, weight_decay=cfg.stage2.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rows, length = cfg.stage2.batch_size, cfg.data.max_length
    targets = int((length - IMAGE_POSITIONS) * TARGET_SHARE)
    vocab = min(stage_model.model.lm.get_input_embeddings().num_embeddings, len(stage_model.tokenizer))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(spec.warmup + spec.steps):
        if i > spec.warmup and time.time() > spec.deadline:
            break  # out of time: keep the steps timed so far
        batch = make_batch(rows, length, vocab, targets, seed=i, device=spec.device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = step(stage_model.model, batch, optimizer, scheduler, autocast, spec.device)
        if cuda:
            torch.cuda.synchronize()
        losses.append(loss)
        if i >= spec.warmup:
            times.append(time.perf_counter() - t0)
        print(f"[gpu-check] train: step {i + 1} {time.perf_counter() - t0:.3f} s, loss {loss:.3f}", flush=True)
    return {"step_s": times, "warmup": spec.warmup, "batch": rows, "length": length, "targets": targets,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0, "loaded_bytes": loaded,
            "trainable": stage_model.trainable, "total": stage_model.total, "load_s": load_s, "losses": losses,
            "step_source": source}


# ---------------------------------------------------------------- part 2: vLLM decode (child process, .venv-vllm)


def vllm_engine(spec: ChildSpec):
    """vLLM's LLM with the phi2 preset's engine settings (dummy weights; CUDA graphs for the `graphs` mode)."""
    from trimodal.config import load_config
    from trimodal.inference.vllm_engine import engine_env, engine_kwargs, max_model_len

    cfg = load_config("phi2")
    vcfg = cfg.serving.vllm
    kwargs = engine_kwargs(spec.lm_dir, vcfg, [], max_model_len(cfg, spec.lm_dir), spec.device)
    kwargs.update(load_format="dummy", max_num_seqs=max(vcfg.max_num_seqs, *CONCURRENCY))
    if spec.part == "vllm-graphs":
        kwargs.update(enforce_eager=False, compilation_config={"cudagraph_capture_sizes": list(CONCURRENCY)})
    else:
        kwargs["enforce_eager"] = True
    os.environ.update(engine_env(vcfg))
    from vllm import LLM

    return LLM(**kwargs)


def timed_generate(llm, concurrency: int, new_tokens: int, rng) -> float:
    """Seconds to generate exactly `new_tokens` for `concurrency` distinct random prompts at once."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [rng.randrange(100, 50000) for _ in range(PROMPT_TOKENS)]}
               for _ in range(concurrency)]
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    lengths = {len(o.outputs[0].token_ids) for o in outputs}
    if lengths != {new_tokens}:
        raise RuntimeError(f"expected {new_tokens} new tokens per request, got {sorted(lengths)}")
    return seconds


def decode_rate(llm, concurrency: int, decode_tokens: int, rng) -> float | None:
    """Median decode tokens/s over DECODE_REPEATS pairs of a short and a long generation of `concurrency` requests:
    the extra tokens over the extra time, so prefill and per-call costs cancel. None if no pair gave a positive time."""
    timed_generate(llm, concurrency, SHORT_TOKENS, rng)  # first use of this batch size: shapes, allocations
    rates = []
    for _ in range(DECODE_REPEATS):
        extra = timed_generate(llm, concurrency, SHORT_TOKENS + decode_tokens, rng) - timed_generate(
            llm, concurrency, SHORT_TOKENS, rng)
        if extra > 0:
            rates.append(concurrency * decode_tokens / extra)
    return statistics.median(rates) if rates else None


def vllm_part(spec: ChildSpec, out: Path) -> None:
    """Decode tokens/s at each concurrency, written to `out` after each one (a timeout keeps those done)."""
    import random

    start = time.perf_counter()
    llm = vllm_engine(spec)
    rng = random.Random(0)
    timed_generate(llm, max(CONCURRENCY), SHORT_TOKENS, rng)  # warm-up
    results = {"startup_s": time.perf_counter() - start, "rates": []}
    print(f"[gpu-check] {spec.part}: engine up in {results['startup_s']:.0f} s", flush=True)
    for n in CONCURRENCY:
        if time.time() > spec.deadline:
            break
        rate = decode_rate(llm, n, spec.decode_tokens, rng)
        results["rates"].append({"concurrency": n, "tokens_per_s": rate})
        out.write_text(json.dumps(results))
        print(f"[gpu-check] {spec.part}: {n} concurrent: {rate or 0:.0f} tokens/s", flush=True)


# ---------------------------------------------------------------- the parent: parts under budgets, the table


def run_child(argv: list[str], budget_s: float, env: dict[str, str], log: Path | None = None) -> int | None:
    """Run a process in its own session, echoing or logging its output; kill its whole group (vLLM's engine core
    included) after `budget_s`. Returns its exit status, or None when it ran out of time."""
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True,
                                stdout=sink if log else None, stderr=subprocess.STDOUT if log else None)
        try:
            return proc.wait(timeout=max(budget_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def child_env() -> dict[str, str]:
    """The children's environment: platform/ importable, unbuffered output, no vLLM usage reports and no Hugging
    Face telemetry (the values of NO_TELEMETRY_ENV in trimodal.inference.vllm_engine)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "platform"), env.get("PYTHONPATH")) if p)
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        del env["CUDA_VISIBLE_DEVICES"]  # an empty list hides every GPU
    return env


def run_part(python: str, spec: ChildSpec, budget_s: float) -> tuple[dict | None, str]:
    """(the child's JSON result or None, a word on how it ended)."""
    spec_file = Path(spec.work_dir) / f"{spec.part}.spec.json"
    out_file = Path(spec.work_dir) / f"{spec.part}.out.json"
    spec_file.write_text(json.dumps(dataclasses.asdict(spec)))
    print(f"[gpu-check] {spec.part}: starting (budget {budget_s:.0f} s)", flush=True)
    start = time.perf_counter()
    rc = run_child([python, str(Path(__file__).resolve()), "--child", str(spec_file), "--child-out", str(out_file)],
                   budget_s, child_env())
    seconds = time.perf_counter() - start
    result = json.loads(out_file.read_text()) if out_file.is_file() else None
    ended = f"timed out after {seconds:.0f} s" if rc is None else f"exit {rc} after {seconds:.0f} s (output above)"
    print(f"[gpu-check] {spec.part}: {ended}", flush=True)
    return result, ended if rc != 0 else ""


def vllm_python(explicit: str | None) -> str | None:
    """An interpreter that can import vllm: --vllm-python, else .venv-vllm's, else this one."""
    candidates = [explicit] if explicit else [str(ROOT / ".venv-vllm" / "bin" / "python"), sys.executable]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    for python in candidates:
        if python and Path(python).exists() and subprocess.run([python, "-c", probe]).returncode == 0:
            return python
    return None


def train_section(spec: ChildSpec, budget_s: float) -> list[Row]:
    result, ended = run_part(sys.executable, spec, budget_s)
    if result is None or not result.get("step_s"):
        return [Row("train", "stage-2 step (QLoRA + projector)", "failed", detail=ended or "no step timed",
                    failed=True)]
    return train_rows(result) + ([Row("train", "run", "incomplete", detail=ended, failed=True)] if ended else [])


def vllm_section(spec: ChildSpec, deadline: float, bandwidth: tuple[float, str] | None,
                 python: str | None) -> list[Row]:
    if python is None:
        return [Row("vllm", "decode tokens/s", "skipped",
                    detail="no Python with vLLM (make install-vllm builds .venv-vllm; or --vllm-python)")]
    rows = []
    for part, mode in (("vllm-eager", "enforce_eager, the preset's"), ("vllm-graphs", "CUDA graphs")):
        budget = part_budget(time.monotonic(), deadline, CAP_S[part], REHEARSAL_MIN_S)
        child = dataclasses.replace(spec, part=part, deadline=time.time() + budget - 15)
        result, ended = run_part(python, child, budget)
        rates = (result or {}).get("rates", [])
        rows += vllm_rows(mode, rates, PhiShape(**spec.shape), bandwidth[0] if bandwidth else None,
                          spec.decode_tokens)
        if ended or len(rates) < len(CONCURRENCY):
            rows.append(Row("vllm", f"engine ({mode})", "failed" if not rates else "incomplete",
                            detail=ended or "out of time", failed=True))
        elif result:
            rows.append(Row("vllm", f"engine start-up ({mode})", f"{result['startup_s']:.0f} s", result["startup_s"]))
    return rows


def rehearsal_section(deadline: float, work_dir: Path) -> list[Row]:
    measure = f"pytest {REHEARSAL_TEST} (CUDA visible)"
    if not (ROOT / REHEARSAL_TEST).is_file():
        return [Row("rehearsal", measure, "missing", detail=f"{REHEARSAL_TEST} does not exist")]
    budget = part_budget(time.monotonic(), deadline, float("inf"), 5)
    log = work_dir / "rehearsal.log"
    print(f"[gpu-check] rehearsal: running pytest (budget {budget:.0f} s)", flush=True)
    start = time.perf_counter()
    rc = run_child([sys.executable, "-m", "pytest", REHEARSAL_TEST, "-q", "-p", "no:cacheprovider"], budget,
                   child_env(), log)
    seconds = time.perf_counter() - start
    output = log.read_text(errors="replace")
    print("\n".join(output.splitlines()[-15:]), flush=True)
    value = "timeout" if rc is None else "passed" if rc == 0 else f"failed (exit {rc})"
    return [Row("rehearsal", measure, value, seconds, f"{pytest_summary(output) or 'no summary'}; {seconds:.0f} s",
                failed=rc != 0)]


def gpu_name() -> str | None:
    """The first CUDA device's name; None without torch or a CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check.json", help="where the table is written as JSON")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all three parts together")
    p.add_argument("--bandwidth-tbs", type=float, help="memory bandwidth in TB/s (default: by GPU name)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens the decode rate is measured over")
    p.add_argument("--vllm-python", help="interpreter with vLLM (default: .venv-vllm/bin/python if it has vllm)")
    p.add_argument("--gpt2-tiktoken", help="GPT-2 BPE ranks file, used where openai-whisper is not installed")
    p.add_argument("--work-dir", help="parent of the scratch directory (the random weights, ~6 GB)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the code paths run")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run the part this spec file names
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(spec_file: str, out_file: str) -> int:
    spec = ChildSpec(**json.loads(Path(spec_file).read_text()))
    if spec.part == "train":
        Path(out_file).write_text(json.dumps(train_part(spec)))
    else:
        vllm_part(spec, Path(out_file))
    return 0


def measure(args: argparse.Namespace, name: str, work_dir: Path) -> tuple[list[Row], dict]:
    """Run the three parts within the budget; (rows, header fields of the JSON)."""
    deadline = time.monotonic() + args.budget_s
    shape = TINY if args.cpu_smoke else PHI2
    bandwidth = (args.bandwidth_tbs, "--bandwidth-tbs") if args.bandwidth_tbs else bandwidth_for(name)
    tokenizer_source = write_lm_dir(shape, work_dir / "lm", args.gpt2_tiktoken)
    print(f"[gpu-check] {name}; bandwidth {bandwidth[1] if bandwidth else 'unknown (pass --bandwidth-tbs)'}; "
          f"tokenizer: {tokenizer_source}", flush=True)
    spec = ChildSpec("train", dataclasses.asdict(shape), str(work_dir / "lm"), str(work_dir),
                     "cpu" if args.cpu_smoke else "cuda", steps=args.steps, decode_tokens=args.decode_tokens)
    vllm = vllm_python(args.vllm_python)
    reserve = (CAP_S["vllm-eager"] if vllm else 0) + REHEARSAL_MIN_S
    budget = part_budget(time.monotonic(), deadline, CAP_S["train"], reserve)
    rows = train_section(dataclasses.replace(spec, deadline=time.time() + budget - 20), budget)
    shutil.rmtree(work_dir / "lm-weights", ignore_errors=True)
    rows += vllm_section(spec, deadline, bandwidth, vllm)
    rows += rehearsal_section(deadline, work_dir)
    header = {"gpu": name, "bandwidth_tbs": bandwidth[0] if bandwidth else None,
              "bandwidth_source": bandwidth[1] if bandwidth else None, "shape": dataclasses.asdict(shape),
              "tokenizer": tokenizer_source, "budget_s": args.budget_s}
    return rows, header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out)
    name = gpu_name()
    if name is None and not args.cpu_smoke:
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    try:
        rows, header = measure(args, name or "cpu (smoke run)", work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(rows), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header["elapsed_s"] = time.monotonic() - start
    out.write_text(json.dumps(header | {"rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    print(f"[gpu-check] {header['elapsed_s']:.0f} s; table written to {out}", flush=True)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
