"""Training-step benchmark: stage-0, stage-1 and stage-2 step times of a preset, under the settings that change them.

Stage 0 (the tiny CLIP) is timed on batches of the preset's size (64 random-pixel images with shapes-set
captions and their phrases): sdpa attention in float32, then under bf16 autocast, then with the plain-matmul
attention kernel (`model.vision.stage0_attn: eager`) under bf16 autocast. For stages 1 and 2 each row builds the stage's
real model and times optimizer steps on batches shaped like the shapes set's (8 rows of different lengths; stage 1:
49 image positions + up to 28 caption tokens, stage 2: 49 + up to 92 conversation tokens; random image features,
answers as targets where the set's answers sit: `make_batch`). Rows add one change at a time:

  sdpa fp32        attention through torch's sdpa kernel, float32 matmuls, LoRA dropout 0.05 (the baseline)
  + bf16 autocast  bfloat16 autocast (native on CPUs with AMX / AVX512-BF16 and on GPUs; emulated elsewhere)
  + eager          the plain-matmul attention kernel instead of sdpa
  + no dropout     LoRA dropout 0 (stage 2 only: PyTorch draws dropout masks slowly on CPU)
  + plain LoRA     stage 2 only: LoRA on the float32 base instead of the 4-bit NF4 one (no dequantisation)
  + compiled       each LM decoder layer compiled by torch.compile (`compile_layers`; stage 1: on the eager row)
  attn-only LoRA   stage 2 only, a candidate not taken: LoRA on q/k/v/o only (the MLP's adapters dropped)
  bf16 base        a candidate not taken, on the compiled row: the frozen LM's weights stored in bfloat16
                   (`model.language_model.dtype`), so autocast no longer casts each weight at every use and the
                   residual stream is bf16 too (LoRA weights and the projector stay float32)

The ratio column is each row's step time over the first row's, measured in the same run; the first step (not
timed in the median) shows what a row pays once, such as the compile.

    python bench/train_step.py --preset cpu            # SmolLM2-135M, about 3 minutes on 2 cores
    python bench/train_step.py --preset test --steps 2 # tiny random models: checks it works
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trimodal.config import TrimodalConfig, load_config
from trimodal.models.chat import IGNORE_INDEX, IMAGE_TOKEN_ID
from trimodal.runs import RunInfo
from trimodal.training.collate import Batch
from trimodal.hardware import native_bf16
from trimodal.training.step import bf16_autocast, compile_decoder_layers, train_step
from trimodal.training.policies import stage1_model, stage2_model

BATCH, PATCHES = 8, 49
TEXT_TOKENS = {1: 28, 2: 92}
"""Text positions per row after the image: the shapes set's padded caption and conversation lengths."""
TARGETS = {1: 12, 2: 30}
"""Target tokens per row (caption + EOS; the assistant turns + EOS)."""


