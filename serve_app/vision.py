"""The Vision deployment as a plain class: a frozen CLIP tower + projector turn PIL images into LM-space patch
embeddings, with the tower and projector of the run each request names, batched (`BATCHED`: the builder routes
`encode` through `serve.batch` on `encode_batch`; a batch is grouped per run), with a per-replica cache of
embeddings keyed by the decoded pixels and the run.

A run whose tower or projector cannot be loaded (`RunLoadError`) fails alone: its rows of a batch come back as
`RunUnavailable` values (not raised, so the batch's other runs are answered), and `check_run` says why."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trimodal.config import TrimodalConfig
from trimodal.inference.media_cache import array_size, image_key
from trimodal.inference.requests import RunBundle
from trimodal.lru import Lru

from serve_app.registry import RunUnavailable
from serve_app.replica import MediaEncoding, default_run_bundle, public_name, run_label, set_threads


class Vision:
    """Frozen CLIP tower + projector: one PIL image -> LM-space patch embeddings [N, H] (float32 numpy), with the
    tower and projector of the run the request names (the default run's are loaded at start)."""

    BATCHED = {"encode": "encode_batch"}

    def __init__(self, cfg: TrimodalConfig, run_dir: str | None, lm_hidden: int, device: str = "cpu",
                 threads: int | None = None):
        set_threads(threads)
        self.cfg, self.lm_hidden, self.device = cfg, lm_hidden, device
        self.encoders: Lru[tuple[str, int] | None, object] = Lru(cfg.serving.max_loaded_runs)
        """Loaded image encoders by run (None: the base model's), least recently used first."""
        self.image_encoder = self.encoder_for(default_run_bundle(run_dir))
        self.encoding = MediaEncoding(cfg, "image")

    def encoder_for(self, run: RunBundle | None):
        """The run's tower + projector (loaded on first use; past serving.max_loaded_runs the least recently used
        goes)."""
        from trimodal.runs import load_image_encoder, read_run

        key = (run.directory, run.version) if run is not None else None
        encoder = self.encoders.get(key)
        if encoder is None:
            encoder = load_image_encoder(self.cfg, read_run(key[0] if key else None), self.lm_hidden, self.device)
            self.encoders.put(key, encoder)
        return encoder

    async def check_run(self, run: RunBundle | None) -> str | None:
        """None once `run`'s tower and projector are loaded; else what is wrong with its files (no server path)."""
        from trimodal.runs import RunLoadError

        try:
            await self.encoding.in_worker(self.encoder_for, run)
        except RunLoadError as exc:
            return str(exc)
        return None

    async def encode(self, image: Image.Image, run: RunBundle | None = None) -> np.ndarray | RunUnavailable:
        """Embeddings [N, H] of one image, by `run`'s tower and projector (None: the base model's); RunUnavailable
        when that run cannot be loaded."""
        return (await self.encode_batch([image], [run]))[0]

    async def encode_batch(self, images: list[Image.Image],
                           runs: list[RunBundle | None] | None = None) -> list[np.ndarray | RunUnavailable]:
        """Embeddings of several images: cached ones from the cache, the rest in one forward pass per run (a run
        that cannot be loaded: RunUnavailable for each of its images)."""
        runs = runs or [None] * len(images)

        def encode(missing: list[int]) -> list[np.ndarray]:
            return self._encode([images[i] for i in missing], [runs[i] for i in missing])

        return await self.encoding.through_cache(len(images), lambda i: image_key(images[i], run_label(runs[i])),
                                                 encode, array_size)

    def _encode(self, images: list[Image.Image], runs: list[RunBundle | None]) -> list[np.ndarray | RunUnavailable]:
        from trimodal.runs import RunLoadError

        out: list[np.ndarray | RunUnavailable] = [np.empty(0)] * len(images)
        groups: dict[RunBundle | None, list[int]] = {}
        for i, run in enumerate(runs):
            groups.setdefault(run, []).append(i)
        for run, rows in groups.items():
            try:
                encoder = self.encoder_for(run)
            except RunLoadError as exc:  # only a run's own files fail this way, so run is not None
                for i in rows:
                    out[i] = RunUnavailable(run.name, str(exc))
                continue
            embeds = encoder([images[i] for i in rows]).float().cpu().numpy()  # [n, N, H]
            for i, embed in zip(rows, embeds):
                out[i] = embed
        return out

    def stats(self) -> dict:
        """Cache counters: hits, misses, evictions, entries, bytes."""
        return self.encoding.stats()

    def describe(self) -> dict:
        info = self.image_encoder.tower.info
        return {"vision_tower": public_name(info.model_id), "vision_tower_untrained": info.untrained,
                "projector_trained": self.image_encoder.trained, "num_patches": info.num_patches,
                "image_size": info.image_size}
