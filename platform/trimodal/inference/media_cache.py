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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class CacheStats:
    """Counters of one cache since it was made."""

    hits: int = 0
    """Lookups that found their key."""
    misses: int = 0
    """Lookups that did not."""
    evictions: int = 0
    """Entries dropped to stay within the byte bound."""
    entries: int = 0
    """Entries held now."""
    bytes: int = 0
    """Bytes held now (as counted by the caller's sizes)."""


@dataclass
class MediaCache:
    """A least-recently-used map from content keys to encoded media, holding at most `max_bytes`.

    `max_bytes` 0 turns caching off: every lookup misses and nothing is stored. Used from one event loop (the
    replica's), so no lock is needed.
    """

    max_bytes: int
    """Upper bound on the summed sizes of the entries held."""
    stats: CacheStats = field(default_factory=CacheStats)
    """Hits, misses, evictions, entries and bytes."""
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> Any | None:
        """The value stored under `key` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        """Store `value` (counted as `nbytes`), evicting the least recently used entries to stay within the bound.

        A value larger than the whole bound is not stored."""
        if nbytes > self.max_bytes:
            return
        if key in self._entries:
            self.stats.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, nbytes)
        self.stats.bytes += nbytes
        while self.stats.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.stats.bytes -= dropped
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)


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
