"""KV-cache generation over a batch of prompts given as embeddings (left padded), with streaming.

`decode_steps` is the single decoding loop: the prompt is prefilled once, then every step feeds only the new
token against the cache, with an attention mask that hides the left padding. `TextTracker` turns the token
stream of one sequence into text deltas and applies stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


@dataclass
class SamplingParams:
    """How one request is decoded."""

    max_tokens: int = 128
    """Most new tokens."""
    temperature: float = 0.0
    """0 is greedy; higher is more random."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer (not included in it)."""
    seed: int | None = None
    """Seed for sampling; None draws one."""


@dataclass
class StepOutput:
    """Tokens produced in one decoding step: (row, token id) for each row still running."""

    tokens: list[tuple[int, int]] = field(default_factory=list)


def left_pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T_i, H] prompts -> embeds [B, T, H], attention mask [B, T], position ids [B, T] (left padded)."""
    longest = max(p.shape[0] for p in prompts)
    hidden = prompts[0].shape[-1]
    embeds = prompts[0].new_zeros(len(prompts), longest, hidden)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        embeds[row, longest - prompt.shape[0]:] = prompt
        mask[row, longest - prompt.shape[0]:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds, mask, positions


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row: greedy where temperature is 0, else temperature + top-p sampling."""
    picks = logits.argmax(-1)
    for row, p in enumerate(params):
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        picks[row] = torch.multinomial(probs, 1, generator=generators[row]).item()
    return picks


def _generators(params: Sequence[SamplingParams], device: torch.device) -> list[torch.Generator | None]:
    gens: list[torch.Generator | None] = []
    for p in params:
        if p.temperature <= 0:
            gens.append(None)
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        gens.append(gen)
    return gens


@torch.no_grad()
def decode_steps(lm, prompts: Sequence[torch.Tensor], params: Sequence[SamplingParams],
                 eos_ids: set[int], cancelled: set[int] | None = None) -> Iterator[StepOutput]:
    """Yield the new tokens of every running row at each step until each row hits EOS or its max_tokens.

    A row whose index the caller puts into `cancelled` (a stop string, a client gone) stops at the next step;
    the loop ends as soon as no row is running.
    """
    cancelled = cancelled if cancelled is not None else set()
    embeds, mask, positions = left_pad(prompts)
    gens = _generators(params, embeds.device)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    running = [p.max_tokens > 0 for p in params]
    counts = [0] * len(params)
    next_pos = positions[:, -1:] + 1
    while any(running):
        picks = sample_next(out.logits[:, -1], params, gens)
        step = StepOutput()
        for row, token in enumerate(picks.tolist()):
            running[row] = running[row] and row not in cancelled
            if not running[row]:
                continue
            counts[row] += 1
            if token in eos_ids:
                running[row] = False
                step.tokens.append((row, -1))  # -1: this row finished on EOS
                continue
            step.tokens.append((row, token))
            running[row] = counts[row] < params[row].max_tokens
        yield step
        if not any(running):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = lm(input_ids=picks.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                 cache=out.cache, use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1


@torch.no_grad()
def greedy_without_cache(lm, prompt: torch.Tensor, max_tokens: int, eos_ids: set[int]) -> list[int]:
    """The seed's way: re-run the whole sequence every token (no KV cache). For tests and benchmarks."""
    embed = lm.get_input_embeddings()
    seq = prompt.unsqueeze(0)  # [T, H] -> [1, T, H]
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = lm(inputs_embeds=seq, use_cache=False).logits[:, -1]
        token = int(logits.argmax(-1))
        if token in eos_ids:
            break
        tokens.append(token)
        new = embed(torch.tensor([[token]], device=seq.device)).to(seq.dtype)  # [1, 1, H]
        seq = torch.cat([seq, new], dim=1)
    return tokens


class TextTracker:
    """Token ids of one sequence -> text deltas, holding back partial UTF-8 and possible stop-string prefixes."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (maybe empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        self.text = text
        for s in self.stop:
            cut = text.find(s)
            if cut != -1:
                self.stopped = True
                self.text = text[:cut]
                return self._flush(len(self.text))
        return self._flush(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Text not shown yet, at the end of the sequence."""
        return self._flush(len(self.text))

    def _held_back(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def _flush(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
