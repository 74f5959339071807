"""Training-step benchmark: stage-1 and stage-2 step times of a preset, under the settings that change them.

Each row builds the stage's real model (stage 2: 4-bit NF4 LM + LoRA + projector) and times optimizer steps on
batches shaped like the shapes set's (8 rows; stage 1: 49 image positions + 28 caption tokens = 77, stage 2:
49 + 92 conversation tokens = 141; random image features, answers as targets). Rows add one change at a time:

  sdpa fp32        attention through torch's sdpa kernel, float32 matmuls, LoRA dropout 0.05 (the baseline)
  + bf16 autocast  bfloat16 autocast (native on CPUs with AMX / AVX512-BF16 and on GPUs; emulated elsewhere)
  + eager          the plain-matmul attention kernel instead of sdpa
  + no dropout     LoRA dropout 0 (stage 2 only: PyTorch draws dropout masks slowly on CPU)

The ratio column is each row's step time over the first row's, measured in the same run.

    python bench/train_step.py --preset cpu            # SmolLM2-135M, about 3 minutes on 2 cores
    python bench/train_step.py --preset test --steps 2 # tiny random models: checks it works
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trimodal.config import TrimodalConfig, load_config
from trimodal.models.chat import IGNORE_INDEX, IMAGE_TOKEN_ID
from trimodal.runs import RunInfo
from trimodal.training.collate import Batch
from trimodal.hardware import native_bf16
from trimodal.training.step import train_step
from trimodal.training.policies import stage1_model, stage2_model

BATCH, PATCHES = 8, 49
TEXT_TOKENS = {1: 28, 2: 92}
"""Text positions per row after the image: the shapes set's padded caption and conversation lengths."""
TARGETS = {1: 12, 2: 30}
"""Target tokens per row (caption + EOS; the assistant turns + EOS)."""


def make_batch(stage: int, vision_dim: int, vocab: int, seed: int) -> Batch:
    """One batch: [image placeholders][text], targets on the last TARGETS[stage] tokens of each row."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(10, vocab, (BATCH, TEXT_TOKENS[stage]), generator=gen)
    image = torch.full((BATCH, PATCHES), IMAGE_TOKEN_ID)
    ids = torch.cat([image, text], dim=1)  # [B, 49] + [B, T_text] -> [B, T]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -TARGETS[stage]:] = ids[:, -TARGETS[stage]:]
    features = torch.randn(BATCH, PATCHES, vision_dim, generator=gen)
    return Batch(ids, torch.ones_like(ids), labels, features)


def variant(cfg: TrimodalConfig, eager: bool, dropout: float) -> TrimodalConfig:
    kernel = "eager" if eager else "sdpa"
    return load_config(cfg.name, [f"model.language_model.attn_implementation={kernel}", f"lora.dropout={dropout}"])


def time_steps(cfg: TrimodalConfig, stage: int, autocast: bool, vision_dim: int, steps: int) -> tuple[float, int]:
    """Median seconds per optimizer step (after one warm-up step) and tokens per batch."""
    if stage == 1:
        stage_model = stage1_model(cfg, vision_dim)
    else:
        stage_model = stage2_model(cfg, vision_dim, RunInfo(None, None, False), quantize=cfg.quant.load_in_4bit)
    params = [p for p in stage_model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    vocab = stage_model.model.lm.get_input_embeddings().num_embeddings
    times = []
    for i in range(steps + 1):
        batch = make_batch(stage, vision_dim, vocab, seed=i)
        start = time.perf_counter()
        train_step(stage_model.model, batch, optimizer, scheduler, autocast, "cpu")
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), int(batch.attention_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the preset's workers use 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.preset)
    vision_dim = base.model.vision.random_shape.hidden_size
    rows = [("sdpa fp32", False, False, 0.05), ("+ bf16 autocast", False, True, 0.05), ("+ eager", True, True, 0.05),
            ("+ no dropout", True, True, 0.0)]
    print(f"preset {args.preset}, {args.threads} threads, native bf16: {native_bf16('cpu')}, batch {BATCH}, "
          f"median of {args.steps} steps")
    print(f"| stage | settings | tokens/batch | s/step | tokens/s | time vs first row |\n|---|---|---|---|---|---|")
    for stage in (1, 2):
        first = None
        for name, eager, autocast, dropout in rows:
            if stage == 1 and dropout == 0.0:
                continue  # stage 1 has no LoRA
            seconds, tokens = time_steps(variant(base, eager, dropout), stage, autocast, vision_dim, args.steps)
            first = first or seconds
            print(f"| {stage} | {name} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} | {seconds / first:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