def make_batch(stage: int, vision_dim: int, vocab: int, seed: int) -> Batch:
    """One batch shaped like the shapes set's: [image placeholders][text][padding], rows of different lengths
    (right-padded to the longest), and the targets where answers sit: stage 1 the caption at each row's end, stage 2
    three answers spread through each row's conversation, so they fall at different positions in each row."""
    gen = torch.Generator().manual_seed(seed)
    longest = TEXT_TOKENS[stage]
    ids = torch.full((BATCH, PATCHES + longest), 0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    spans = 1 if stage == 1 else 3
    for row in range(BATCH):
        length = PATCHES + longest - 2 * row  # [49 + T_text - 2r]: up to 14 padded positions per row
        ids[row, :PATCHES] = IMAGE_TOKEN_ID
        ids[row, PATCHES:length] = torch.randint(10, vocab, (length - PATCHES,), generator=gen)
        mask[row, :length] = 1
        per_span = TARGETS[stage] // spans
        for k in range(spans):
            end = PATCHES + (length - PATCHES) * (k + 1) // spans
            labels[row, end - per_span:end] = ids[row, end - per_span:end]
    features = torch.randn(BATCH, PATCHES, vision_dim, generator=gen)
    return Batch(ids, mask, labels, features)


def time_stage0(cfg: TrimodalConfig, autocast: bool, attn: str, steps: int) -> float:
    """Median seconds per stage-0 optimizer step (after one warm-up step), phrase grounding as the preset says,
    both towers' attention through `attn` ("sdpa" or "eager")."""
    from trimodal.data.shapes.samples import sample_image
    from trimodal.models.vision import build_random_clip
    from trimodal.training.clip import ClipCollator, build_caption_tokenizer, contrastive_loss
    from trimodal.training.step import optimizer_step

    stage, vision = cfg.stage0, cfg.model.vision
    captions = [list(sample_image(0, "train", i).captions) for i in range(stage.batch_size)]
    tokenizer = build_caption_tokenizer([c for cs in captions for c in cs])
    model = build_random_clip(vision.random_shape, vision.image_size, len(tokenizer))
    model.set_attn_implementation(attn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    collate = ClipCollator(tokenizer, seed=0, phrases=vision.stage0_phrases)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        pixels = torch.randint(0, 256, (stage.batch_size, vision.image_size, vision.image_size, 3), generator=gen,
                               dtype=torch.uint8)
        batch = collate({"pixels": pixels.numpy(), "captions": [json.dumps(c) for c in captions]})
        start = time.perf_counter()
        with bf16_autocast(autocast, "cpu"):
            loss = contrastive_loss(model, batch, vision.stage0_pool)
        optimizer_step(loss, model.parameters(), optimizer, scheduler)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def variant(cfg: TrimodalConfig, eager: bool, dropout: float, extra: tuple[str, ...] = ()) -> TrimodalConfig:
    """The preset with one row's settings: float32 LM weights, layers eager, unless `extra` says otherwise."""
    kernel = "eager" if eager else "sdpa"
    return load_config(cfg.name, [f"model.language_model.attn_implementation={kernel}", f"lora.dropout={dropout}",
                                  "model.language_model.dtype=float32", "stage1.compile_layers=false",
                                  "stage2.compile_layers=false", *extra])


def time_steps(cfg: TrimodalConfig, stage: int, autocast: bool, vision_dim: int,
               steps: int) -> tuple[float, int, float]:
    """Median seconds per optimizer step (after one warm-up step), tokens per batch, and the warm-up step's seconds."""
    if stage == 1:
        stage_model = stage1_model(cfg, vision_dim, num_patches=PATCHES)
    else:
        stage_model = stage2_model(cfg, vision_dim, RunInfo(None, None, False), quantize=cfg.quant.load_in_4bit,
                                   num_patches=PATCHES)
    compile_decoder_layers(stage_model.model.lm, cfg.stage1 if stage == 1 else cfg.stage2, "cpu")
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
    return statistics.median(times[1:]), int(batch.attention_mask.sum()), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the preset's workers use 2)")
    parser.add_argument("--stages", default="0,1,2", help="which stages' rows to time, e.g. 1,2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.preset)
    vision_dim = base.model.vision.random_shape.hidden_size
    nf4, plain = ("quant.load_in_4bit=true",), ("quant.load_in_4bit=false",)
    attention = ("lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",)
    compiled = ("stage1.compile_layers=true", "stage2.compile_layers=true")
    bf16_base = compiled + ("model.language_model.dtype=bfloat16",)
    rows = {1: [("sdpa fp32", False, False, 0.05, ()), ("+ bf16 autocast", False, True, 0.05, ()),
                ("+ eager", True, True, 0.05, ()), ("+ compiled", True, True, 0.05, compiled),
                ("bf16 base", True, True, 0.05, bf16_base)],
            2: [("sdpa fp32", False, False, 0.05, nf4), ("+ bf16 autocast", False, True, 0.05, nf4),
                ("+ eager", True, True, 0.05, nf4), ("+ no dropout", True, True, 0.0, nf4),
                ("+ plain LoRA", True, True, 0.0, plain), ("+ compiled", True, True, 0.0, plain + compiled),
                ("attn-only LoRA", True, True, 0.0, plain + attention),
                ("bf16 base", True, True, 0.0, plain + bf16_base)]}
    print(f"preset {args.preset}, {args.threads} threads, native bf16: {native_bf16('cpu')}, batch {BATCH}, "
          f"median of {args.steps} steps")
    print("| stage | settings | tokens/batch | s/step | tokens/s | time vs first row | first step s |\n"
          "|---|---|---|---|---|---|---|")
    stages = {int(s) for s in args.stages.split(",")}
    if 0 in stages:
        images = f"{base.stage0.batch_size} images"
        fp32 = time_stage0(base, False, "sdpa", args.steps)
        print(f"| 0 | sdpa fp32 | {images} | {fp32:.2f} | | 1.00 | |", flush=True)
        for name, autocast, attn in (("+ bf16 autocast", True, "sdpa"), ("+ eager", True, "eager")):
            seconds = time_stage0(base, autocast, attn, args.steps)
            print(f"| 0 | {name} | {images} | {seconds:.2f} | | {seconds / fp32:.2f} | |", flush=True)
    for stage in sorted(stages - {0}):
        first = None
        for name, eager, autocast, dropout, extra in rows[stage]:
            seconds, tokens, warmup = time_steps(variant(base, eager, dropout, extra), stage, autocast, vision_dim,
                                                 args.steps)
            first = first or seconds
            print(f"| {stage} | {name} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} | {seconds / first:.2f} "
                  f"| {warmup:.1f} |", flush=True)


if __name__ == "__main__":
    main()
