"""What the model deployments share: the thread bound of a replica, model names fit for clients, the server's
default run, and `MediaEncoding`, the media-cache path that Speech and Vision each hold.

Each request names its run (`RunBundle`, None for the base model); `run_label` is that run's identity wherever a
replica keys something by run (cache keys, vLLM adapter names).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from trimodal.config import ModelSource, TrimodalConfig
from trimodal.inference.media_cache import MediaCache
from trimodal.inference.requests import RunBundle

from serve_app.metrics import EncoderMetrics
from serve_app.registry import run_bundle


def set_threads(threads: int | None) -> None:
    """Bound torch's intra-op threads in this replica (None: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def public_name(name: str) -> str:
    """A model name fit for clients: an absolute path becomes its last two parts (`clip/tower`)."""
    path = Path(name)
    return "/".join(path.parts[-2:]) if path.is_absolute() else name


def source_label(source: ModelSource) -> str:
    """`kind:name` of a model source, without server paths."""
    return f"{source.kind}:{public_name(source.name)}"


def mb_to_bytes(mb: float) -> int:
    """Bytes in `mb` mebibytes."""
    return int(mb * 1024 * 1024)


def default_run_bundle(run_dir: str | None) -> RunBundle | None:
    """The server's default run as a RunBundle (None: no run, the base model)."""
    return run_bundle(run_dir, "default") if run_dir else None


def run_label(run: RunBundle | None) -> str | None:
    """A run's identity in keys: its directory and version (None: the base model). A run finished again in the
    same place gets a new version, so nothing made by its old weights is reused."""
    return f"{run.directory}@{run.version}" if run is not None else None


class MediaEncoding:
    """What Speech and Vision each hold to keep what they encoded: a per-replica `MediaCache` (bounded by
    serving.media_cache_mb), so a conversation that resends its audio and image each turn runs Whisper and CLIP
    once; encoder metrics; one worker thread that encodes, off the event loop. A held part, not a base class, so
    each deployment class keeps its whole interface in its own body."""

    def __init__(self, cfg: TrimodalConfig, kind: str):
        self.cache = MediaCache(mb_to_bytes(cfg.serving.media_cache_mb))
        self.metrics = EncoderMetrics(kind)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{kind}")

    async def through_cache(self, n: int, key_of: Callable[[int], str], encode: Callable[[list[int]], list],
                            size: Callable[[Any], int]) -> list:
        """n results: from the cache where it has item i's key (`key_of(i)`; not computed when the cache is off),
        the rest from `encode(indices of the misses)` run once in the worker thread (timed), then cached. The cache
        counts hits and misses (stats()); the metrics export them with the encoder seconds. A result that is an
        exception (an item that could not be encoded) is passed on, never cached."""
        cache = self.cache
        keys = [key_of(i) for i in range(n)] if cache.enabled else []
        out = [cache.get(key) for key in keys] if cache.enabled else [None] * n
        missing = [i for i, value in enumerate(out) if value is None]
        self.metrics.lookups(n - len(missing), len(missing))
        if missing:
            started = time.perf_counter()
            fresh = await asyncio.get_running_loop().run_in_executor(self._executor, encode, missing)
            self.metrics.encoded(time.perf_counter() - started)
            for i, value in zip(missing, fresh, strict=True):
                out[i] = value
                if cache.enabled and not isinstance(value, BaseException):
                    cache.put(keys[i], value, size(value))
        return out

    async def in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the worker thread that encodes (so it never runs beside an encoding batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def stats(self) -> dict:
        """Cache counters: hits, misses, evictions, entries, bytes."""
        return self.cache.counters()
