"""Evaluate a finished run on the held-out split of the preprocessed data.

Captions: BLEU-1..4 and CIDEr-D against all reference captions of each held-out image. Conversations: every
assistant turn is answered from its history (earlier reference answers kept) and scored per question type.
The precomputed embeddings are reused, so evaluation sees exactly the tower the run was trained with.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from trimodal.evaluation.caption_metrics import cider_d, corpus_bleu
from trimodal.evaluation.scoring import answer_correct, question_type
from trimodal.evaluation.batching import EvalPrompt, greedy_answers
from trimodal.inference.engine import TextGenerator
from trimodal.models.chat import IMAGE_MARKER, Turn
from trimodal.models.multimodal import project_image_features
from trimodal.runs import load_projector, load_text_generator, read_run, read_run_config

EVAL_PROMPT_TOKENS = 4096
"""The longest prompt evaluation tokenises (TextGenerator's default; the serving limit `prompt_token_limit` is not
applied here)."""


def load_for_eval(run_dir: Path, vision_dim: int, num_patches: int, device: str = "cpu"):
    """(generator, projector, cfg) of a finished run; the projector takes the precomputed tower features
    ([num_patches, vision_dim] per image)."""
    run = read_run(run_dir)
    cfg = read_run_config(run)
    generator = load_text_generator(cfg, run, device, max_prompt_tokens=EVAL_PROMPT_TOKENS, merge_adapter=True)
    projector, _ = load_projector(run, vision_dim, generator.lm.config.hidden_size,
                                  positions=cfg.model.projector_positions_for(num_patches))
    return generator, projector.to(device).eval(), cfg


def answer_all(generator: TextGenerator, projector, embeddings: dict[int, np.ndarray],
               jobs: list[tuple[list[Turn], int, object, int]], num_patches: int, batch_size: int) -> list[str]:
    """Greedy answers for (turns, image id, conversation, max_tokens) jobs, about `batch_size` decoded together."""
    prompts = [EvalPrompt(generator.encode(turns, num_patches), image, group, max_tokens)
               for turns, image, group, max_tokens in jobs]
    projected: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def image_embeds(image: int) -> torch.Tensor:
        if image not in projected:
            feats = torch.from_numpy(np.asarray(embeddings[image], dtype=np.float32))  # [N, D]
            projected[image] = project_image_features(projector, feats.unsqueeze(0))  # [1, N, D] -> [1, N, H]
        return projected[image]

    def progress(done: int) -> None:
        print(f"[evaluate] {done}/{len(jobs)} answers", flush=True)

    return greedy_answers(generator, prompts, image_embeds, batch_size, progress)


def caption_jobs(embeddings: dict[int, np.ndarray], references: dict[int, list[str]], prompt: str) -> list[tuple]:
    """(turns, image id, group, max_tokens) of each held-out image's caption prompt, by image id."""
    ids = sorted(i for i in references if i in embeddings)
    return [([Turn("user", IMAGE_MARKER + prompt)], i, ("caption", i), 40) for i in ids]


def caption_scores(jobs: list[tuple], preds: list[str], references: dict[int, list[str]]) -> tuple[dict, list[dict]]:
    """BLEU and CIDEr-D of the generated captions, and the per-image predictions."""
    ids = [image for _, image, _, _ in jobs]
    hyps = dict(zip(ids, preds))
    refs = {i: references[i] for i in ids}
    metrics = corpus_bleu(hyps, refs) if ids else {}
    metrics["CIDEr-D"] = cider_d(hyps, refs)[0] if len(ids) > 1 else 0.0
    metrics["images"] = len(ids)
    rows = [{"kind": "caption", "image_id": i, "predicted": hyps[i], "references": refs[i]} for i in ids]
    return metrics, rows


def question_jobs(conversations: list[dict]) -> list[dict]:
    """One job per assistant turn: its history (with reference answers), question, reference, type and phrasing set
    (seen / held_out for the shapes set's own wordings, else None)."""
    from trimodal.evaluation.scoring import question_phrasing

    jobs = []
    for conv in conversations:
        turns = [Turn(t["role"], t["text"]) for t in conv["turns"]]
        if turns and turns[0].role == "user":
            turns[0] = Turn("user", IMAGE_MARKER + turns[0].text)
        for k, turn in enumerate(turns):
            if turn.role == "assistant" and k > 0:
                question = conv["turns"][k - 1]["text"]
                jobs.append({"id": conv["id"], "image_id": conv["image_id"], "history": turns[:k],
                             "question": question, "reference": turn.text, "type": question_type(question),
                             "phrasing": question_phrasing(question), "first_turn": k == 1})
    return jobs


