"""Evaluation benchmark: a run's held-out questions and captions answered by two baseline loops and by the job's.

  old b=1    one prompt at a time: prefill, then KV-cache steps until EOS (the one-at-a-time loop)
  old b=16   16 prompts in their original order, left padded; every row is stepped until the batch's longest answer
             ends, and the image is projected once per prompt
  new f32    the job's loop: the prompts of a conversation prefilled once as a chain, chains batched in order of
             length, finished rows dropped from the batch and its KV cache, each image projected once
  new        what `jobs/evaluate.py` runs: that loop with the LM as evaluation loads it (serving.dtype, bfloat16
             where the CPU has AMX or AVX512-BF16; serving.attn_implementation; the adapter merged into the weights)
  new apart  the same with the adapter kept apart, as the builtin engine serves it

The old loops and new f32 run the LM in float32 with training's attention kernel and the adapter apart. Every way
answers the same prompts (captions, then every assistant turn of the conversations) greedily; the table gives each
way's wall and CPU seconds (CPU time is the steadier measure on a shared machine; with --threads 1 it is the work
done), each over old b=16's (or the first way's), and how many answers differ from old b=1's (one at a time) and
from new's.

    python bench/evaluate.py --run runs/demo/finetune --data runs/demo/data              # every held-out image
    python bench/evaluate.py --run RUN --data DATA --limit 20 --ways "old b=16,new"      # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from trimodal.evaluation.batching import answer_text
from trimodal.evaluation.run_eval import (EVAL_PROMPT_TOKENS, answer_all, caption_jobs, load_for_eval,
                                          question_jobs, read_split)
from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.generation import left_pad
from trimodal.models.multimodal import project_image_features
from trimodal.runs import load_text_generator, read_run

WAYS = ("old b=1", "old b=16", "new f32", "new", "new apart")


@torch.no_grad()
def old_decode(lm, prompts: list[torch.Tensor], max_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """The baseline loop: every row of the batch is stepped until the last row ends."""
    embeds, mask, positions = left_pad(prompts)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    next_pos = positions[:, -1:] + 1
    while True:
        picks = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(picks.tolist()):
            if running[row]:
                running[row] = token not in eos_ids
                tokens[row] += [token] if running[row] else []
                running[row] = running[row] and len(tokens[row]) < max_tokens
        if not any(running):
            return tokens
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = lm(input_ids=picks.unsqueeze(-1), attention_mask=mask, position_ids=next_pos, cache=out.cache,
                 use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1


@torch.no_grad()
def old_answers(gen, projector, embeddings, jobs, num_patches: int, batch: int) -> list[str]:
    """Answers the baseline way: captions, then questions, `batch` prompts at a time in their original order, one
    projector call per prompt."""
    answers = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        prompts = []
        for turns, image, _, _ in chunk:
            feats = torch.from_numpy(np.asarray(embeddings[image], dtype=np.float32)).unsqueeze(0)  # [1, N, D]
            prompts.append(gen.embed(Prompt(gen.encode(turns, num_patches), project_image_features(projector, feats))))
        tokens = old_decode(gen.lm, prompts, chunk[0][3], gen.eos_ids)
        answers += [answer_text(gen.tokenizer, t).strip() for t in tokens]
    return answers


def all_jobs(embeddings: dict, references: dict, conversations: list[dict], caption_prompt: str) -> list[tuple]:
    """(turns, image id, group, max_tokens): the caption jobs, then the question jobs that evaluation answers."""
    captions = caption_jobs(embeddings, references, caption_prompt)
    questions = [(j["history"], j["image_id"], j["id"], 32) for j in question_jobs(conversations)
                 if j["image_id"] in embeddings]
    return captions + questions


def way_generator(run_dir: Path, cfg, way: str) -> TextGenerator:
    """The LM of a way (see the module doc): the float32 one for the old loops and new f32."""
    if way == "new apart":
        return load_text_generator(cfg, read_run(run_dir), max_prompt_tokens=EVAL_PROMPT_TOKENS)
    serving = dataclasses.replace(cfg.serving, dtype="float32",
                                  attn_implementation=cfg.model.language_model.attn_implementation)
    return load_text_generator(dataclasses.replace(cfg, serving=serving), read_run(run_dir),
                               max_prompt_tokens=EVAL_PROMPT_TOKENS)


def run_way(way: str, gen, projector, embeddings, jobs, new_batch: int) -> tuple[float, float, list[str]]:
    """(wall seconds, CPU seconds of this process, answers) of one way."""
    patches = next(iter(embeddings.values())).shape[0]
    started, cpu = time.perf_counter(), time.process_time()
    if way.startswith("new"):
        answers = answer_all(gen, projector, embeddings, jobs, patches, new_batch)
    else:
        batch = int(way.split("=")[1])
        captions = [j for j in jobs if j[3] == 40]
        answers = old_answers(gen, projector, embeddings, captions, patches, batch)
        answers += old_answers(gen, projector, embeddings, jobs[len(captions):], patches, batch)
    return time.perf_counter() - started, time.process_time() - cpu, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a finished run (jobs/finetune.py --out)")
    parser.add_argument("--data", required=True, type=Path, help="the jobs/preprocess.py output")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out images")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per batch of the new way")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--save", type=Path, default=None, help="write every way's answers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    embeddings, references, conversations = read_split(args.data, "val")
    keep = set(sorted(embeddings)[:args.limit])
    embeddings = {i: e for i, e in embeddings.items() if i in keep}
    num_patches, dim = next(iter(embeddings.values())).shape
    job_gen, projector, cfg = load_for_eval(args.run, dim, num_patches)
    jobs = all_jobs(embeddings, references, conversations, cfg.data.caption_prompt)
    ways = [w.strip() for w in args.ways.split(",")]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"--ways: unknown {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    print(f"{len(embeddings)} images, {len(jobs)} prompts, {args.threads} threads; the job's LM in "
          f"{next(job_gen.lm.parameters()).dtype}")
    results = {}
    for way in ways:
        gen = job_gen if way == "new" else way_generator(args.run, cfg, way)
        results[way] = run_way(way, gen, projector, embeddings, jobs, args.batch_size)
        print(f"  {way}: {results[way][0]:.1f} s", flush=True)
    if args.save is not None:
        args.save.write_text(json.dumps({way: answers for way, (_, _, answers) in results.items()}, indent=1))
    base_way = "old b=16" if "old b=16" in results else next(iter(results))
    base = results[base_way]
    single = results.get("old b=1", (0.0, 0.0, None))[2]
    new = results.get("new", (0.0, 0.0, None))[2]
    print(f"| way | seconds | vs {base_way} | CPU seconds | vs {base_way} | answers differing from old b=1 "
          "| from new |\n|---|---|---|---|---|---|---|")
    for way, (seconds, cpu, answers) in results.items():
        differ = ["-" if other is None else str(sum(a != b for a, b in zip(answers, other))) for other in (single, new)]
        print(f"| {way} | {seconds:.1f} | {seconds / base[0]:.2f} | {cpu:.1f} | {cpu / base[1]:.2f} | {differ[0]} "
              f"| {differ[1]} |")


if __name__ == "__main__":
    main()
