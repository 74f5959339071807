"""The Speech deployment as a plain class: Whisper transcription of decoded 16 kHz clips, batched (`BATCHED`:
the builder routes `transcribe` through `serve.batch` on `transcribe_batch`), with a per-replica cache of
transcripts keyed by the clip's samples."""

from __future__ import annotations

import numpy as np

from trimodal.config import TrimodalConfig
from trimodal.inference.media_cache import audio_key, text_size

from serve_app.replica import MediaEncoding, set_threads, source_label


class Speech:
    """Whisper transcription of decoded 16 kHz clips."""

    BATCHED = {"transcribe": "transcribe_batch"}

    def __init__(self, cfg: TrimodalConfig, device: str = "cpu", threads: int | None = None):
        from trimodal.runs import load_transcriber

        set_threads(threads)
        self.encoding = MediaEncoding(cfg, "audio")
        self.source = cfg.model.speech.source
        self.transcriber = load_transcriber(cfg.model.speech, device)

    async def transcribe(self, audio: np.ndarray) -> str:
        """Transcript of one clip ("" for silence)."""
        return (await self.transcribe_batch([audio]))[0]

    async def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Transcripts of several clips: cached ones from the cache, the rest decoded together."""
        def transcribe(missing: list[int]) -> list[str]:
            return self.transcriber.transcribe_batch([audios[i] for i in missing])

        return await self.encoding.through_cache(len(audios), lambda i: audio_key(audios[i]), transcribe, text_size)

    def stats(self) -> dict:
        """Cache counters: hits, misses, evictions, entries, bytes."""
        return self.encoding.stats()

    def describe(self) -> dict:
        return {"speech": source_label(self.source)}
