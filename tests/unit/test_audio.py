"""Audio decoding and resampling: formats, limits, mono mixing, and the soxr resampler against a reference one.

`previous_resample` below is a hand-written Kaiser-windowed sinc resampler kept as an independent reference for
libsoxr's: the two agree within 40 dB SNR wherever both filters are flat (see
`test_soxr_matches_the_previous_resampler`). `python bench/resample.py` times the two.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from trimodal.audio import SAMPLE_RATE, AudioError, decode_audio, resample

DATA = Path(__file__).resolve().parents[1] / "data"
SR = 16_000


# ----------------------------------------------------------------------------------------------- helpers

def sine(freq: float, rate: int, seconds: float = 2.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def spectrum_db(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and Blackman-Harris-windowed amplitude spectrum in dB relative to a full-scale sine."""
    n = np.arange(x.size)
    w = (0.35875 - 0.48829 * np.cos(2 * np.pi * n / x.size) + 0.14128 * np.cos(4 * np.pi * n / x.size)
         - 0.01168 * np.cos(6 * np.pi * n / x.size))
    amp = np.abs(np.fft.rfft(x * w)) * 2 / w.sum()
    return np.fft.rfftfreq(x.size, 1 / rate), 20 * np.log10(amp + 1e-12)


def encode(audio: np.ndarray, rate: int, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_formats_decode_to_the_same_clip(fmt):
    ref = decode_audio(DATA / "fox.wav")
    clip = decode_audio((DATA / f"fox.{fmt}").read_bytes())
    assert clip.dtype == np.float32 and clip.ndim == 1
    assert abs(clip.size - ref.size) <= 0.01 * ref.size
    n = min(clip.size, ref.size)
    assert np.corrcoef(ref[:n], clip[:n])[0, 1] > 0.98  # lossy codecs, same timing (no offset)


def test_path_and_bytes_agree():
    path = DATA / "fox.flac"
    np.testing.assert_array_equal(decode_audio(path), decode_audio(str(path)))
    np.testing.assert_array_equal(decode_audio(path), decode_audio(path.read_bytes()))


def test_stereo_44k_becomes_mono_16k():
    left, right = sine(1000, 44_100, 1.0), sine(1000, 44_100, 1.0) * 0.5
    clip = decode_audio(encode(np.stack([left, right], axis=1), 44_100, "WAV", subtype="FLOAT"))
    assert clip.size == 16_000
    assert np.abs(clip[1000:-1000]).max() == pytest.approx(0.75, abs=0.01)


def test_resampler_keeps_a_1khz_tone_and_rejects_aliases():
    y = resample(sine(1000, 44_100), 44_100, SR)
    assert y.size == 2 * SR
    freqs, db = spectrum_db(y[800:-800], SR)
    assert freqs[db.argmax()] == pytest.approx(1000, abs=2)
    assert db.max() == pytest.approx(0.0, abs=0.05)
    assert db[np.abs(freqs - 1000) > 50].max() < -80
    for alias in (9_000, 10_000, 15_000):  # above the 8 kHz Nyquist: must not fold back into the band
        _, db = spectrum_db(resample(sine(alias, 44_100), 44_100, SR)[800:-800], SR)
        assert db.max() < -80, alias


@pytest.mark.parametrize("rate", [8_000, 22_050, 48_000, 44_101])
def test_resampler_rates(rate):
    y = resample(sine(440, rate), rate, SR)
    assert abs(y.size - 2 * SR) <= 2
    freqs, db = spectrum_db(y[800:-800], SR)
    assert freqs[db.argmax()] == pytest.approx(440, abs=2) and db.max() == pytest.approx(0, abs=0.1)
    assert resample(y, SR, SR) is not None and np.array_equal(resample(y, SR, SR), y)


def test_duration_limit_uses_the_header_before_decoding(monkeypatch, tmp_path):
    path = tmp_path / "two_hours.flac"  # FLAC writes fast; libsndfile reads any header's length the same way
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(720):
            f.write(np.zeros(80_000, np.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded samples although the header already exceeded the limit")
    monkeypatch.setattr(sf.SoundFile, "read", refuse)
    with pytest.raises(AudioError, match=r"limit of 120 s: it is 7200\.0 s long"):
        decode_audio(path, max_seconds=120)
    with pytest.raises(AudioError, match="limit of 1 s"):
        decode_audio((DATA / "fox.ogg").read_bytes(), max_seconds=1)


def test_duration_limit_is_measured_after_decoding(monkeypatch):
    seconds = decode_audio(DATA / "fox.wav").size / SR
    assert decode_audio(DATA / "fox.wav", max_seconds=seconds + 0.01).size == round(seconds * SR)
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: 2**63 - 1))  # a stream of unknown length
    with pytest.raises(AudioError, match="stopped decoding"):
        decode_audio(DATA / "fox.wav", max_seconds=seconds - 0.5)
    assert decode_audio(DATA / "fox.wav", max_seconds=seconds + 0.01).size == round(seconds * SR)


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 64, b"\x89PNG\r\n\x1a\n" + bytes(200),
                                  np.random.default_rng(0).bytes(4096), "flac[:300]", "wav[:44]", "ogg[:100]"])
