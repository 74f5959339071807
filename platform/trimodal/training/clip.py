"""Stage 0: train a tiny CLIP contrastively on caption data where no pretrained CLIP can be had.

The result is saved with `save_pretrained` (plus its word-level caption tokenizer) and then used, frozen,
through exactly the `CLIPVisionModel.from_pretrained` path a real TinyCLIP takes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPModel, PreTrainedTokenizerFast

from trimodal.config import TrimodalConfig, config_from_dict
from trimodal.data.formats import read_coco_captions
from trimodal.data.readers import ordered_execution
from trimodal.files import publish_dir
from trimodal.models.vision import build_random_clip, normalise_pixels, preprocess_images, resize_crop
from trimodal.training.checkpoint import TrainState, load_optimizer_state, save_optimizer_state, save_weights
from trimodal.training.metrics import MetricsLog
from trimodal.training.scaffold import (StepReporter, check_resume, iterate_batches, lr_lambda, restored_checkpoint,
                                        run_config, scaling_config, start_worker, torch_config, worker_device)
from trimodal.training.step import bf16_autocast, optimizer_step, use_autocast

SPECIALS = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]  # ids 0..3, matching tiny_clip_config
MAX_TEXT_TOKENS = 32
PHRASE_SEPARATOR = " and "
"""Where stage 0's phrase-grounding term splits a caption into phrases."""
PHRASE_ATTENTION_SCALE = 10.0
"""Sharpness of a phrase's attention over the patch tokens (cosine similarities times this, then softmax)."""


def build_caption_tokenizer(captions: list[str]) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer over the caption vocabulary, wrapping captions in [BOS] ... [EOS]."""
    norm = normalizers.Sequence([normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    words = sorted({w for c in captions for w, _ in pre.pre_tokenize_str(norm.normalize_str(c))})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1),
                                                                                                 ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", model_max_length=MAX_TEXT_TOKENS)


def caption_rows(coco_root: Path, split: str) -> list[dict]:
    """One row per image of a COCO-layout split: its path and all its captions."""
    images, captions = read_coco_captions(coco_root / "annotations" / f"captions_{split}2017.json")
    by_image: dict[int, list[str]] = {}
    for c in captions:
        by_image.setdefault(c.image_id, []).append(c.caption)
    folder = coco_root / f"{split}2017"
    return [{"path": str(folder / images[i].file_name), "captions": json.dumps(by_image[i])}
            for i in sorted(by_image)]


class DecodeImages:
    """Ray Data batch function: image paths -> uint8 pixels [B, S, S, 3] (unreadable images are dropped)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict) -> dict:
        keep, pixels = [], []
        for i, path in enumerate(batch["path"]):
            try:
                img = Image.open(path).convert("RGB")
            except OSError as exc:
                print(f"[stage 0] skipping unreadable image {path}: {exc}", flush=True)
                continue
            pixels.append(resize_crop(img, self.size))  # [S, S, 3] uint8
            keep.append(i)
        return {"pixels": np.stack(pixels) if pixels else np.zeros((0, self.size, self.size, 3), np.uint8),
                "captions": np.asarray(batch["captions"])[keep]}


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S], exactly as the vision tower's preprocessing."""
    return normalise_pixels(pixels)


class ClipCollator:
    """Picks one caption per image (seeded), tokenises, normalises pixels.

    With `phrases`, each caption's phrases (`caption_phrases`) are tokenised after the captions in the same text
    batch, so one forward through the (possibly DDP-wrapped) model embeds both.
    """

    def __init__(self, tokenizer, seed: int, phrases: bool = False):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.phrases = phrases

    def __call__(self, batch: dict) -> dict:
        texts = [self.rng.choice(json.loads(c)) for c in batch["captions"]]
        phrases = [caption_phrases(t) for t in texts] if self.phrases else [[] for _ in texts]
        flat = [p for ps in phrases for p in ps]
        enc = self.tokenizer(texts + flat, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                             return_tensors="pt")
        return {"pixel_values": normalise(torch.as_tensor(batch["pixels"])), "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"], "texts": texts, "phrases": phrases}


