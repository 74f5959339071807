"""KV-cache generation over a batch of prompts given as embeddings (left padded), with streaming.

`decode_steps` is the single decoding loop: the prompt is prefilled once, then every step feeds only the new
token against the cache, with an attention mask that hides the left padding. With `adapters` (one peft adapter
name per row, "__base__" for none) rows of different LoRA adapters share the batch: every forward, prefill and
decoding step alike, passes each remaining row's name as peft's `adapter_names`. `TextTracker` turns the token
stream of one sequence into text deltas and applies stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from trimodal.inference.requests import SamplingParams


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


@dataclass
class DecodeState:
    """A batch ready for its next decoding step: each row's next-token logits and its (left-padded) KV cache."""

    logits: torch.Tensor
    """[B, V] next-token logits of every row."""
    cache: object
    """The LM's KV cache of every row."""
    mask: torch.Tensor
    """[B, T] 1 where the cache holds a real token, 0 on left padding."""
    next_pos: torch.Tensor
    """[B, 1] position id of each row's next token."""


def adapter_kwargs(adapters: Sequence[str] | None, rows: Sequence[int]) -> dict:
    """peft's per-row `adapter_names` for the batch rows `rows` (original indices); nothing without adapters."""
    return {} if adapters is None else {"adapter_names": [adapters[r] for r in rows]}


