"""A per-replica cache of encoded media, so a conversation's image and audio are encoded once.

The OpenAI API is stateless: every turn of a chat resends its image and its audio clip. The Speech and Vision
replicas keep what they computed for recent media in a `MediaCache`, a least-recently-used map bounded by bytes:

- transcripts, keyed by `audio_key`: the SHA-256 of the decoded 16 kHz float32 samples (the same clip sent as
  WAV or FLAC, or re-encoded, hits);
- projected image embeddings, keyed by `image_key`: the SHA-256 of the decoded pixels (mode, size, bytes) plus the
  run whose tower and projector made them (the same picture under another run misses).

Keys hash decoded content rather than the request's bytes, so a client that re-encodes the same picture still hits,
and nothing about the request's encoding can make two different images share a key.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from PIL import Image

from trimodal.lru import Lru, LruStats


class MediaCache:
    """A least-recently-used map from content keys to encoded media, holding at most `max_bytes` (each entry
    counted by the size its caller gives: `text_size`, `array_size`).

    `max_bytes` 0 turns caching off: every lookup misses and nothing is stored. Used from one event loop (the
    replica's), so no lock is needed. It holds an `Lru` rather than being one, so what a replica may do with its
    cache is exactly get, put and the counters.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.entries: Lru[str, Any] = Lru(max_bytes)
        """Encoded media by content key, least recently used first, their sizes summing to at most max_bytes."""

    @property
    def max_bytes(self) -> int:
        """Upper bound on the summed sizes of the entries held."""
        return self.entries.capacity

    @property
    def enabled(self) -> bool:
        return self.entries.capacity > 0

    @property
    def stats(self) -> LruStats:
        """Hits, misses, evictions, entries and bytes held (`size`)."""
        return self.entries.stats

    def get(self, key: str) -> Any | None:
        """The media stored under `key` (now the most recently used), or None; counted as a hit or a miss."""
        return self.entries.get(key)

    def put(self, key: str, value: Any, size: int) -> None:
        """Store `value`, counted as `size` bytes, evicting the least recently used past max_bytes (a value over
        max_bytes alone is not stored)."""
        self.entries.put(key, value, size)

    def counters(self) -> dict[str, int]:
        """What a replica reports of its cache: hits, misses, evictions, entries, bytes held."""
        stats = self.entries.stats
        return {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions, "entries": stats.entries,
                "bytes": stats.size}


def audio_key(audio: np.ndarray) -> str:
    """SHA-256 of a decoded clip's float32 samples."""
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    return "audio:" + hashlib.sha256(samples.tobytes()).hexdigest()


def image_key(image: Image.Image, run: str | None) -> str:
    """SHA-256 of a decoded image's mode, size and pixels, plus the run (None: the base projector) that encodes it."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return f"image:{run or ''}:{digest.hexdigest()}"


def text_size(text: str) -> int:
    """Bytes a transcript is counted as."""
    return len(text.encode()) + 64


def array_size(array: np.ndarray) -> int:
    """Bytes an embeddings array is counted as."""
    return int(array.nbytes) + 128
