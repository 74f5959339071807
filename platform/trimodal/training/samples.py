"""Sample predictions on a few held-out images during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.generation import SamplingParams
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
def print_samples(sm, samples: list[dict], opts, step: int, device) -> None:
    """Greedy answers for `samples` with the current weights; printed and appended to samples.jsonl."""
    if not samples:
        return
    model = sm.model
    was_training = model.training
    model.eval()
    gen = TextGenerator(model.lm, sm.tokenizer, sm.image_end_id)
    prompts = []
    for s in samples:
        feats = torch.from_numpy(np.asarray(s["embedding"], dtype=np.float32)).unsqueeze(0)  # [N, D] -> [1, N, D]
        ids = gen.encode([Turn("user", IMAGE_MARKER + s["question"])], opts.num_patches)
        prompts.append(Prompt(ids, model.project(feats.to(device))))
    results = gen.generate(prompts, [SamplingParams(max_tokens=32)] * len(prompts))
    with (Path(opts.run_dir) / "samples.jsonl").open("a") as fh:
        for s, r in zip(samples, results):
            print(f"[sample step {step}] Q: {s['question']} | predicted: {r.text!r} | reference: {s['reference']!r}",
                  flush=True)
            fh.write(json.dumps({"step": step, "question": s["question"], "predicted": r.text,
                                 "reference": s["reference"]}) + "\n")
    model.train(was_training)
