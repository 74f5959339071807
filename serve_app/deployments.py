"""The serving graph's model deployments as plain classes: Speech (Whisper), Vision (CLIP tower + projector) and
LanguageModel (LM + LoRA adapters). No Serve here: `serve_app.app` turns them into Serve deployments; their
metrics (`serve_app.metrics`) go through Ray Serve's metrics API, a no-op outside a replica.

Each request names its run (`RunBundle`, None for the base model): Vision encodes with that run's tower and
projector (a bounded LRU of image encoders, rows grouped per run), the LanguageModel decodes with that run's LoRA
adapter: one base LM, every run's adapter under its own peft adapter name (a bounded LRU), and rows of different
runs in one decoding batch, each with its own adapter (base rows with none).

Each class names its batchable methods in `BATCHED` ({single-item method: list method}). Plain, the single
method runs a batch of one; the builder routes it through `serve.batch` instead, so concurrent calls share one
forward pass. The LanguageModel decodes a batch with the KV cache in a worker thread and streams per-step
deltas; a caller that goes away (client disconnect) marks its row cancelled and the decoder drops it.

Speech and Vision keep what they encoded in a per-replica `MediaCache` (bounded by serving.media_cache_mb), so a
conversation that resends its audio and image each turn runs Whisper and CLIP once.

`describe()` answers what is loaded, naming sources and towers without server paths; the ingress's /readyz asks it
of every deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from trimodal.config import ModelSource, TrimodalConfig
from trimodal.inference.engine import Delta, Prompt, TextGenerator, tokenize_prompt
from trimodal.inference.media_cache import MediaCache, array_size, audio_key, image_key, text_size
from trimodal.inference.requests import GenerationRequest, RunBundle, SamplingParams

from serve_app.metrics import EncoderMetrics, LanguageModelMetrics
from serve_app.registry import run_bundle

log = logging.getLogger("trimodal.serve")


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


def megabytes(mb: float) -> int:
    """Bytes in `mb` megabytes (MiB)."""
    return int(mb * 1024 * 1024)


async def through_cache(cache: MediaCache, metrics: EncoderMetrics, n: int, key_of: Callable[[int], str],
                        executor: ThreadPoolExecutor, encode: Callable[[list[int]], list],
                        size: Callable[[Any], int]) -> list:
    """n results: from the cache where it has item i's key (`key_of(i)`; not computed when the cache is off), the
    rest from `encode(indices of the misses)` run once in `executor` (timed), then cached. Hits and misses are
    counted by the cache (stats()) and exported by `metrics`, with the encoder seconds."""
    keys = [key_of(i) for i in range(n)] if cache.enabled else []
    out = [cache.get(key) for key in keys] if cache.enabled else [None] * n
    missing = [i for i, value in enumerate(out) if value is None]
    metrics.lookups(n - len(missing), len(missing))
    if missing:
        started = time.perf_counter()
        fresh = await asyncio.get_running_loop().run_in_executor(executor, encode, missing)
        metrics.encoded(time.perf_counter() - started)
        for i, value in zip(missing, fresh, strict=True):
            out[i] = value
            if cache.enabled:
                cache.put(keys[i], value, size(value))
    return out


async def run_batch_of_one(batch_method, item) -> Any:
    """Call a list method with one item and unwrap its single result."""
    return (await batch_method([item]))[0]


class Speech:
    """Whisper transcription of decoded 16 kHz clips."""

    BATCHED = {"transcribe": "transcribe_batch"}

    def __init__(self, cfg: TrimodalConfig, device: str = "cpu", threads: int | None = None):
        from trimodal.runs import load_transcriber

        set_threads(threads)
        self.source = cfg.model.speech.source
        self.transcriber = load_transcriber(cfg.model.speech, device)
        self.cache = MediaCache(megabytes(cfg.serving.media_cache_mb))
        self.metrics = EncoderMetrics("audio")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech")

    async def transcribe(self, audio: np.ndarray) -> str:
        """Transcript of one clip ("" for silence)."""
        return await run_batch_of_one(self.transcribe_batch, audio)

    async def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Transcripts of several clips: cached ones from the cache, the rest decoded together."""
        def transcribe(missing: list[int]) -> list[str]:
            return self.transcriber.transcribe_batch([audios[i] for i in missing])

        return await through_cache(self.cache, self.metrics, len(audios), lambda i: audio_key(audios[i]),
                                   self._executor, transcribe, text_size)

    def describe(self) -> dict:
        return {"speech": source_label(self.source)}

    def stats(self) -> dict:
        """Cache counters: hits, misses, evictions, entries, bytes."""
        return dataclasses.asdict(self.cache.stats)


