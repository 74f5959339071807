"""The Vision deployment as a plain class: a frozen CLIP tower + projector turn PIL images into LM-space patch
embeddings, with the tower and projector of the run each request names, batched (`BATCHED`: the builder routes
`encode` through `serve.batch` on `encode_batch`; a batch is grouped per run), with a per-replica cache of
embeddings keyed by the decoded pixels and the run."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trimodal.config import TrimodalConfig
from trimodal.inference.media_cache import array_size, image_key
from trimodal.inference.requests import RunBundle
from trimodal.lru import Lru

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

    async def encode(self, image: Image.Image, run: RunBundle | None = None) -> np.ndarray:
        """Embeddings [N, H] of one image, by `run`'s tower and projector (None: the base model's)."""
        return (await self.encode_batch([image], [run]))[0]

    async def encode_batch(self, images: list[Image.Image],
                           runs: list[RunBundle | None] | None = None) -> list[np.ndarray]:
        """Embeddings of several images: cached ones from the cache, the rest in one forward pass per run."""
        runs = runs or [None] * len(images)

        def encode(missing: list[int]) -> list[np.ndarray]:
            return self._encode([images[i] for i in missing], [runs[i] for i in missing])

        return await self.encoding.through_cache(len(images), lambda i: image_key(images[i], run_label(runs[i])),
                                                 encode, array_size)

    def _encode(self, images: list[Image.Image], runs: list[RunBundle | None]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        groups: dict[RunBundle | None, list[int]] = {}
        for i, run in enumerate(runs):
            groups.setdefault(run, []).append(i)
        for run, rows in groups.items():
            embeds = self.encoder_for(run)([images[i] for i in rows]).float().cpu().numpy()  # [n, N, H]
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
