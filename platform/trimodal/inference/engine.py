"""The in-process inference engine: messages -> prompt -> KV-cache generation -> text (batched, streaming).

Three parts that serving runs as separate deployments and the CLI runs in one process:
`ImageEncoder` (CLIP tower + projector), `Speech` (Whisper) and `TextGenerator` (LM + tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image

from trimodal.inference.generation import SamplingParams, TextTracker, decode_steps
from trimodal.inference.messages import MediaLimits, ParsedRequest, parse_messages
from trimodal.models.chat import Turn, encode_conversation
from trimodal.models.multimodal import merge_image_embeds
from trimodal.models.projector import Projector
from trimodal.models.vision import VisionTower


class ImageEncoder:
    """Frozen CLIP tower + projector: PIL images -> LM-space embeddings [n, N, H]."""

    def __init__(self, tower: VisionTower, projector: Projector, trained: bool):
        self.tower = tower
        self.projector = projector.eval().requires_grad_(False)
        self.trained = trained

    @property
    def num_patches(self) -> int:
        return self.tower.info.num_patches

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        features = self.tower.encode_images(images)  # [n, N, Dv]
        param = next(self.projector.parameters())
        return self.projector(features.to(param.device, param.dtype))  # [n, N, Dv] -> [n, N, H]


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


class TextGenerator:
    """LM + tokenizer: turns -> prompt ids, and batched KV-cache decoding with text deltas."""

    def __init__(self, lm, tokenizer, image_end_id: int, max_length: int = 4096):
        self.lm = lm
        self.tokenizer = tokenizer
        self.image_end_id = image_end_id
        self.max_length = max_length
        self.eos_ids = {tokenizer.eos_token_id}

    def encode(self, turns: list[Turn], num_patches: int) -> list[int]:
        """Chat-formatted prompt ids ending with the assistant generation prompt."""
        enc = encode_conversation(self.tokenizer, turns, num_patches, self.image_end_id, add_generation_prompt=True)
        if len(enc.input_ids) > self.max_length:
            raise ValueError(f"prompt is {len(enc.input_ids)} tokens, over the limit of {self.max_length}")
        return enc.input_ids

    @torch.no_grad()
    def embed(self, prompt: Prompt) -> torch.Tensor:
        """Prompt -> inputs_embeds [T, H] with the images merged in."""
        table = self.lm.get_input_embeddings()
        ids = torch.tensor([prompt.input_ids], device=table.weight.device)  # [1, T]
        embeds = merge_image_embeds(table(ids.clamp(min=0)), ids, _to(prompt.image_embeds, table.weight))
        return embeds[0]  # [1, T, H] -> [T, H]

    def stream(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
               cancelled: set[int] | None = None) -> Iterator[Delta]:
        """Decode all prompts together; yield text deltas, one final delta per row with its finish reason."""
        cancelled = cancelled if cancelled is not None else set()
        trackers = [TextTracker(self.tokenizer, p.stop) for p in params]
        counts = [0] * len(prompts)
        done = [False] * len(prompts)
        embeds = [self.embed(p) for p in prompts]
        for step in decode_steps(self.lm, embeds, params, self.eos_ids, cancelled):
            for row, token in step.tokens:
                if token == -1:
                    done[row] = True
                    yield Delta(row, trackers[row].finish(), "stop", counts[row])
                    continue
                counts[row] += 1
                text = trackers[row].add(token)
                if trackers[row].stopped:
                    cancelled.add(row)
                    done[row] = True
                    yield Delta(row, text, "stop", counts[row])
                elif counts[row] >= params[row].max_tokens:
                    done[row] = True
                    yield Delta(row, text + trackers[row].finish(), "length", counts[row])
                elif text:
                    yield Delta(row, text, None, counts[row])
        for row in range(len(prompts)):
            if not done[row]:  # cancelled by the caller, or max_tokens == 0
                yield Delta(row, trackers[row].finish(), "length" if row not in cancelled else "cancelled", counts[row])

    def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[Completion]:
        """Non-streaming batched generation."""
        texts = [""] * len(prompts)
        finals: dict[int, Delta] = {}
        for delta in self.stream(prompts, params):
            texts[delta.row] += delta.text
            if delta.finish_reason:
                finals[delta.row] = delta
        return [Completion(texts[i], finals[i].finish_reason, len(p.input_ids), finals[i].completion_tokens,
                           p.transcripts) for i, p in enumerate(prompts)]


def _to(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(like.device, like.dtype)


class Engine:
    """Everything in one process: the CLI, tests and the in-process benchmark use it."""

    def __init__(self, generator: TextGenerator, images: ImageEncoder | None, speech=None,
                 limits: MediaLimits | None = None):
        self.generator = generator
        self.images = images
        self.speech = speech
        self.limits = limits or MediaLimits()

    def prepare(self, messages: list[dict]) -> Prompt:
        """Parse, transcribe, encode images and tokenise one request."""
        parsed = parse_messages(messages, self.limits)
        return self.prepare_parsed(parsed)

    def prepare_parsed(self, parsed: ParsedRequest) -> Prompt:
        if parsed.audios and self.speech is None:
            raise ValueError("this engine has no speech model loaded")
        if parsed.images and self.images is None:
            raise ValueError("this engine has no vision model loaded")
        transcripts = [self.speech.transcribe(a) for a in parsed.audios] if parsed.audios else []
        image_embeds = self.images(parsed.images) if parsed.images else None
        num_patches = self.images.num_patches if self.images is not None else 0
        ids = self.generator.encode(parsed.turns(transcripts), num_patches)
        return Prompt(ids, image_embeds, transcripts)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """One request, non-streaming."""
        return self.generator.generate([self.prepare(messages)], [params or SamplingParams()])[0]


def build_engine(cfg, run_dir=None, device: str = "cpu", vision: bool = True, speech: bool = True) -> Engine:
    """Load the parts named by `cfg` (and a finished run's projector/adapter/tower) into an Engine."""
    from trimodal.models.bundle import load_lm_for_run, load_projector, load_speech, load_tower_for_run, read_run

    run = read_run(run_dir)
    lm, tokenizer, end_id = load_lm_for_run(cfg, run, device)
    generator = TextGenerator(lm, tokenizer, end_id, max_length=cfg.data.max_length * 8)
    encoder = None
    if vision:
        tower = load_tower_for_run(cfg, run, device)
        projector, trained = load_projector(run, tower.info.hidden_size, lm.config.hidden_size,
                                            cfg.model.projector_seed)
        encoder = ImageEncoder(tower, projector.to(device), trained)
    transcriber = load_speech(cfg.model.speech, device) if speech else None
    limits = MediaLimits(cfg.serving.max_image_pixels, cfg.serving.max_images, cfg.model.speech.max_seconds)
    return Engine(generator, encoder, transcriber, limits)