def default_bundle(run_dir: str | None) -> RunBundle | None:
    """The server's default run as a RunBundle (None: no run)."""
    return run_bundle(run_dir, "default") if run_dir else None


def run_label(run: RunBundle | None) -> str | None:
    """A run's identity in cache keys: its directory and version (None: the base model)."""
    return f"{run.directory}@{run.version}" if run is not None else None


class Vision:
    """Frozen CLIP tower + projector: one PIL image -> LM-space patch embeddings [N, H] (float32 numpy), with the
    tower and projector of the run the request names (the default run's are loaded at start)."""

    BATCHED = {"encode": "encode_batch"}

    def __init__(self, cfg: TrimodalConfig, run_dir: str | None, lm_hidden: int, device: str = "cpu",
                 threads: int | None = None):
        set_threads(threads)
        self.cfg, self.lm_hidden, self.device = cfg, lm_hidden, device
        self.max_loaded = cfg.serving.max_loaded_runs
        self.encoders: OrderedDict[tuple[str, int] | None, Any] = OrderedDict()
        """Loaded image encoders by run (None: the base model's), least recently used first."""
        self.image_encoder = self.encoder_for(default_bundle(run_dir))
        self.cache = MediaCache(megabytes(cfg.serving.media_cache_mb))
        self.metrics = EncoderMetrics("image")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")

    def encoder_for(self, run: RunBundle | None):
        """The run's tower + projector (loaded on first use; past max_loaded the least recently used goes)."""
        from trimodal.runs import load_image_encoder, read_run

        key = (run.directory, run.version) if run is not None else None
        if key in self.encoders:
            self.encoders.move_to_end(key)
            return self.encoders[key]
        encoder = load_image_encoder(self.cfg, read_run(key[0] if key else None), self.lm_hidden, self.device)
        self.encoders[key] = encoder
        while len(self.encoders) > self.max_loaded:
            self.encoders.popitem(last=False)
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

        return await through_cache(self.cache, self.metrics, len(images),
                                   lambda i: image_key(images[i], run_label(runs[i])), self._executor, encode,
                                   array_size)

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
        return dataclasses.asdict(self.cache.stats)

    def describe(self) -> dict:
        info = self.image_encoder.tower.info
        return {"vision_tower": public_name(info.model_id), "vision_tower_untrained": info.untrained,
                "projector_trained": self.image_encoder.trained, "num_patches": info.num_patches,
                "image_size": info.image_size}


@dataclass
class BatchRow:
    """One row of a decoding batch; `cancelled` is set when its caller goes away."""

    prompt: Prompt
    params: SamplingParams
    cancelled: bool = False
    finished: bool = False
    run: RunBundle | None = None
    """Whose LoRA adapter decodes this row (None: the base LM)."""
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)
    """When the row was made (its queue wait ends when its batch starts)."""


class CancelSet(set):
    """The `cancelled` set TextGenerator.stream reads: explicit rows plus rows that were cancelled."""

    def __init__(self, rows: list[BatchRow]):
        super().__init__()
        self.rows = rows

    def __contains__(self, row: object) -> bool:
        return set.__contains__(self, row) or (isinstance(row, int) and self.rows[row].cancelled)


_END = object()


class SteadyGenerator:
    """A stand-in for TextGenerator, for tests and drills: the real tokenizer and prompt limit, then "x" for every
    token up to max_tokens, one decoding step every `delay_s` seconds whatever the model would say; a cancelled row
    stops at the next step. Its answers take at least max_tokens * delay_s seconds, on any machine."""

    def __init__(self, real: TextGenerator, delay_s: float):
        self.encode = real.encode
        self.delay_s = delay_s

    def stream(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams], cancelled: set[int],
               adapters: Sequence[str] | None = None) -> Iterator[Delta]:
        limits, counts = [p.max_tokens for p in params], [0] * len(prompts)
        for step in range(1, max(limits) + 1):
            live = [row for row in range(len(prompts)) if row not in cancelled and step <= limits[row]]
            if not live:
                break
            time.sleep(self.delay_s)
            for row in live:
                counts[row] = step
                yield Delta(row, "x", "length" if step == limits[row] else None, step)
        for row in range(len(prompts)):
            if counts[row] < limits[row]:
                yield Delta(row, "", "cancelled", counts[row])


