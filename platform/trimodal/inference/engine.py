"""The in-process inference engine: messages -> prompt -> KV-cache generation -> text (batched, streaming).

Three parts that serving runs as separate deployments and the CLI runs in one process: an `ImageEncoder`
(CLIP tower + projector, `trimodal.models.multimodal`), a Whisper `Transcriber` (`trimodal.models.speech`) and a
`TextGenerator` (LM + tokenizer, here). `trimodal.runs.load_engine` loads all three from a finished run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from trimodal.inference.generation import TextTracker, decode_steps
from trimodal.inference.messages import MediaLimits, ParsedRequest, parse_messages
from trimodal.inference.requests import SamplingParams
from trimodal.models.chat import Turn, encode_conversation
from trimodal.models.multimodal import ImageEncoder, merge_image_embeds


@dataclass
class Prompt:
    """A tokenised request, ready to decode."""

    input_ids: list[int]
    """Token ids with image placeholders."""
    image_embeds: torch.Tensor | None
    """Projected images [n, N, H], or None."""
    transcripts: list[str] = field(default_factory=list)
    """What the audio clips said."""


@dataclass
class Completion:
    """A finished answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    transcripts: list[str] = field(default_factory=list)


@dataclass
class Delta:
    """A streamed piece of one row's answer; `finish_reason` is set on its last delta."""

    row: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class PromptBuilder:
    """Turns -> prompt ids, and a prompt -> its merged text + image embeddings: the one way both engines (builtin
    and vllm) build what the LM reads."""

    def __init__(self, tokenizer, embeddings: torch.nn.Module, image_end_id: int, max_length: int = 4096,
                 context_length: int | None = None):
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.image_end_id = image_end_id
        self.context_length = context_length  # positions the model reads, prompt and answer together (None: any)
        self.max_length = max_length if context_length is None else min(max_length, context_length - 1)

    def encode(self, turns: list[Turn], num_patches: int) -> list[int]:
        """Chat-formatted prompt ids ending with the assistant generation prompt."""
        enc = encode_conversation(self.tokenizer, turns, num_patches, self.image_end_id, add_generation_prompt=True)
        if len(enc.input_ids) > self.max_length:
            within = f" (the model reads {self.context_length} positions)" if self.context_length else ""
            raise ValueError(f"prompt is {len(enc.input_ids)} tokens, over the limit of {self.max_length}{within}")
        return enc.input_ids

    def fit(self, prompt: Prompt, params: SamplingParams) -> SamplingParams:
        """`params` with max_tokens cut to the positions the model has left after the prompt: the answer then ends
        with finish_reason "length" where the context ends, never decoding past the positions it was trained on."""
        if self.context_length is None:
            return params
        room = self.context_length - len(prompt.input_ids)
        return params if params.max_tokens <= room else dataclasses.replace(params, max_tokens=max(room, 0))

    @torch.no_grad()
    def embed(self, prompt: Prompt) -> torch.Tensor:
        """Prompt -> inputs_embeds [T, H] with the images merged in."""
        table = self.embeddings
        ids = torch.tensor([prompt.input_ids], device=table.weight.device)  # [1, T]
        embeds = merge_image_embeds(table(ids.clamp(min=0)), ids, _to(prompt.image_embeds, table.weight))
        return embeds[0]  # [1, T, H] -> [T, H]


class RowText:
    """One row's answer as deltas: incremental text, stop strings, max_tokens and the finish reason (shared by both
    engines, so they stream and count alike). `completion_tokens` counts generated tokens, EOS excluded."""

    def __init__(self, row: int, tokenizer, params: SamplingParams):
        self.row = row
        self.tracker = TextTracker(tokenizer, params.stop)
        self.max_tokens = params.max_tokens
        self.count = 0
        self.done = False

    def token(self, token_id: int) -> Delta | None:
        """A new (non-EOS) token: its delta, or None while nothing new is safe to show."""
        self.count += 1
        text = self.tracker.add(token_id)
        if self.tracker.stopped:
            return self._final(text, "stop")
        if self.count >= self.max_tokens:
            return self._final(text + self.tracker.finish(), "length")
        return Delta(self.row, text, None, self.count) if text else None

    def eos(self) -> Delta:
        """The row ended on EOS."""
        return self._final(self.tracker.finish(), "stop")

    def end(self, cancelled: bool) -> Delta:
        """The row ended otherwise: cancelled by its caller, or max_tokens == 0."""
        return self._final(self.tracker.finish(), "cancelled" if cancelled else "length")

    def _final(self, text: str, reason: str) -> Delta:
        self.done = True
        return Delta(self.row, text, reason, self.count)