def last_position(embeds: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for a prefill of `embeds` [B, T, H]: its last position as an index, so the LM head reads
    a contiguous [B, 1, H] copy. The integer form slices a strided view, and torch's CPU bf16 linear on that view
    copies the [H, V] head weight once per row (a third of a bf16 evaluation's time, in torch.profiler)."""
    return torch.tensor([embeds.shape[1] - 1], device=embeds.device)


@torch.no_grad()
def prefill(lm, prompts: Sequence[torch.Tensor], adapters: Sequence[str] | None = None) -> DecodeState:
    """Run the left-padded prompts [T_i, H] through the LM once; the state before their first new token."""
    embeds, mask, positions = left_pad(prompts)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=last_position(embeds), **adapter_kwargs(adapters, range(len(prompts))))
    return DecodeState(out.logits[:, -1], out.cache, mask, positions[:, -1:] + 1)


@torch.no_grad()
def prefill_shared(lm, prompts: Sequence[torch.Tensor], rows: Sequence[tuple[int, int]],
                   stems: Sequence[tuple[int, int]] | None = None) -> DecodeState:
    """One prefill for prompts that are prefixes of longer ones: row (i, n) decodes as if its prompt were
    prompts[i][:n].

    Attention is causal, so the cache of prompts[i]'s first n - 1 positions is the cache of prompts[i][:n - 1]:
    each prompt runs once (to the last position a row needs), each row takes its columns of that cache (left
    padded), and one step on each row's last prompt position gives its next-token logits. `stems[i]` = (stem id,
    length) says that prompts of one stem id begin with the same `length` positions (one image and the text
    before it, say); those run once for all of them.
    """
    if min(n for _, n in rows) < 2:
        raise ValueError("prefill_shared needs rows of at least 2 prompt positions")
    heads = [prompts[i][:max(n for j, n in rows if j == i) - 1] for i in range(len(prompts))]
    cache, columns = _prefill_heads(lm, heads, stems)
    source, cols, mask = _row_columns(rows, columns, heads[0].device)
    cache = DynamicCache([(_take(k, source, cols), _take(v, source, cols)) for k, v, *_ in cache])
    last = torch.stack([prompts[i][n - 1] for i, n in rows]).unsqueeze(1)  # [R, H] -> [R, 1, H]
    mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
    next_pos = torch.tensor([[n - 1] for _, n in rows], device=mask.device)  # [R, 1]
    out = lm(inputs_embeds=last, attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True,
             logits_to_keep=1)
    return DecodeState(out.logits[:, -1], out.cache, mask, next_pos + 1)


def _prefill_heads(lm, heads: list[torch.Tensor], stems: Sequence[tuple[int, int]] | None):
    """(KV cache of every head, the cache columns of each head's positions in order): the stems first, then the
    rest of each head, in groups of similar length."""
    if stems is None:
        embeds, mask, positions = left_pad(heads)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                 logits_to_keep=last_position(embeds))
        width = embeds.shape[1]
        return out.cache, [torch.arange(width - h.shape[0], width) for h in heads]
    if any(length < 1 or length >= h.shape[0] for (_, length), h in zip(stems, heads)):
        raise ValueError("a stem must be 1 to len(prompt) - 2 positions long")
    order = list(dict.fromkeys(s for s, _ in stems))  # stem ids, first seen first
    first = [next(i for i, (t, _) in enumerate(stems) if t == s) for s in order]
    stem_embeds, stem_mask, stem_pos = left_pad([heads[i][:stems[i][1]] for i in first])
    stem_out = lm(inputs_embeds=stem_embeds, attention_mask=stem_mask, position_ids=stem_pos, use_cache=True,
                  logits_to_keep=last_position(stem_embeds))
    width = stem_embeds.shape[1]
    index = torch.tensor([order.index(s) for s, _ in stems], device=stem_mask.device)  # [C] each head's stem
    stem_states = list(stem_out.cache)
    parts = []
    for group in _length_groups([h.shape[0] - length for (_, length), h in zip(stems, heads)]):
        rows = index[group]
        cache = DynamicCache([(k[rows], v[rows]) for k, v, *_ in stem_states])
        embeds, mask, positions = right_pad([heads[i][stems[i][1]:] for i in group], [stems[i][1] for i in group])
        out = lm(inputs_embeds=embeds, attention_mask=torch.cat([stem_mask[rows], mask], dim=1),
                 position_ids=positions, cache=cache, use_cache=True, logits_to_keep=last_position(embeds))
        parts.append((group, list(out.cache)))
    columns = [torch.cat([torch.arange(width - length, width), torch.arange(width, width + h.shape[0] - length)])
               for (_, length), h in zip(stems, heads)]
    return _join(parts, len(heads)), columns


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices in groups of similar length (the longest at most 1.25 times the shortest, plus 8)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and lengths[i] <= lengths[groups[-1][0]] * 1.25 + 8:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _join(parts: list[tuple[list[int], list]], count: int) -> DynamicCache:
    """Per-group caches -> one cache of all `count` heads in order (shorter groups padded on the right)."""
    width = max(states[0][0].shape[2] for _, states in parts)
    order = torch.tensor([i for group, _ in parts for i in group]).argsort()  # head -> its row in the cat
    layers = []
    for layer in range(len(parts[0][1])):
        joined = [torch.cat([pad_seq(states[layer][j], width) for _, states in parts])[order] for j in (0, 1)]
        layers.append((joined[0], joined[1]))
    return DynamicCache(layers)


def pad_seq(states: torch.Tensor, width: int) -> torch.Tensor:
    """Cache states [B, heads, T, d] -> [B, heads, width, d], zeros on the right."""
    return torch.nn.functional.pad(states, (0, 0, 0, width - states.shape[2]))


def right_pad(parts: Sequence[torch.Tensor], starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T_i, H] continuations -> embeds [B, T, H], attention mask [B, T], position ids from `starts` [B, T]
    (right padded: no real position follows a padded one)."""
    longest = max(p.shape[0] for p in parts)
    embeds = parts[0].new_zeros(len(parts), longest, parts[0].shape[-1])
    mask = torch.zeros(len(parts), longest, dtype=torch.long, device=parts[0].device)
    for row, part in enumerate(parts):
        embeds[row, :part.shape[0]] = part
        mask[row, :part.shape[0]] = 1
    positions = torch.tensor(list(starts), device=mask.device)[:, None] + torch.arange(longest, device=mask.device)
    return embeds, mask, positions


def _row_columns(rows: Sequence[tuple[int, int]], columns: list[torch.Tensor],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For row (i, n): its source head [R], the cache columns of its n - 1 cached positions right-aligned in
    [R, W] (W: the longest row's), and its attention mask [R, W] (0 on the left padding)."""
    keep = max(n for _, n in rows) - 1
    cols = torch.zeros(len(rows), keep, dtype=torch.long)
    mask = torch.zeros(len(rows), keep, dtype=torch.long)
    for r, (i, n) in enumerate(rows):
        cols[r, keep - (n - 1):] = columns[i][:n - 1]
        mask[r, keep - (n - 1):] = 1
    return torch.tensor([i for i, _ in rows], device=device), cols.to(device), mask.to(device)


