"""Sample predictions on a few held-out images during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.requests import SamplingParams
from trimodal.models.chat import IMAGE_MARKER, Turn


def sample_prompts(rows: list[dict], caption_prompt: str) -> list[dict]:
    """Held-out rows -> {question, reference, embedding}: captions ask the caption prompt, conversations ask
    their first question."""
    out = []
    for row in rows:
        if "caption" in row:
            out.append({"question": caption_prompt, "reference": row["caption"], "embedding": row["embedding"]})
        else:
            turns = list(row["turns"])
            out.append({"question": turns[0]["text"], "reference": turns[1]["text"], "embedding": row["embedding"]})
    return out


@torch.no_grad()
def print_samples(stage_model, samples: list[dict], options, step: int, device) -> None:
    """Greedy answers for `samples` with the current weights; printed and appended to samples.jsonl."""
    if not samples:
        return
    model = stage_model.model
    was_training = model.training
    model.eval()
    gen = TextGenerator(model.lm, stage_model.tokenizer, stage_model.image_end_id)
    prompts = []
    for sample in samples:
        feats = torch.from_numpy(np.asarray(sample["embedding"], dtype=np.float32)).unsqueeze(0)  # [N, D] -> [1, N, D]
        ids = gen.encode([Turn("user", IMAGE_MARKER + sample["question"])], options.num_patches)
        prompts.append(Prompt(ids, model.project(feats.to(device))))
    results = gen.generate(prompts, [SamplingParams(max_tokens=32)] * len(prompts))
    with (Path(options.run_dir) / "samples.jsonl").open("a") as fh:
        for sample, result in zip(samples, results):
            print(f"[sample step {step}] Q: {sample['question']} | predicted: {result.text!r} | "
                  f"reference: {sample['reference']!r}", flush=True)
            fh.write(json.dumps({"step": step, "question": sample["question"], "predicted": result.text,
                                 "reference": sample["reference"]}) + "\n")
    model.train(was_training)