def image_objects(references: dict[int, list[str]]) -> dict[int, int]:
    """Shapes on each image: the most any of its reference captions names (every shapes-set caption names every
    shape); 0 where none names a shape (real COCO)."""
    from trimodal.evaluation.scoring import described_objects

    return {image: max((sum(described_objects(r).values()) for r in refs), default=0)
            for image, refs in references.items()}


def conversation_scores(jobs: list[dict], preds: list[str],
                        objects_by_image: dict[int, int] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy per question type of the answers to `question_jobs`, and the per-question predictions.

    Later turns are answered after the reference answers of earlier ones, which can give the answer away ("Describe
    the image." names every shape's colour), so each type also reports `first_turn`: the questions that open their
    conversation, answered from the image alone, split by the wording's phrasing set (seen in training or held
    out). Each type also reports `two_objects`: its accuracy on images with two shapes, which is where colour must
    be bound to the right shape or side. The shapes on each image come from `objects_by_image` (`image_objects`);
    without it, only `describe` is split, by the shapes its reference names.
    """
    from trimodal.evaluation.scoring import described_objects

    tally: dict[tuple[str, bool, str | None, int], list[int]] = defaultdict(lambda: [0, 0])
    rows = []
    for job, pred in zip(jobs, preds):
        ok = answer_correct(job["type"], pred, job["reference"])
        phrasing = job.get("phrasing")
        if ok is not None:
            if objects_by_image is not None:
                objects = objects_by_image.get(job["image_id"], 0)
            else:
                objects = sum(described_objects(job["reference"]).values()) if job["type"] == "describe" else 0
            tally[job["type"], job["first_turn"], phrasing, objects][0] += int(ok)
            tally[job["type"], job["first_turn"], phrasing, objects][1] += 1
        rows.append({"kind": "question", "id": job["id"], "image_id": job["image_id"], "type": job["type"],
                     "question": job["question"], "phrasing": phrasing, "first_turn": job["first_turn"],
                     "predicted": pred, "reference": job["reference"], "correct": ok})
    return _accuracies(tally), rows


def _cell(tally: dict, qtype: str, first: bool | None = None, phrasing: str | None = None,
          objects: int | None = None) -> dict:
    """{accuracy, correct, total} of the tally entries of `qtype` that match every filter given."""
    correct = total = 0
    for (kind, is_first, said, n), (c, t) in tally.items():
        if kind == qtype and first in (None, is_first) and phrasing in (None, said) and objects in (None, n):
            correct, total = correct + c, total + t
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total}


def _accuracies(tally: dict[tuple[str, bool, str | None, int], list[int]]) -> dict:
    """{type: {accuracy, correct, total, first_turn: {accuracy, correct, total, seen: {...}, held_out: {...}}}} from
    (type, first turn, phrasing set, objects on the image) tallies; a type asked about two-shape images adds
    two_objects: {accuracy, correct, total, first_turn}."""
    out = {}
    for qtype in sorted({key[0] for key in tally}):
        row = _cell(tally, qtype)
        row["first_turn"] = {**_cell(tally, qtype, True), "seen": _cell(tally, qtype, True, "seen"),
                             "held_out": _cell(tally, qtype, True, "held_out")}
        two = _cell(tally, qtype, objects=2)
        if two["total"]:
            row["two_objects"] = {**two, "first_turn": _cell(tally, qtype, True, objects=2)}
        out[qtype] = row
    return out


def _shown(cell: dict) -> str:
    return f"{cell['accuracy']:.3f}" if cell["accuracy"] is not None else "-"


def print_table(result: dict) -> None:
    """A small table of everything measured: per question type all turns, first turns, and first turns of seen and
    of held-out wordings, then the same type on two-shape images only; all types together."""
    cap = result["captions"]
    print(f"\n{'metric':<24}{'value':>8}{'n':>6}{'first turn':>12}{'n':>6}{'seen':>8}{'n':>6}{'held-out':>10}{'n':>6}")
    for key in ("BLEU-1", "BLEU-4", "CIDEr-D"):
        if key in cap:
            print(f"{'captions ' + key:<24}{cap[key]:>8.4f}{cap['images']:>6}")
    totals = {"all": [0, 0], "first": [0, 0], "seen": [0, 0], "held_out": [0, 0]}
    for qtype, row in result["questions"].items():
        first = row["first_turn"]
        cells = [row, first, first.get("seen"), first.get("held_out")]
        print(f"{'accuracy ' + qtype:<24}" + "".join(_columns(cells)))
        for name, cell in zip(totals, cells):
            if cell is not None:
                totals[name][0] += cell["correct"]
                totals[name][1] += cell["total"]
        if "two_objects" in row:
            two = row["two_objects"]
            print(f"{'  ' + qtype + ' 2 objects':<24}" + "".join(_columns([two, two["first_turn"]])))
    if result["questions"]:
        cells = [{"accuracy": c / t if t else None, "correct": c, "total": t} for c, t in totals.values()]
        print(f"{'accuracy all types':<24}" + "".join(_columns(cells)))


def _columns(cells: list[dict | None]) -> list[str]:
    """Table cells (accuracy, n) at the widths of print_table's header."""
    widths = [(8, 6), (12, 6), (8, 6), (10, 6)]
    out = []
    for cell, (a, n) in zip(cells, widths):
        out.append(f"{_shown(cell):>{a}}{cell['total']:>{n}}" if cell is not None else f"{'-':>{a}}{'-':>{n}}")
    return out


def read_split(data_dir: Path, split: str) -> tuple[dict[int, np.ndarray], dict[int, list[str]], list[dict]]:
    """(embeddings by image id, reference captions by image id, conversations) of one split."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor extension type, so embeddings read as arrays)

    from trimodal.data.readers import read_manifest, read_rows

    read_manifest(data_dir)
    images = pq.read_table(data_dir / "images", columns=["image_id", "embedding"], filters=[("split", "==", split)])
    arrays = images["embedding"].combine_chunks().to_numpy()  # [n, N, D] float16
    embeddings = dict(zip(images["image_id"].to_pylist(), arrays))
    references: dict[int, list[str]] = defaultdict(list)
    for row in read_rows(data_dir, "captions", split, ["image_id", "caption"]).to_pylist():
        references[row["image_id"]].append(row["caption"])
    conversations = read_rows(data_dir, "conversations", split, ["id", "image_id", "turns"]).to_pylist()
    return embeddings, dict(references), [c for c in conversations if c["image_id"] is not None]


def evaluate_run(run_dir: Path, data_dir: Path, split: str = "val", limit: int | None = None,
                 batch_size: int = 128, device: str = "cpu") -> dict:
    """Evaluate a run on `split`; write RUN/eval.json and RUN/predictions.jsonl; return the result."""
    started = time.perf_counter()
    embeddings, references, conversations = read_split(data_dir, split)
    if limit is not None:
        keep = set(sorted(embeddings)[:limit])
        embeddings = {i: e for i, e in embeddings.items() if i in keep}
    num_patches, dim = next(iter(embeddings.values())).shape
    gen, projector, cfg = load_for_eval(run_dir, dim, num_patches, device)
    to_caption = caption_jobs(embeddings, references, cfg.data.caption_prompt)
    asked = [j for j in question_jobs(conversations) if j["image_id"] in embeddings]
    preds = answer_all(gen, projector, embeddings, to_caption + [(j["history"], j["image_id"], j["id"], 32)
                                                                 for j in asked], num_patches, batch_size)
    captions, cap_rows = caption_scores(to_caption, preds[:len(to_caption)], references)
    questions, q_rows = conversation_scores(asked, preds[len(to_caption):], image_objects(references))
    result = {"run": str(run_dir), "data": str(data_dir), "split": split, "captions": captions,
              "questions": questions, "seconds": round(time.perf_counter() - started, 1)}
    out = run_dir
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    with (out / "predictions.jsonl").open("w") as fh:
        for row in cap_rows + q_rows:
            fh.write(json.dumps(row) + "\n")
    return result