def caption_phrases(caption: str) -> list[str]:
    """The caption's phrases: split at PHRASE_SEPARATOR ('a red circle and a blue square on a plain background'
    -> ['a red circle', 'a blue square on a plain background']). The shapes captions name one object per phrase."""
    return [p.strip() for p in caption.split(PHRASE_SEPARATOR) if p.strip()] or [caption]


def pooled_image_embeds(clip: CLIPModel, vision_hidden: torch.Tensor, pool: str) -> torch.Tensor:
    """Projected image embeddings [B, P] from the tower's last hidden state [B, 1 + N, D].

    "cls" is CLIP's own pooling. "mean" averages the patch tokens, the features the LM receives, so the contrastive
    loss trains exactly them: every patch token then carries what the caption says about the whole image.
    """
    pooled = vision_hidden[:, 0] if pool == "cls" else vision_hidden[:, 1:].mean(1)  # [B, D]
    return clip.visual_projection(clip.vision_model.post_layernorm(pooled))


def contrastive_loss(model: CLIPModel, batch: dict, pool: str = "cls") -> torch.Tensor:
    """Symmetric InfoNCE where identical captions in a batch count as positives of each other, plus the
    phrase-grounding term (`phrase_grounding_loss`) when the batch carries phrases.

    `model` may be DDP-wrapped; the one forward goes through the wrapper so gradients are synchronised. With several
    workers every image is contrasted with every worker's captions (`gather_rows`), so W workers of B rows train on
    the loss of one batch of W*B rows, as CLIP trains across GPUs.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    clip = getattr(model, "module", model)
    local = len(batch["texts"])
    workers = gather_objects([batch["texts"], batch.get("phrases", [])])  # per worker: its captions and phrases
    counts = [len(texts) for texts, _ in workers]
    texts = [t for worker_texts, _ in workers for t in worker_texts]
    captions = gather_rows(out.text_embeds[:local], counts)  # [B, P] normalised -> [W*B, P]
    phrases = out.text_embeds[local:]  # [K, P] normalised
    image = F.normalize(pooled_image_embeds(clip, out.vision_model_output.last_hidden_state, pool), dim=-1)  # [B, P]
    image = gather_rows(image, counts)  # [B, P] -> [W*B, P]
    logits = clip.logit_scale.exp() * image @ captions.t()  # [W*B, W*B]
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32, device=logits.device)
    loss = _symmetric_cross_entropy(logits, same)
    if any(ps for _, worker_phrases in workers for ps in worker_phrases):
        loss = loss + phrase_grounding_loss(clip, out.vision_model_output.last_hidden_state, phrases,
                                            batch["phrases"], [worker_phrases for _, worker_phrases in workers])
    return loss


def phrase_grounding_loss(clip: CLIPModel, vision_hidden: torch.Tensor, phrase_embeds: torch.Tensor,
                          phrases: list[list[str]], workers: list[list[list[str]]] | None = None) -> torch.Tensor:
    """Each caption phrase attends over an image's patch tokens; the attention-pooled patches must match the
    phrase (image <-> phrase InfoNCE over the batch; a phrase is positive for every image whose caption has it).

    The phrase "a yellow circle" can only pick out and match the yellow circle's patches if those patches say
    "circle" too, so every object's patch tokens learn its colour and its shape: what the LM needs to tell which
    colour belongs to which shape. vision_hidden [B, 1 + N, D]; phrase_embeds [K, P] normalised, in the order
    of the flattened `phrases` (per image). With several workers the InfoNCE runs over all workers' images and
    phrases, as `contrastive_loss` does; `workers` holds every worker's `phrases` (`gather_objects`).
    """
    local = [p for ps in phrases for p in ps]
    if len(local) != len(phrase_embeds):
        raise ValueError(f"{len(phrase_embeds)} phrase embeddings for {len(local)} phrases")
    patches = clip.visual_projection(clip.vision_model.post_layernorm(vision_hidden[:, 1:]))  # [B, N, P]
    workers = workers or [phrases]
    patches = gather_rows(F.normalize(patches, dim=-1), [len(w) for w in workers])  # [B, N, P] -> [W*B, N, P]
    phrase_embeds = gather_rows(phrase_embeds, [sum(map(len, w)) for w in workers])  # [K, P] -> [sum of K, P]
    phrases = [ps for w in workers for ps in w]
    flat = [p for ps in phrases for p in ps]
    attention = torch.softmax(PHRASE_ATTENTION_SCALE * torch.einsum("bnp,kp->bkn", patches, phrase_embeds), -1)
    pooled = F.normalize(torch.einsum("bkn,bnp->bkp", attention, patches), dim=-1)  # [B, K, P]
    logits = clip.logit_scale.exp() * (pooled * phrase_embeds[None]).sum(-1)  # [B, K]
    owned = [set(ps) for ps in phrases]
    has = torch.tensor([[p in own for p in flat] for own in owned], dtype=torch.float32, device=logits.device)
    return _symmetric_cross_entropy(logits, has)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every worker's rows in rank order, [R, ...] -> [sum of counts, ...]; worker i holds counts[i] rows.

    Each worker's own rows keep their autograd graph: the gather's backward sums the gradients every worker computes
    for them, W times the gradient of the one global loss, and DDP's mean over W workers then gives every weight the
    gradient a single worker would compute on all the rows. Without a process group of several workers: `local`.
    """
    if not _distributed():
        return local
    longest = max(counts)
    padded = F.pad(local, (0, 0) * (local.dim() - 1) + (0, longest - len(local)))  # [R, ...] -> [longest, ...]
    parts = dist_fn.all_gather(padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_objects(local: list) -> list[list]:
    """Every worker's list in rank order (the captions and phrases the gathered rows belong to): [local] alone
    without a process group of several workers."""
    if not _distributed():
        return [local]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def _symmetric_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean of row-wise and column-wise cross-entropy of logits [R, C] against 0/1 positives spread uniformly."""
    rows = positives / positives.sum(1, keepdim=True)
    cols = positives / positives.sum(0, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, rows) + F.cross_entropy(logits.t(), cols.t()))


def _save_clip(directory: Path, model, optimizer, scheduler, state: TrainState, cfg: TrimodalConfig) -> None:
    save_weights(model, directory / "clip.safetensors")
    save_optimizer_state(directory, optimizer, scheduler, state, cfg)


def clip_train_loop(config: dict) -> None:
    """Ray Train worker loop for stage 0."""
    cfg = config_from_dict(config["cfg"])
    stage, run_dir = cfg.stage0, Path(config["run_dir"])
    rank = start_worker(stage)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(config["tokenizer_dir"])
    model = build_random_clip(cfg.model.vision.random_shape, cfg.model.vision.image_size, len(tokenizer))
    model.set_attn_implementation(cfg.model.vision.stage0_attn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    state = TrainState()
    with restored_checkpoint() as ckpt_dir:
        if ckpt_dir:
            model.load_state_dict(load_file(str(ckpt_dir / "clip.safetensors")))
            state = load_optimizer_state(ckpt_dir, optimizer, scheduler)
    total = sum(p.numel() for p in model.parameters())
    log = MetricsLog(run_dir, enabled=rank == 0)
    log.start(0, total, total, state.step, stage.steps)
    wrapped = (ray.train.torch.prepare_model(model, move_to_device=worker_device())
               if ray.train.get_context().get_world_size() > 1 else model)
    batches = iterate_batches(ray.train.get_dataset_shard("train"), ClipCollator(tokenizer, stage.seed + rank,
                                                                              cfg.model.vision.stage0_phrases),
                              stage.batch_size, state, stage.seed)
    reporter = StepReporter(stage, log, scheduler, lambda d: _save_clip(d, model, optimizer, scheduler, state, cfg))
    autocast = use_autocast(stage, worker_device())
    while state.step < stage.steps:
        started = time.perf_counter()
        state.epoch, index, batch = next(batches)
        with bf16_autocast(autocast, worker_device()):
            loss = contrastive_loss(wrapped, batch, cfg.model.vision.stage0_pool)
        loss = optimizer_step(loss, model.parameters(), optimizer, scheduler)
        reporter.finish(state, index, loss, started, {"tokens": int(batch["attention_mask"].sum()),
                                                      "images": len(batch["texts"])})


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer, rows: list[dict], image_size: int, pool: str = "cls") -> float:
    """Top-1 image -> caption retrieval among all distinct held-out captions (correct: any of its captions).

    Images are embedded with the pooling stage 0 trained (`pooled_image_embeds`).
    """
    model.eval()
    candidates = sorted({c for r in rows for c in json.loads(r["captions"])})
    enc = tokenizer(candidates, padding=True, return_tensors="pt")
    text = F.normalize(_features(model.get_text_features(input_ids=enc["input_ids"],
                                                         attention_mask=enc["attention_mask"])), dim=-1)  # [C, P]
    hits = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        pixels = preprocess_images([Image.open(r["path"]) for r in chunk], image_size)
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state  # [B, 1 + N, D]
        image = F.normalize(pooled_image_embeds(model, hidden, pool), dim=-1)  # [B, P]
        best = (image @ text.t()).argmax(-1)  # [B]
        hits += sum(candidates[b] in json.loads(r["captions"]) for b, r in zip(best.tolist(), chunk))
    return hits / max(len(rows), 1)


def _readable(rows: list[dict]) -> list[dict]:
    keep = []
    for r in rows:
        try:
            with Image.open(r["path"]) as img:
                img.verify()
            keep.append(r)
        except OSError:
            print(f"[stage 0] held-out image unreadable, left out of the accuracy: {r['path']}", flush=True)
    return keep


def run_stage0(cfg: TrimodalConfig, coco_root: Path, out_dir: Path, resume: bool = False) -> Path:
    """Train the tiny CLIP with Ray Train; save OUT/tower (CLIPModel + tokenizer); print zero-shot accuracy."""
    import ray.data
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    check_resume(out_dir, resume)
    train_rows = caption_rows(coco_root, "train")
    val_rows = _readable(caption_rows(coco_root, "val"))
    tokenizer = build_caption_tokenizer([c for r in train_rows for c in json.loads(r["captions"])])
    tok_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    decode = DecodeImages(cfg.model.vision.image_size)
    with ordered_execution():  # the same blocks in the same order, so the same batches, however busy the machine
        train_ds = ray.data.from_items(train_rows, override_num_blocks=8).map_batches(decode, batch_size=64)
        train_ds = train_ds.materialize()
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        clip_train_loop, train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(out_dir.resolve()),
                                            "tokenizer_dir": str(tok_dir.resolve())},
        scaling_config=scaling_config(cfg.stage0), run_config=run_config(out_dir, cfg.stage0),
        torch_config=torch_config(cfg.stage0),
        datasets={"train": train_ds}, dataset_config=DataConfig(execution_options=ingest))
    result = trainer.fit()
    model = build_random_clip(cfg.model.vision.random_shape, cfg.model.vision.image_size, len(tokenizer))
    vision = cfg.model.vision
    baseline = zero_shot_accuracy(model, tokenizer, val_rows, vision.image_size, vision.stage0_pool)
    model.load_state_dict(load_file(str(Path(result.checkpoint.path) / "clip.safetensors")))
    accuracy = zero_shot_accuracy(model, tokenizer, val_rows, vision.image_size, vision.stage0_pool)
    print(f"[stage 0] zero-shot caption accuracy on {len(val_rows)} held-out images: {accuracy:.3f} "
          f"(random tower: {baseline:.3f})", flush=True)
    return save_tower(model, tokenizer, out_dir / "tower", {"zero_shot_accuracy": accuracy,
                                                           "random_baseline": baseline, "steps": cfg.stage0.steps,
                                                           "pool": vision.stage0_pool,
                                                           "phrases": vision.stage0_phrases,
                                                           "attn": vision.stage0_attn,
                                                           "held_out_images": len(val_rows)})


def save_tower(model: CLIPModel, tokenizer, tower_dir: Path, meta: dict) -> Path:
    """save_pretrained the CLIP model + tokenizer atomically, with stage0.json beside them."""
    with publish_dir(tower_dir) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / "stage0.json").write_text(json.dumps(meta, indent=2))
    return tower_dir