class TextGenerator:
    """LM + tokenizer: turns -> prompt ids, and batched KV-cache decoding with text deltas."""

    def __init__(self, lm, tokenizer, image_end_id: int, max_length: int = 4096):
        self.lm = lm
        self.tokenizer = tokenizer
        context = getattr(lm.config, "max_position_embeddings", None)
        self.prompts = PromptBuilder(tokenizer, lm.get_input_embeddings(), image_end_id, max_length, context)
        self.image_end_id = image_end_id
        self.max_length = self.prompts.max_length
        self.eos_ids = {tokenizer.eos_token_id}

    def encode(self, turns: list[Turn], num_patches: int) -> list[int]:
        """Chat-formatted prompt ids ending with the assistant generation prompt."""
        return self.prompts.encode(turns, num_patches)

    def embed(self, prompt: Prompt) -> torch.Tensor:
        """Prompt -> inputs_embeds [T, H] with the images merged in."""
        return self.prompts.embed(prompt)

    def stream(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
               cancelled: set[int] | None = None, adapters: Sequence[str] | None = None) -> Iterator[Delta]:
        """Decode all prompts together; yield text deltas, one final delta per row with its finish reason.

        `adapters`: each row's peft adapter name ("__base__": the base LM), when `lm` holds several.
        """
        cancelled = cancelled if cancelled is not None else set()
        params = [self.prompts.fit(prompt, p) for prompt, p in zip(prompts, params)]
        rows = [RowText(i, self.tokenizer, p) for i, p in enumerate(params)]
        embeds = [self.embed(p) for p in prompts]
        for step in decode_steps(self.lm, embeds, params, self.eos_ids, cancelled, adapters):
            for row, token in step.tokens:
                delta = rows[row].eos() if token == -1 else rows[row].token(token)
                if delta is not None and delta.finish_reason == "stop" and token != -1:
                    cancelled.add(row)  # a stop string: the decoder drops the row
                if delta is not None:
                    yield delta
        for row in rows:
            if not row.done:  # cancelled by the caller, or max_tokens == 0
                yield row.end(row.row in cancelled)

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Completion]:
        """Non-streaming batched generation."""
        return completions_from_deltas(self.stream(prompts, params), prompts)


def completions_from_deltas(deltas: Iterator[Delta], prompts: Sequence[Prompt]) -> list[Completion]:
    """Streamed deltas of every row -> one Completion per prompt."""
    texts = [""] * len(prompts)
    finals: dict[int, Delta] = {}
    for delta in deltas:
        texts[delta.row] += delta.text
        if delta.finish_reason:
            finals[delta.row] = delta
    return [Completion(texts[i], finals[i].finish_reason, len(p.input_ids), finals[i].completion_tokens,
                       p.transcripts) for i, p in enumerate(prompts)]


def _to(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(like.device, like.dtype)


def tokenize_prompt(generator: TextGenerator, turns: list[Turn], image_embeds: torch.Tensor | None,
                    transcripts: Sequence[str] = ()) -> Prompt:
    """The Prompt of rendered turns whose image markers take `image_embeds` [n, N, H] (ValueError: too long)."""
    num_patches = image_embeds.shape[1] if image_embeds is not None else 0
    return Prompt(generator.encode(turns, num_patches), image_embeds, list(transcripts))


class Engine:
    """Everything in one process: the CLI, tests and the in-process benchmark use it."""

    def __init__(self, generator: TextGenerator, image_encoder: ImageEncoder | None, transcriber=None,
                 limits: MediaLimits | None = None):
        self.generator = generator
        self.image_encoder = image_encoder
        self.transcriber = transcriber
        self.limits = limits or MediaLimits()

    def prepare(self, messages: list[dict]) -> Prompt:
        """Parse, transcribe, encode images and tokenise one request."""
        parsed = parse_messages(messages, self.limits)
        return self.prepare_parsed(parsed)

    def prepare_parsed(self, parsed: ParsedRequest) -> Prompt:
        if parsed.audios and self.transcriber is None:
            raise ValueError("this engine has no speech model loaded")
        if parsed.images and self.image_encoder is None:
            raise ValueError("this engine has no vision model loaded")
        transcripts = [self.transcriber.transcribe(a) for a in parsed.audios] if parsed.audios else []
        image_embeds = self.image_encoder(parsed.images) if parsed.images else None
        return tokenize_prompt(self.generator, parsed.turns(transcripts), image_embeds, transcripts)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """One request, non-streaming."""
        return self.generator.generate([self.prepare(messages)], [params or SamplingParams()])[0]
