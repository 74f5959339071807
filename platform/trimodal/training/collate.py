"""Rows of the preprocessed Parquet tables -> padded training batches (right padding, answer-only labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trimodal.models.chat import IGNORE_INDEX, IMAGE_MARKER, Turn, encode_conversation


@dataclass
class Batch:
    """One training batch."""

    input_ids: torch.Tensor
    """[B, T] token ids with image placeholders."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens."""
    labels: torch.Tensor
    """[B, T] targets, IGNORE_INDEX elsewhere."""
    image_features: torch.Tensor | None
    """[n_images, N, D] CLIP features in order of appearance."""


def caption_turns(caption: str, prompt: str) -> list[Turn]:
    """Stage 1: the image and an instruction, answered by the caption."""
    return [Turn("user", IMAGE_MARKER + prompt), Turn("assistant", caption.strip())]


def conversation_turns(turns: list[dict], has_image: bool) -> list[Turn]:
    """Stage 2: the full multi-turn conversation; the image goes in front of the first user turn."""
    out = [Turn(t["role"], t["text"]) for t in turns]
    if has_image and out and out[0].role == "user":
        out[0] = Turn("user", IMAGE_MARKER + out[0].text)
    return out


def pad_batch(encoded: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded conversations to the longest one."""
    longest = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, enc in enumerate(encoded):
        n = len(enc.input_ids)
        ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        mask[row, :n] = 1
    return ids, mask, labels


class Collator:
    """Picklable collate function for `iter_torch_batches`: numpy column batches -> `Batch` tensors."""

    def __init__(self, tokenizer, num_patches: int, image_end_id: int, max_length: int, caption_prompt: str):
        self.tokenizer = tokenizer
        self.num_patches = num_patches
        self.image_end_id = image_end_id
        self.max_length = max_length
        self.caption_prompt = caption_prompt

    def __call__(self, rows: dict[str, Any]) -> Batch:
        embeddings = rows["embedding"]
        if "caption" in rows:
            convs = [caption_turns(c, self.caption_prompt) for c in rows["caption"]]
            has_image = [True] * len(convs)
        else:
            has_image = [e is not None for e in embeddings]
            convs = [conversation_turns(list(t), h) for t, h in zip(rows["turns"], has_image)]
        encoded = [encode_conversation(self.tokenizer, turns, self.num_patches, self.image_end_id,
                                       max_length=self.max_length) for turns in convs]
        ids, mask, labels = pad_batch(encoded, self.tokenizer.pad_token_id)
        images = [np.asarray(e, dtype=np.float32) for e, h in zip(embeddings, has_image) if h]
        features = torch.from_numpy(np.stack(images)) if images else None  # [n_images, N, D]
        return Batch(ids, mask, labels, features)
