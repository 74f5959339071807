"""Evaluation's batched decoding (shared prefills, rows leaving the batch) answers exactly as one prompt at a time."""

from __future__ import annotations

import torch

from trimodal.evaluation.batching import EvalPrompt, batch_chains, greedy_answers, prefix_chains, stems
from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.requests import SamplingParams
from trimodal.models.chat import IMAGE_MARKER, Turn

PATCHES = 4


def _conversation(image: int) -> list[Turn]:
    return [Turn("user", IMAGE_MARKER + f"What color is shape {image}?"), Turn("assistant", "It is red."),
            Turn("user", "How many shapes are there?"), Turn("assistant", "There are two shapes."),
            Turn("user", "Describe the image.")]


def _prompts(gen: TextGenerator) -> list[EvalPrompt]:
    """Per image: a caption prompt (its own group) and the three questions of one conversation."""
    prompts = []
    for image in range(3):
        caption = [Turn("user", IMAGE_MARKER + "Describe the image in one sentence.")]
        prompts.append(EvalPrompt(gen.encode(caption, PATCHES), image, ("caption", image), 11))
        turns = _conversation(image)
        for k in (1, 3, 5):
            prompts.append(EvalPrompt(gen.encode(turns[:k], PATCHES), image, f"conv{image}", 3 + 2 * k))
    return prompts


def test_batched_answers_equal_one_at_a_time(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    hidden = lm.config.hidden_size
    images = {i: torch.randn(1, PATCHES, hidden, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    prompts = _prompts(gen)
    single = [gen.generate([Prompt(p.input_ids, images[p.image])], [SamplingParams(max_tokens=p.max_tokens)])[0]
              for p in prompts]
    assert len({c.completion_tokens for c in single}) > 1  # rows finish at different steps and leave the batch
    for rows in (1, 5, 16):
        assert greedy_answers(gen, prompts, images.__getitem__, rows) == [c.text.strip() for c in single]


def test_conversation_turns_chain_and_an_image_shares_its_stem(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompts = _prompts(gen)
    chains = prefix_chains(prompts)
    assert sorted(chains) == [[0], [1, 2, 3], [4], [5, 6, 7], [8], [9, 10, 11]]
    assert list(batch_chains(chains, prompts, rows=8)) == [[[0], [1, 2, 3], [4], [5, 6, 7]], [[8], [9, 10, 11]]]
    heads = [prompts[k].input_ids[:-1] for k in (0, 3)]
    (image, length), again = stems(heads, [0, 0])
    assert image == 0 and again == (0, length)
    assert heads[0][:length] == heads[1][:length] and heads[0][length] != heads[1][length]


def test_a_prompt_that_is_not_a_prefix_gets_its_own_chain():
    prompts = [EvalPrompt([1, 2, 3], 0, "c", 4), EvalPrompt([1, 2, 3, 4, 5], 0, "c", 4),
               EvalPrompt([1, 9, 3, 4], 0, "c", 4), EvalPrompt([1, 2], 1, "c", 4)]
    assert sorted(prefix_chains(prompts)) == [[0, 1], [2], [3]]
