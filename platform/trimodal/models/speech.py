"""Speech recognition: transcribe 16 kHz mono float32 clips (see `trimodal.audio.decode_audio`) with openai-whisper.

`Transcriber` decodes deterministically (greedy, temperature 0, no fallback) and returns "" for silence instead of
Whisper's hallucinations. Clips over 30 s are cut at their quietest moments into <= 30 s pieces that are decoded as
one batch (openai-whisper's own sliding window dropped repeated sentences in our tests). Weights come from
`trimodal.weights.whisper_ct2` (safetensors + dims.json); nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from whisper.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer

from trimodal.audio import AudioError
from trimodal.models.init import seeded


def load_whisper_from_dir(path: str | Path, device: str | torch.device = "cpu") -> Whisper:
    """An openai-whisper model from `model.safetensors` + `dims.json` (as written by `convert_ct2_whisper`).

    Weights are loaded strictly and held in float32 (fp16 is applied per call on CUDA, as openai-whisper does).
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("dims.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; is {path} a converted Whisper directory?")
    dims = ModelDimensions(**json.loads((path / "dims.json").read_text()))
    model = Whisper(dims)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"), strict=True)
    return model.to(device).eval()


def build_random_whisper(seed: int = 0, width: int = 64, layers: int = 1) -> Whisper:
    """A tiny random multilingual Whisper (real vocabulary and audio shapes) for tests; seconds to build and run."""
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=max(1, width // 32),
                           n_audio_layer=layers, n_vocab=51865, n_text_ctx=448, n_text_state=width,
                           n_text_head=max(1, width // 32), n_text_layer=layers)
    with seeded(seed):
        model = Whisper(dims)
        # openai-whisper leaves the text positional embedding uninitialised (torch.empty): always loaded from a
        # checkpoint there. Here it must be set, or decoding reads garbage memory (NaN, non-deterministic).
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    return model.eval()


def _as_clip(audio: np.ndarray) -> np.ndarray:
    """Validate a decoded clip: 1-D, finite, float (returned as float32)."""
    if not np.issubdtype(np.asarray(audio).dtype, np.floating):
        raise AudioError(f"audio must be float samples in [-1, 1] (see decode_audio), not {np.asarray(audio).dtype}")
    clip = np.ascontiguousarray(audio, dtype=np.float32)
    if clip.ndim != 1:
        raise AudioError(f"audio must be 1-D mono 16 kHz samples (see decode_audio), got shape {clip.shape}")
    if not np.isfinite(clip).all():
        raise AudioError("the audio contains NaN or infinite samples")
    return clip


def split_on_pauses(clip: np.ndarray, max_samples: int = N_SAMPLES,
                    frame: int = SAMPLE_RATE // 10) -> list[np.ndarray]:
    """Cut a clip into pieces of at most `max_samples`, each cut at the quietest `frame` of the window's second half.

    Pieces are therefore between half and all of a Whisper window (15-30 s) long, except the last.
    """
    pieces, start = [], 0
    while clip.size - start > max_samples:
        low = start + max_samples // 2
        n = (start + max_samples - low) // frame
        energy = np.square(clip[low:low + n * frame].reshape(n, frame)).mean(axis=1)
        cut = low + int(energy.argmin()) * frame + frame // 2
        pieces.append(clip[start:cut])
        start = cut
    pieces.append(clip[start:])
    return pieces


class Transcriber:
    """Deterministic Whisper transcription of 16 kHz mono float32 clips of any length."""

    def __init__(self, model: Whisper, language: str | None = "en", max_new_tokens: int | None = None,
                 batch_size: int = 8, silence_dbfs: float = -60.0, no_speech_threshold: float = 0.6,
                 logprob_threshold: float = -1.0) -> None:
        """Wrap `model` (moved to its device beforehand).

        `language`: a Whisper code ('en') or name ('english'), or None to detect it. `max_new_tokens`: tokens per
        30 s window (default half the text context, as Whisper). Pieces whose peak is below `silence_dbfs` are
        silent. A window is dropped as no-speech when its no-speech probability exceeds `no_speech_threshold`
        and its mean log-probability is at most `logprob_threshold` (openai-whisper's rule).
        """
        if language is not None:
            language = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
            if language not in LANGUAGES:
                raise ValueError(f"unknown Whisper language {language!r} (use a code such as 'en', or None)")
        if language not in (None, "en") and not model.is_multilingual:
            raise ValueError(f"this Whisper model is English-only; language {language!r} is not available")
        self.model = model.eval()
        self.language = language
        self.max_new_tokens = max_new_tokens or model.dims.n_text_ctx // 2
        self.batch_size = batch_size
        self.silence_peak = 10 ** (silence_dbfs / 20)
        self.no_speech_threshold = no_speech_threshold
        self.logprob_threshold = logprob_threshold

    @property
    def fp16(self) -> bool:
        """Half precision only where it is supported and fast: CUDA."""
        return self.model.device.type == "cuda"

    def is_silent(self, clip: np.ndarray) -> bool:
        """Empty, or peak level below the silence threshold."""
        return clip.size == 0 or float(np.abs(clip).max()) < self.silence_peak

    def transcribe(self, audio: np.ndarray) -> str:
        """Transcript of one clip ("" for silence); clips over 30 s are cut at pauses and transcribed whole."""
        return self.transcribe_batch([audio])[0]

    @torch.no_grad()
    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Transcripts of several clips: all their <= 30 s pieces are decoded together, `batch_size` at a time."""
        owners, pieces = [], []
        for i, audio in enumerate(audios):
            for piece in split_on_pauses(_as_clip(audio)):
                if not self.is_silent(piece):
                    owners.append(i)
                    pieces.append(piece)
        texts: list[list[str]] = [[] for _ in audios]
        for start in range(0, len(pieces), self.batch_size):
            chunk = pieces[start:start + self.batch_size]
            for i, text in zip(owners[start:start + self.batch_size], self._decode(chunk)):
                texts[i].append(text)
        return [" ".join(t for t in parts if t) for parts in texts]

    def _mel(self, clip: np.ndarray) -> torch.Tensor:
        """Log-mel of one <= 30 s clip, computed and padded exactly as openai-whisper's `transcribe` does."""
        mel = log_mel_spectrogram(clip, self.model.dims.n_mels, padding=N_SAMPLES, device=self.model.device)
        return pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)

    def _decode(self, clips: list[np.ndarray]) -> list[str]:
        """One greedy decode (temperature 0, no fallback, no timestamps) of a batch of <= 30 s clips."""
        options = DecodingOptions(task="transcribe", language=self.language, temperature=0.0,
                                  sample_len=self.max_new_tokens, without_timestamps=True, fp16=self.fp16)
        results = self.model.decode(torch.stack([self._mel(c) for c in clips]), options)
        return [self._text(r) for r in results]

    def _text(self, result: DecodingResult) -> str:
        """The text of a decode, or "" when Whisper judges the window to hold no speech."""
        if result.no_speech_prob > self.no_speech_threshold and result.avg_logprob <= self.logprob_threshold:
            return ""
        tokenizer = get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                                  language=result.language or self.language, task="transcribe")
        return " ".join(tokenizer.decode([t for t in result.tokens if t < tokenizer.eot]).split())
