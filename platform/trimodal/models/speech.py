"""Speech: decode audio bytes to 16 kHz mono float32, and transcribe it with openai-whisper.

`decode_audio` reads WAV, FLAC, OGG/Vorbis and MP3 through soundfile (libsndfile; no ffmpeg) and refuses audio
that is undecodable, empty or longer than a limit: the header is checked before decoding, and at most the limit
plus one frame is ever decoded, a second at a time. It mixes to mono and resamples with a Kaiser-windowed sinc
filter. `Speech` transcribes deterministically (greedy, temperature 0, no fallback) and returns "" for silence
instead of Whisper's hallucinations. Clips over 30 s are cut at their quietest moments into <= 30 s pieces that
are decoded as one batch (openai-whisper's own sliding window dropped repeated sentences in our tests). Weights
come from `whisper_convert` (safetensors + dims.json); nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from whisper.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer

from trimodal.models.init import seeded

MIN_RATE, MAX_RATE, MAX_CHANNELS = 1_000, 192_000, 32
UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when a stream's length is unknown


class AudioError(ValueError):
    """Audio that cannot be used: undecodable, empty, too long, or not finite. The message says which."""


def _sinc_kernels(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """Polyphase filter bank [new, 1, taps] resampling by new/orig, and the padding (input samples) it needs.

    Kernel p computes output phase p: a sinc low-pass at `rolloff` x the lower Nyquist, Kaiser-windowed over
    `zeros` zero crossings on each side (the construction torchaudio's `sinc_interp_kaiser` uses).
    """
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (idx[None, :] - torch.arange(new, dtype=torch.float64)[:, None] / new) * base  # in zero crossings
    ramp = (1 - (t / zeros) ** 2).clamp(min=0).sqrt()
    window = torch.i0(beta * ramp) / torch.i0(torch.tensor(beta, dtype=torch.float64))
    kernels = torch.where(t.abs() < zeros, torch.special.sinc(t) * window, 0.0) * (base / orig)
    return kernels[:, None, :].float(), width


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE, zeros: int = 32,
             rolloff: float = 0.945, beta: float = 10.0) -> np.ndarray:
    """Band-limited resampling of 1-D float audio (Kaiser-windowed sinc, ~95 dB stopband).

    The ratio is reduced to a fraction with denominator <= 1000 (exact for all common rates; odd rates are
    approximated to well under 0.01%), so the filter bank stays small.
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if rate_in == rate_out or audio.size == 0:
        return audio
    ratio = Fraction(rate_out, rate_in).limit_denominator(1000)
    new, orig = ratio.numerator, ratio.denominator
    kernels, width = _sinc_kernels(orig, new, zeros, rolloff, beta)
    x = F.pad(torch.from_numpy(audio)[None, None], (width, width + orig))
    y = F.conv1d(x, kernels, stride=orig)[0].T.reshape(-1)
    return y[: math.ceil(audio.size * new / orig)].numpy()


def _open_sound(data: bytes | str | Path) -> sf.SoundFile:
    """A SoundFile for bytes or a path; AudioError when libsndfile cannot parse it."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise AudioError("no audio data (0 bytes)")
        source = io.BytesIO(bytes(data))
    else:
        source = Path(data)
        if not source.is_file():
            raise FileNotFoundError(f"audio file {source} does not exist")
    try:
        return sf.SoundFile(source)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot decode the audio (supported: WAV, FLAC, OGG/Vorbis, MP3): {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """libsndfile's own message, without the Python object repr soundfile puts around it."""
    return str(getattr(exc, "error_string", None) or exc)


def _too_long(max_seconds: float, seconds: float | None = None) -> AudioError:
    length = f"{seconds:.1f} s long" if seconds is not None else "longer than that (stopped decoding there)"
    return AudioError(f"audio over the duration limit of {max_seconds:g} s: it is {length}")


def _check_header(sound: sf.SoundFile, max_seconds: float | None) -> None:
    """Refuse odd rates and channel counts, and audio whose header already says it is too long."""
    rate, frames = sound.samplerate, sound.frames
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    if not 1 <= sound.channels <= MAX_CHANNELS:
        raise AudioError(f"{sound.channels} channels; at most {MAX_CHANNELS} are accepted")
    if max_seconds is not None and 0 < frames < UNKNOWN_FRAMES and frames / rate > max_seconds:
        raise _too_long(max_seconds, frames / rate)


def _read_mono(sound: sf.SoundFile, max_frames: int | None) -> np.ndarray:
    """Decode one second at a time, mixing to mono, and stop after `max_frames` (memory stays bounded)."""
    blocks, total = [], 0
    while max_frames is None or total < max_frames:
        want = sound.samplerate if max_frames is None else min(sound.samplerate, max_frames - total)
        try:
            block = sound.read(frames=want, dtype="float32", always_2d=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise AudioError(f"cannot decode the audio: {_reason(exc)}") from None
        if block.shape[0] == 0:
            break
        blocks.append(block.mean(axis=1, dtype=np.float32))
        total += block.shape[0]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def decode_audio(data: bytes | str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Decode WAV/FLAC/OGG/MP3 bytes or a file to float32 mono at 16 kHz.

    Raises AudioError for undecodable or empty audio, non-finite samples, and audio longer than `max_seconds`
    (refused from the header before decoding where the header tells the length, and measured while decoding:
    at most max_seconds plus one frame is ever decoded).
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    with _open_sound(data) as sound:
        _check_header(sound, max_seconds)
        rate = sound.samplerate
        mono = _read_mono(sound, None if max_seconds is None else int(max_seconds * rate) + 1)
    if mono.size == 0:
        raise AudioError("the audio is empty (no samples)")
    if max_seconds is not None and mono.size / rate > max_seconds:
        raise _too_long(max_seconds)
    if not np.isfinite(mono).all():
        raise AudioError("the audio contains NaN or infinite samples")
    return resample(mono, rate, SAMPLE_RATE)


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


class Speech:
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
