"""Rows of the preprocessed Parquet tables -> padded training batches (right padding, answer-only labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trimodal.models.chat import IGNORE_INDEX, IMAGE_MARKER, Encoded, Turn, encode_conversation


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


@dataclass
class Example:
    """One encoded training row."""

    encoded: Encoded
    """Token ids and labels, image placeholders expanded."""
    features: np.ndarray | None
    """[N, D] the row's CLIP features (None: a text-only row)."""


class Collator:
    """Numpy column batches of the preprocessed tables -> `Batch` tensors, in two halves (`encode` rows, `collate`
    examples), so that the batch stream can regroup encoded rows by length in between."""

    def __init__(self, tokenizer, num_patches: int, image_end_id: int, max_length: int, caption_prompt: str):
        self.tokenizer = tokenizer
        self.num_patches = num_patches
        self.image_end_id = image_end_id
        self.max_length = max_length
        self.caption_prompt = caption_prompt

    def encode(self, rows: dict[str, Any]) -> list[Example]:
        """Numpy column batch (stage 1: caption rows, stage 2: conversation rows) -> one `Example` per row."""
        embeddings = rows["embedding"]
        if "caption" in rows:
            convs = [caption_turns(c, self.caption_prompt) for c in rows["caption"]]
            has_image = [True] * len(convs)
        else:
            has_image = [e is not None for e in embeddings]
            convs = [conversation_turns(list(t), h) for t, h in zip(rows["turns"], has_image)]
        return [Example(encode_conversation(self.tokenizer, turns, self.num_patches, self.image_end_id,
                                            max_length=self.max_length),
                        np.asarray(e, dtype=np.float32) if h else None)
                for turns, e, h in zip(convs, embeddings, has_image)]

    def collate(self, examples: list[Example]) -> Batch:
        """Right-padded batch of `examples`, their images stacked in order of appearance."""
        ids, mask, labels = pad_batch([e.encoded for e in examples], self.tokenizer.pad_token_id)
        images = [e.features for e in examples if e.features is not None]
        features = torch.from_numpy(np.stack(images)) if images else None  # [n_images, N, D]
        return Batch(ids, mask, labels, features)


def length_batches(examples: list[Example], batch_size: int, rng: np.random.Generator) -> list[list[Example]]:
    """Batches of similar length: `examples` sorted by token count, cut into `batch_size` runs (a shorter rest is
    dropped), the batches in an order `rng` shuffles, so that short and long batches interleave in training."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].encoded.input_ids))
    batches = [[examples[i] for i in order[start:start + batch_size]]
               for start in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[int(i)] for i in rng.permutation(len(batches))]