class LanguageModel:
    """The LM + tokenizer: prompts are tokenised per request, then decoded in dynamic batches with a KV cache.

    One base LM; each request's run brings its LoRA adapter (`RunAdapters`: loaded on first use, at most
    serving.max_loaded_runs, the default run's at start); a batch mixes runs, each row with its own adapter.
    `test_token_delay_s` > 0 swaps the decoder for a SteadyGenerator (tests that need answers of a known duration).
    """

    BATCHED = {"decode": "decode_batch"}

    def __init__(self, cfg: TrimodalConfig, run_dir: str | None, device: str = "cpu", threads: int | None = None,
                 test_token_delay_s: float = 0.0):
        from trimodal.runs import RunAdapters, load_text_generator, read_run

        set_threads(threads)
        self.generator = load_text_generator(cfg, read_run(None), device)
        self.adapters = RunAdapters(self.generator, cfg.serving.max_loaded_runs)
        default = default_bundle(run_dir)
        self.adapters.load(default)
        if test_token_delay_s > 0:
            self.generator = SteadyGenerator(self.generator, test_token_delay_s)
        self.info = {"language_model": source_label(cfg.model.language_model.source),
                     "adapter": bool(default and default.adapter), "dtype": cfg.model.language_model.dtype,
                     "engine": "builtin"}
        self.counters = {"prompts": 0, "requests": 0, "batches": 0, "largest_batch": 0, "cancelled": 0, "active": 0}
        self.metrics = LanguageModelMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def describe(self) -> dict:
        return dict(self.info)

    def stats(self) -> dict:
        """Counters: prompts received, requests decoded, batches, the largest batch, rows cancelled by their caller,
        rows active; adapters loaded now, loads and evictions so far."""
        return {**self.counters, "adapters_loaded": len(self.adapters.loaded), "adapter_loads": self.adapters.loads,
                "adapter_evictions": self.adapters.evictions}

    def prepare(self, request: GenerationRequest) -> Prompt:
        """Tokenise the turns (ValueError for a prompt over the length limit)."""
        embeds = torch.from_numpy(np.stack(request.image_embeds)) if request.image_embeds else None  # [n, N, H]
        return tokenize_prompt(self.generator, request.turns, embeds, request.transcripts)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict]:
        """Stream dicts: first {"prompt_tokens"} (or {"error"}), then {"text", "finish_reason", "completion_tokens"}.

        The last dict has a finish_reason. If the caller stops iterating early, the row is cancelled.
        """
        self.counters["prompts"] += 1
        try:
            prompt = self.prepare(request)
        except ValueError as exc:
            yield {"error": str(exc)}
            return
        key = self.adapters.key(request.run)
        if key is not None and key not in self.adapters.loaded:  # load it here, so a bad run fails alone
            await asyncio.get_running_loop().run_in_executor(self._executor, self.adapters.load, request.run)
        yield {"prompt_tokens": len(prompt.input_ids)}
        row = BatchRow(prompt, request.params, run=request.run)
        self.counters["requests"] += 1
        self.counters["active"] += 1
        try:
            async for deltas in self.decode(row):  # runs to its end, so serve.batch leaves no future behind
                if deltas and not row.finished:
                    out = merge_deltas(deltas)
                    row.finished = out["finish_reason"] is not None
                    yield out
        finally:
            self.counters["active"] -= 1
            if not row.finished:
                row.cancelled = True
                self.counters["cancelled"] += 1

    async def decode(self, row: BatchRow) -> AsyncIterator[list[Delta]]:
        """The deltas of one row, step by step (plain: a batch of one; served: through serve.batch)."""
        async for results in self.decode_batch([row]):
            if results[0] is StopIteration:
                return
            yield results[0]

    async def decode_batch(self, rows: list[BatchRow]) -> AsyncIterator[list]:
        """Decode rows together; yield, per step, one entry per row: its new deltas or StopIteration once done."""
        self.counters["batches"] += 1
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(rows))
        self.metrics.batch(len(rows))
        started = time.perf_counter()
        for row in rows:
            self.metrics.queue_wait(started - row.queued_at)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = CancelSet(rows)
        worker = loop.run_in_executor(self._executor, self._decode_thread, rows, cancelled, loop, queue)
        done = [False] * len(rows)
        ended = False
        try:
            while not ended:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                ended = _END in items
                per_row: list[list[Delta]] = [[] for _ in rows]
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Delta):
                        per_row[item.row].append(item)
                yield [StopIteration if done[i] or rows[i].cancelled else per_row[i] for i in range(len(rows))]
                for i, deltas in enumerate(per_row):
                    done[i] = done[i] or rows[i].cancelled or any(d.finish_reason for d in deltas)
        finally:
            if not ended:  # our consumer went away: stop every row, then let the thread finish
                for row in rows:
                    row.cancelled = True
            await asyncio.shield(worker)

    def _decode_thread(self, rows: list[BatchRow], cancelled: CancelSet, loop: asyncio.AbstractEventLoop,
                       queue: asyncio.Queue) -> None:
        """Run TextGenerator.stream and hand every delta (or the error) to the event loop."""
        try:
            prompts, params = [r.prompt for r in rows], [r.params for r in rows]
            adapters = self.adapters.names([r.run for r in rows])
            for delta in self.generator.stream(prompts, params, cancelled, adapters):
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        except BaseException as exc:  # surfaced to every caller of the batch
            log.exception("decoding a batch of %d failed", len(rows))
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)