def _take(states: torch.Tensor, source: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Cache states [P, heads, T, d] -> each row's columns [R, heads, W, d]."""
    picked = states[source[:, None], :, cols]  # [R, W, heads, d] (advanced indices first)
    return picked.transpose(1, 2).contiguous()  # [R, W, heads, d] -> [R, heads, W, d]


def decode_steps(lm, prompts: Sequence[torch.Tensor], params: Sequence[SamplingParams],
                 eos_ids: set[int], cancelled: set[int] | None = None,
                 adapters: Sequence[str] | None = None) -> Iterator[StepOutput]:
    """Yield the new tokens of every running row at each step until each row hits EOS or its max_tokens.

    A row whose index the caller puts into `cancelled` (a stop string, a client gone) stops at the next step;
    the loop ends as soon as no row is running. `adapters`: each row's peft adapter name ("__base__": none).
    """
    yield from decode_from(lm, prefill(lm, prompts, adapters), params, eos_ids, cancelled, adapters)


@torch.no_grad()
def decode_from(lm, state: DecodeState, params: Sequence[SamplingParams], eos_ids: set[int],
                cancelled: set[int] | None = None, adapters: Sequence[str] | None = None) -> Iterator[StepOutput]:
    """`decode_steps` from a prefilled state; rows keep their indices in `params` and `cancelled`.

    Rows that have finished leave the batch (and its KV cache) once they are a quarter of it, so the steps after
    them only compute the rows still running.
    """
    cancelled = cancelled if cancelled is not None else set()
    gens = _generators(params, state.logits.device)
    running = [p.max_tokens > 0 for p in params]
    counts = [0] * len(params)
    rows = list(range(len(params)))  # the original row of each batch position
    while any(running):
        picks = sample_next(state.logits, [params[r] for r in rows], [gens[r] for r in rows])
        yield _step(rows, picks.tolist(), running, counts, params, eos_ids, cancelled)
        if not any(running):
            break
        live = [k for k, r in enumerate(rows) if running[r]]
        if len(rows) - len(live) >= max(1, len(rows) // 4):
            state, picks = _keep_rows(state, live), picks[live]
            rows = [rows[k] for k in live]
        mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
        out = lm(input_ids=picks.unsqueeze(-1), attention_mask=mask, position_ids=state.next_pos,
                 cache=state.cache, use_cache=True, logits_to_keep=1, **adapter_kwargs(adapters, rows))
        state = DecodeState(out.logits[:, -1], out.cache, mask, state.next_pos + 1)


def _step(rows: list[int], picks: list[int], running: list[bool], counts: list[int],
          params: Sequence[SamplingParams], eos_ids: set[int], cancelled: set[int]) -> StepOutput:
    """Record one step's picks of the batch rows `rows` (original indices); update running and counts."""
    step = StepOutput()
    for row, token in zip(rows, picks):
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
    return step


def _keep_rows(state: DecodeState, keep: list[int]) -> DecodeState:
    """The state of the batch positions `keep` only (the cache's key/value tensors index-selected on dim 0)."""
    index = torch.tensor(keep, device=state.mask.device)
    state.cache.batch_select_indices(index)
    return DecodeState(state.logits[index], state.cache, state.mask[index], state.next_pos[index])


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
        # Leading whitespace is the chat template's separator after its generation prompt (Phi-2's "Output:" is
        # answered " The ..."), never part of the answer.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
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
