"""A least-recently-used map bounded by the summed sizes of its entries: the one LRU the library and the serving
replicas use (encoded media bounded by bytes, loaded runs bounded by count).

Each entry carries a size (1 unless the caller says otherwise, which makes the bound a count). `put` stores and
evicts the least recently used entries until the bound holds; `add` stores without evicting, for a caller that
must keep several new entries at once and evicts later with `evict(keep=...)`. `get` refreshes an entry and counts
a hit or a miss; `in`, `len` and `keys()` only look. Not thread-safe: use one from one thread or one event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Container, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class LruStats:
    """Counters of one LRU since it was made."""

    hits: int = 0
    """Lookups (`get`) that found their key."""
    misses: int = 0
    """Lookups that did not."""
    evictions: int = 0
    """Entries dropped to bring the summed size within the bound."""
    entries: int = 0
    """Entries held now."""
    size: int = 0
    """Summed sizes of the entries held now (as counted by the callers' sizes)."""


@dataclass(eq=False)
class Lru(Generic[K, V]):
    """A map from keys to values, least recently used first, whose entries' sizes sum to at most `capacity` after
    every `put` and `evict`."""

    capacity: int
    """Upper bound on the summed sizes of the entries (0: nothing is kept)."""
    on_evict: Callable[[K, V], None] | None = None
    """Called with each entry `put` or `evict` drops (to free what the value holds)."""
    stats: LruStats = field(default_factory=LruStats)
    """Hits, misses, evictions, entries and summed size."""
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    """key -> (value, size), least recently used first."""

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError(f"an LRU's capacity must be >= 0, got {self.capacity}")

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        """The keys held, least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        """The values held, least recently used first."""
        return [value for value, _ in self._entries.values()]

    def get(self, key: K) -> V | None:
        """The value stored under `key` (now the most recently used), or None; counted as a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: K, value: V, size: int = 1) -> None:
        """Store `value` as the most recently used, then evict the least recently used entries past the bound.

        A value whose size alone is over the bound is not stored (an entry already under `key` stays)."""
        if size > self.capacity:
            return
        self.add(key, value, size)
        self.evict()

    def add(self, key: K, value: V, size: int = 1) -> None:
        """Store `value` as the most recently used, evicting nothing (the bound may be exceeded until `evict`)."""
        if key in self._entries:
            self.stats.size -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.stats.size += size
        self.stats.entries = len(self._entries)

    def evict(self, keep: Container[K] = ()) -> None:
        """Drop the least recently used entries not in `keep` until the summed size is within the bound (or only
        kept entries are left). Reads only as far as the entries it drops, so a large cache evicts cheaply."""
        excess, victims = self.stats.size - self.capacity, []
        for key, (_, size) in self._entries.items():
            if excess <= 0:
                break
            if key not in keep:
                victims.append(key)
                excess -= size
        for key in victims:
            value, size = self._entries.pop(key)
            self.stats.size -= size
            self.stats.evictions += 1
            self.stats.entries = len(self._entries)
            if self.on_evict is not None:
                self.on_evict(key, value)