def merge_deltas(deltas: list[Delta]) -> dict:
    """Several deltas of one row (one step's worth) -> one message."""
    last = deltas[-1]
    return {"text": "".join(d.text for d in deltas), "finish_reason": last.finish_reason,
            "completion_tokens": last.completion_tokens}



RUN_ADAPTER = object()
"""VllmLanguageModel.generate's default adapter: the one of the run the request names."""


def adapter_ref(run: RunBundle | None):
    """The vllm engine's handle on a run's LoRA adapter (None: the base model, or a run without an adapter); its
    name changes when the run is finished again at the same place, so vLLM loads it afresh."""
    from trimodal.inference.vllm_engine import AdapterRef

    if run is None or run.adapter is None:
        return None
    return AdapterRef(run_label(run), run.adapter)
"""`VllmLanguageModel.generate`'s default adapter: the served run's own (None: the base model)."""


class VllmLanguageModel:
    """The LanguageModel on the vllm engine (serving.engine: vllm), with LanguageModel's interface: describe, stats
    and generate streaming the same dicts. vLLM batches continuously, so requests go straight to it (no serve.batch);
    a caller that goes away aborts its request. It runs in the `.venv-vllm` environment (the builder's runtime_env).

    Each request decodes with the LoRA adapter of the run it names (`request.run`; None: the base model), so rows
    of different runs share vLLM's batches; `generate(request, adapter)` may name an `AdapterRef` instead (tests).
    LoRA is on unless `lora=False`, so runs found after start can be served. The engine starts in the constructor,
    so the replica is ready when it answers.
    """

    def __init__(self, cfg: TrimodalConfig, run_dir: str | None, device: str = "cpu", threads: int | None = None,
                 lora: bool | None = None):
        from trimodal.inference.vllm_engine import load_vllm_generator
        from trimodal.runs import read_run

        set_threads(threads)
        run = read_run(run_dir)
        with_lora = lora is not False
        self.generator = load_vllm_generator(cfg, cfg.lora.target_modules if with_lora else (), device)
        self.run_adapter = adapter_ref(default_bundle(run_dir))
        if self.run_adapter is not None:
            self.generator.lora_request(self.run_adapter)  # refuse an unservable adapter now, not per request
        self.info = {"language_model": source_label(cfg.model.language_model.source), "adapter": run.has_adapter,
                     "dtype": str(self.generator.dtype).removeprefix("torch."), "engine": "vllm"}
        self.counters = {"prompts": 0, "requests": 0, "cancelled": 0, "active": 0}
        self.generator.export_metrics_to_ray()  # queue time, running requests, KV cache use: vLLM's own metrics
        self.generator.start()

    def describe(self) -> dict:
        return dict(self.info)

    def stats(self) -> dict:
        """Counters: prompts received, requests decoded, requests cancelled by their caller, requests active."""
        return dict(self.counters)

    def prepare(self, request: GenerationRequest) -> Prompt:
        """Tokenise the turns (ValueError for a prompt over the length limit)."""
        embeds = torch.from_numpy(np.stack(request.image_embeds)) if request.image_embeds else None  # [n, N, H]
        return tokenize_prompt(self.generator, request.turns, embeds, request.transcripts)

    async def generate(self, request: GenerationRequest, adapter: Any = RUN_ADAPTER) -> AsyncIterator[dict]:
        """Stream dicts: first {"prompt_tokens"} (or {"error"}), then {"text", "finish_reason", "completion_tokens"}.

        The last dict has a finish_reason. If the caller stops iterating early, the request is aborted.
        """
        self.counters["prompts"] += 1
        adapter = adapter_ref(request.run) if adapter is RUN_ADAPTER else adapter
        try:
            prompt = self.prepare(request)
            self.generator.lora_request(adapter)
        except ValueError as exc:
            yield {"error": str(exc)}
            return
        yield {"prompt_tokens": len(prompt.input_ids)}
        self.counters["requests"] += 1
        self.counters["active"] += 1
        finished = False
        try:
            async for delta in self.generator.stream(prompt, request.params, adapter):
                finished = delta.finish_reason is not None
                yield {"text": delta.text, "finish_reason": delta.finish_reason,
                       "completion_tokens": delta.completion_tokens}
        finally:
            self.counters["active"] -= 1
            if not finished:
                self.counters["cancelled"] += 1

    def __del__(self):
        generator = getattr(self, "generator", None)
        if generator is not None:
            generator.shutdown()
