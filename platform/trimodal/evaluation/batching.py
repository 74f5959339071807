"""Greedy answers for many evaluation prompts, decoded in batches that share prefills.

The questions of one conversation are asked after the same history: the prompt of each turn is a prefix of the
next turn's. Such prompts form a chain, and a chain is prefilled once (its longest prompt; see
`prefill_shared`): every question's row starts from its columns of that one cache. The chains of one image (its
caption prompt, its conversations) also share their stem, the image and the text before it, prefilled once.
Images are batched in order of length (little padding), and rows leave the batch as they finish (`decode_from`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Sequence

import torch

from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.generation import TextTracker, decode_from, prefill_shared
from trimodal.inference.requests import SamplingParams


@dataclass
class EvalPrompt:
    """One prompt to answer."""

    input_ids: list[int]
    """Chat-formatted prompt ids with image placeholders."""
    image: Hashable
    """Key of its image's projected embeddings."""
    group: Hashable
    """Prompts of one group (a conversation) may share a prefill when one's ids are a prefix of another's."""
    max_tokens: int
    """Most answer tokens."""


def prefix_chains(prompts: Sequence[EvalPrompt]) -> list[list[int]]:
    """Indices of `prompts` in chains, shortest first: each one's ids a prefix of the last one's, one image."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, p in enumerate(prompts):
        groups[p.group, p.image].append(k)
    chains = []
    for members in groups.values():
        members.sort(key=lambda k: len(prompts[k].input_ids))
        longest = prompts[members[-1]].input_ids
        chain = [k for k in members if longest[:len(prompts[k].input_ids)] == prompts[k].input_ids]
        chains.append(chain)
        chains += [[k] for k in members if k not in chain]
    return chains


def batch_chains(chains: list[list[int]], prompts: Sequence[EvalPrompt], rows: int) -> Iterator[list[list[int]]]:
    """Chains in batches of about `rows` prompts: an image's chains together (they share its stem), images in order
    of their longest prompt (little padding); a chain is never split."""
    by_image: dict[Hashable, list[list[int]]] = defaultdict(list)
    for chain in chains:
        by_image[prompts[chain[0]].image].append(chain)
    units = sorted(by_image.values(), key=lambda u: (max(len(prompts[c[-1]].input_ids) for c in u), min(u)))
    batch: list[list[int]] = []
    for unit in units:
        if batch and sum(len(c) for c in batch) + sum(len(c) for c in unit) > rows:
            yield batch
            batch = []
        batch += unit
    if batch:
        yield batch


def stems(heads: Sequence[list[int]], images: Sequence[Hashable]) -> list[tuple[Hashable, int]]:
    """(image, length) per head: the heads of one image share their common prefix, less each head's last id."""
    common: dict[Hashable, int] = {}
    for ids, image in zip(heads, images):
        first = next(i for i, other in zip(heads, images) if other == image)
        same = next((k for k, (a, b) in enumerate(zip(ids, first)) if a != b), min(len(ids), len(first)))
        common[image] = min(common.get(image, same), same, len(ids) - 1)
    return [(image, common[image]) for image in images]


@torch.no_grad()
def greedy_answers(generator: TextGenerator, prompts: Sequence[EvalPrompt],
                   images: Callable[[Hashable], torch.Tensor], rows: int,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """The greedy answer (stripped) to every prompt; `images(key)` gives an image's projected embeddings."""
    answers = [""] * len(prompts)
    done = 0
    for batch in batch_chains(prefix_chains(prompts), prompts, rows):
        longest = [prompts[c[-1]] for c in batch]
        heads = [generator.embed(Prompt(p.input_ids, images(p.image))) for p in longest]  # [T, H] each
        members = [(i, k) for i, chain in enumerate(batch) for k in chain]
        shared = stems([p.input_ids[:-1] for p in longest], [p.image for p in longest])
        state = prefill_shared(generator.lm, heads, [(i, len(prompts[k].input_ids)) for i, k in members], shared)
        params = [SamplingParams(max_tokens=prompts[k].max_tokens) for _, k in members]
        tokens: list[list[int]] = [[] for _ in members]
        for step in decode_from(generator.lm, state, params, generator.eos_ids):
            for row, token in step.tokens:
                if token >= 0:
                    tokens[row].append(token)
        for (_, k), ids in zip(members, tokens):
            answers[k] = answer_text(generator.tokenizer, ids).strip()
        done += len(members)
        if progress is not None:
            progress(done)
    return answers


def answer_text(tokenizer, ids: list[int]) -> str:
    """The text `TextGenerator.generate` makes of these tokens (no stop strings)."""
    tracker = TextTracker(tokenizer)
    for token in ids:
        tracker.add(token)
    return tracker.text
