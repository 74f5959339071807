"""What the language model is asked: the sampling settings of one request, the request the serving LanguageModel
takes, and the longest prompt it accepts. Plain data (numpy at most): the HTTP ingress builds these without
importing torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trimodal.config import TrimodalConfig
from trimodal.models.chat import Turn

PROMPT_LENGTH_FACTOR = 8
"""A prompt at inference may be this many times the training sequence length (data.max_length) in tokens."""


def prompt_token_limit(cfg: TrimodalConfig, context_length: int | None = None) -> int:
    """The longest prompt, in tokens, the CLI engine and the serving LanguageModel take for this config: at most
    PROMPT_LENGTH_FACTOR x data.max_length, and short enough to leave the model's `context_length` positions (its
    max_position_embeddings; Phi-2: 2,048) room for one answer token."""
    limit = cfg.data.max_length * PROMPT_LENGTH_FACTOR
    return limit if context_length is None else min(limit, context_length - 1)


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


@dataclass(frozen=True)
class RunBundle:
    """A finished run a request is answered with: its projector and tower (Vision) and its LoRA adapter (LM)."""

    name: str
    """What clients call it: the run's directory relative to the runs directory (`demo/finetune`)."""
    directory: str
    """The run's final/ directory on the server (absolute; never shown to clients)."""
    adapter: str | None = None
    """Its LoRA adapter directory (absolute), None when the run trained no adapter (stage 1 only)."""
    version: int = 0
    """run.json's modification time (ns): a run finished again at the same place is loaded afresh."""


@dataclass
class GenerationRequest:
    """What the ingress sends the LanguageModel: rendered turns, image embeddings in marker order, sampling."""

    turns: list[Turn]
    image_embeds: list[np.ndarray]
    """One [N, H] float32 array per image, in the order of the turns' image markers."""
    params: SamplingParams
    transcripts: list[str] = field(default_factory=list)
    run: RunBundle | None = None
    """The run whose adapter answers; None: the base LM, no adapter."""