def test_undecodable_bytes_raise_audio_error(data):
    if isinstance(data, str):
        name, cut = data.split("[:")
        data = (DATA / f"fox.{name}").read_bytes()[:int(cut[:-1])]
    with pytest.raises(AudioError) as info:
        decode_audio(data)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_odd_rates_and_channel_counts_are_refused():
    with pytest.raises(AudioError, match="sample rate"):
        decode_audio(encode(np.zeros(1000, np.float32), 400_000, "WAV"))
    with pytest.raises(AudioError, match="channels"):
        decode_audio(encode(np.zeros((100, 40), np.float32), SR, "WAV"))
    assert decode_audio(encode(sine(440, 192_000, 0.5), 192_000, "WAV")).size == SR // 2


def test_non_finite_audio_and_missing_file():
    bad = np.zeros(1600, np.float32)
    bad[10] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        decode_audio(encode(bad, SR, "WAV", subtype="FLOAT"))
    with pytest.raises(FileNotFoundError):
        decode_audio(DATA / "no_such_file.wav")


def test_sample_rate_is_whisper_s():
    from whisper.audio import SAMPLE_RATE as WHISPER_RATE

    assert SAMPLE_RATE == WHISPER_RATE == SR


# ----------------------------------------------------------------------------------------------- previous resampler

def _previous_sinc_kernels(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """PREVIOUS IMPLEMENTATION (trimodal.models.speech before soxr), kept verbatim as the reference.

    Polyphase filter bank [new, 1, taps] resampling by new/orig, and the padding (input samples) it needs.
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


def previous_resample(audio: np.ndarray, rate_in: int, rate_out: int = SR, zeros: int = 32,
                      rolloff: float = 0.945, beta: float = 10.0) -> np.ndarray:
    """PREVIOUS IMPLEMENTATION (trimodal.models.speech.resample before soxr), kept verbatim as the reference.

    Band-limited resampling of 1-D float audio (Kaiser-windowed sinc, ~95 dB stopband). The ratio is reduced to a
    fraction with denominator <= 1000 (exact for all common rates; odd rates are approximated to well under 0.01%).
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if rate_in == rate_out or audio.size == 0:
        return audio
    ratio = Fraction(rate_out, rate_in).limit_denominator(1000)
    new, orig = ratio.numerator, ratio.denominator
    kernels, width = _previous_sinc_kernels(orig, new, zeros, rolloff, beta)
    x = F.pad(torch.from_numpy(audio)[None, None], (width, width + orig))
    y = F.conv1d(x, kernels, stride=orig)[0].T.reshape(-1)
    return y[: math.ceil(audio.size * new / orig)].numpy()


# ----------------------------------------------------------------------------------------------- soxr vs previous

COMMON_RATES = (8_000, 11_025, 22_050, 24_000, 32_000, 44_100, 48_000, 96_000, 192_000)
FLAT = 0.875
"""Both filters are flat (within 0.05 dB) below this fraction of the lower rate's Nyquist frequency. Above it the
previous filter rolled off early (-6 dB at 0.945, only -30 dB at the Nyquist) and soxr's stays flat to 0.93 and is
over 110 dB down at the Nyquist, so full-band content there differs by design."""
MIN_SNR_DB = 40.0


def band_limit(x: np.ndarray, rate: int, top_hz: float) -> np.ndarray:
    """`x` with every FFT bin above `top_hz` removed."""
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(x.size, 1 / rate) > top_hz] = 0
    return np.fft.irfft(spectrum, x.size).astype(np.float32)


def reference_signals(rate: int, seconds: float = 2.0) -> dict[str, np.ndarray]:
    """A sine sweep, noise and a speech-like voiced signal at `rate`, all within the band both filters pass."""
    top = FLAT * min(rate, SR) / 2
    t = np.arange(int(rate * seconds)) / rate
    sweep = 0.5 * np.sin(2 * np.pi * (50 * t + (top - 50) / (2 * seconds) * t ** 2))
    noise = band_limit(0.3 * np.random.default_rng(rate).standard_normal(t.size), rate, top)
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 3 * t)) / rate  # a gliding 90-150 Hz voice
    voiced = sum(np.sin(k * phase) / k ** 1.5 for k in range(1, 60)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    voiced = band_limit(0.3 * voiced, rate, top)
    return {"sweep": sweep.astype(np.float32), "noise": noise, "speech-like": voiced}


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-difference ratio of `other` against `reference` (same length), in dB."""
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                               / np.sum((reference.astype(np.float64) - other) ** 2)))


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_soxr_matches_the_previous_resampler(rate):
    for name, x in reference_signals(rate).items():
        old, new = previous_resample(x, rate, SR), resample(x, rate, SR)
        assert new.dtype == np.float32 and new.size == old.size, name
        assert snr_db(old, new) >= MIN_SNR_DB, (name, snr_db(old, new))


@pytest.mark.parametrize("n", [1, 2, 3, 100, 1001, 44_101])
@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000, 192_000, 44_101])
def test_output_length_is_the_ceiling_of_the_ratio(n, rate):
    assert resample(np.ones(n, np.float32), rate, SR).size == -(-n * SR // rate)
