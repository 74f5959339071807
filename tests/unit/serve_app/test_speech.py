"""Speech as a plain class, no Ray: it transcribes a batch, silence is empty, and a resent clip is answered from its
cache (which computes no key when it is off)."""

import asyncio
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.speech import Speech  # noqa: E402


def test_speech_transcribes_a_batch_and_silence_is_empty(test_cfg):
    speech = Speech(test_cfg)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    texts = asyncio.run(speech.transcribe_batch([np.zeros(16000, np.float32), tone]))
    assert texts[0] == "" and isinstance(texts[1], str)
    assert asyncio.run(speech.transcribe(np.zeros(8000, np.float32))) == ""


def test_speech_answers_a_resent_clip_from_its_cache_with_the_same_transcript(test_cfg):
    speech = Speech(test_cfg)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    other = (0.3 * np.sin(2 * np.pi * 660 * np.arange(16000) / 16000)).astype(np.float32)
    first = asyncio.run(speech.transcribe_batch([tone]))
    again = asyncio.run(speech.transcribe_batch([other, tone.copy()]))  # one miss, one hit, in one batch
    assert again[1] == first[0]
    assert speech.stats()["hits"] == 1 and speech.stats()["misses"] == 2
    assert speech.encoding.metrics.tallies["encoded"] == 2  # Whisper ran for the first clip and the new one only


def test_speech_with_the_cache_off_runs_whisper_every_time(test_cfg, monkeypatch):
    """...and does not hash the clips (a key nobody looks up is wasted work: SHA-256 over up to 2 MB a clip)."""
    import serve_app.speech

    def no_key(audio):
        raise AssertionError("a cache key was computed with the cache off")

    monkeypatch.setattr(serve_app.speech, "audio_key", no_key)
    cfg = copy.deepcopy(test_cfg)
    cfg.serving.media_cache_mb = 0
    speech = Speech(cfg)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    for _ in range(2):
        asyncio.run(speech.transcribe(tone))
    assert speech.stats()["hits"] == 0 and speech.encoding.metrics.tallies["encoded"] == 2
    assert speech.stats()["entries"] == 0
