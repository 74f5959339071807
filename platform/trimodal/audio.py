"""Audio decoding: WAV, FLAC, OGG/Vorbis or MP3 bytes (or a file) to 16 kHz mono float32 samples.

`decode_audio` reads through soundfile (libsndfile; no ffmpeg) and refuses audio that is undecodable, empty or
longer than a limit: the header is checked before decoding, and at most the limit plus one frame is ever decoded,
a second at a time. It mixes to mono and resamples with libsoxr (`soxr`, its "HQ" band-limited filter). This
module knows nothing about speech recognition; `trimodal.models.speech` transcribes what it returns.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
"""The rate every decoded clip has (Whisper's input rate)."""
MIN_RATE, MAX_RATE, MAX_CHANNELS = 1_000, 192_000, 32
UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when a stream's length is unknown


class AudioError(ValueError):
    """Audio that cannot be used: undecodable, empty, too long, or not finite. The message says which."""


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of 1-D float audio with libsoxr's HQ filter (flat to 0.93 x the lower Nyquist,
    over 110 dB down past it).

    The output has ceil(len(audio) x rate_out / rate_in) samples (the input is followed by silence); the ratio is
    exact for any pair of integer rates.
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if rate_in == rate_out or audio.size == 0:
        return audio
    length = -(-audio.size * rate_out // rate_in)
    # soxr returns about round(n x ratio) samples: a little silence after the clip makes room for the ceil.
    padded = np.concatenate([audio, np.zeros(-(-2 * rate_in // rate_out), np.float32)])
    return soxr.resample(padded, rate_in, rate_out, quality="HQ")[:length]


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
