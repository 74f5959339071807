"""The LanguageModel deployment as a plain class, on either engine: `LanguageModel` (our KV-cache decoder, in
dynamic batches) and `VllmLanguageModel` (serving.engine: vllm, continuous batching in the `.venv-vllm`
environment). Both stream the same dicts from `generate` and answer `describe` and `stats` alike.

Each request names its run (`RunBundle`, None for the base model) and decodes with that run's LoRA adapter: one
base LM, every run's adapter under its own adapter name (at most serving.max_loaded_runs loaded, least recently
used evicted), and rows of different runs in one decoding batch, each with its own adapter (base rows with none).

`LanguageModel.BATCHED` ({single-item method: list method}) names what the builder routes through `serve.batch`,
so concurrent requests share one decoding batch; plain, the single method runs a batch of one. The batch decodes
in a worker thread and streams per-step deltas; a caller that goes away (client disconnect) marks its row
cancelled and the decoder drops it.

A run whose adapter cannot be loaded fails alone, before its request joins a batch: `generate`'s first dict is then
{"error": what is wrong, "code": RUN_UNAVAILABLE} (the ingress names the run), and the replica serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
import torch

from trimodal.config import TrimodalConfig
from trimodal.inference.engine import Delta, Prompt, tokenize_prompt
from trimodal.inference.requests import GenerationRequest, RunBundle, SamplingParams

from serve_app.metrics import LanguageModelMetrics
from serve_app.replica import default_run_bundle, run_label, set_threads, source_label

log = logging.getLogger("trimodal.serve")


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
RUN_UNAVAILABLE = "run_unavailable"
"""The `code` of generate's first dict when the request's run cannot be loaded."""


def request_prompt(generator: Any, request: GenerationRequest) -> Prompt:
    """A request's turns tokenised by `generator` (either engine: anything with TextGenerator's `encode`, i.e. its
    tokenizer, chat template and prompt limit); ValueError for a prompt over the length limit."""
    embeds = torch.from_numpy(np.stack(request.image_embeds)) if request.image_embeds else None  # [n, N, H]
    return tokenize_prompt(generator, request.turns, embeds, request.transcripts)


class LanguageModel:
    """The LM + tokenizer: prompts are tokenised per request, then decoded in dynamic batches with a KV cache.

    One base LM; each request's run brings its LoRA adapter (`RunAdapters`: loaded on first use, at most
    serving.max_loaded_runs, the default run's at start); a batch mixes runs, each row with its own adapter.
    `test_token_delay_s` > 0 swaps the decoder for the test suite's SteadyGenerator (tests and drills that need
    answers of a known duration).
    """

    BATCHED = {"decode": "decode_batch"}

    def __init__(self, cfg: TrimodalConfig, run_dir: str | None, device: str = "cpu", threads: int | None = None,
                 test_token_delay_s: float = 0.0):
        from trimodal.runs import RunAdapters, load_text_generator, read_run

        set_threads(threads)
        self.generator = load_text_generator(cfg, read_run(None), device)
        self.adapters = RunAdapters(self.generator, cfg.serving.max_loaded_runs)
        default = default_run_bundle(run_dir)
        self.adapters.load(default)
        dtype = next(self.generator.lm.parameters()).dtype
        if test_token_delay_s > 0:
            self.generator = steady_generator(self.generator, test_token_delay_s)
        self.info = {"language_model": source_label(cfg.model.language_model.source),
                     "adapter": bool(default and default.adapter), "dtype": str(dtype).removeprefix("torch."),
                     "engine": "builtin"}
        self.counters = {"prompts": 0, "requests": 0, "batches": 0, "largest_batch": 0, "cancelled": 0, "active": 0}
        self.metrics = LanguageModelMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def describe(self) -> dict:
        """The LM's source, whether the default run brings an adapter, the dtype it runs in (serving.dtype), engine
        "builtin"."""
        return dict(self.info)

    def prepare(self, request: GenerationRequest) -> Prompt:
        """Tokenise the turns (ValueError for a prompt over the length limit)."""
        return request_prompt(self.generator, request)

    def stats(self) -> dict:
        """Counters: prompts received, requests decoded, batches, the largest batch, rows cancelled by their caller,
        rows active; adapters loaded now, loads and evictions so far."""
        return {**self.counters, "adapters_loaded": len(self.adapters.loaded), "adapter_loads": self.adapters.loads,
                "adapter_evictions": self.adapters.evictions}

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
            from trimodal.runs import RunLoadError

            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.adapters.load, request.run)
            except RunLoadError as exc:
                yield {"error": str(exc), "code": RUN_UNAVAILABLE}
                return
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


def steady_generator(real: Any, delay_s: float) -> Any:
    """The test suite's SteadyGenerator around `real`: one "x" per `delay_s` seconds (tests/support; importable
    where the repository root is on sys.path, as tests and drills put it for themselves and their Ray workers)."""
    try:
        from tests.support.steady_generator import SteadyGenerator
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("tests"):
            raise
        raise RuntimeError("test_token_delay_s is for tests and drills: it needs the repository's tests/ package "
                           "(the repository root on sys.path)") from exc
    return SteadyGenerator(real, delay_s)


RUN_ADAPTER = object()
"""VllmLanguageModel.generate's default adapter: the one of the run the request names."""


def adapter_ref(run: RunBundle | None):
    """The vllm engine's handle on a run's LoRA adapter (None: the base model, or a run without an adapter); its
    name changes when the run is finished again at the same place, so vLLM loads it afresh."""
    from trimodal.inference.vllm_engine import AdapterRef

    if run is None or run.adapter is None:
        return None
    return AdapterRef(run_label(run), run.adapter)


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
        self.run_adapter = adapter_ref(default_run_bundle(run_dir))
        if self.run_adapter is not None:
            self.generator.check_lora(self.run_adapter)  # refuse an unservable adapter now, not per request
        self.info = {"language_model": source_label(cfg.model.language_model.source), "adapter": run.has_adapter,
                     "dtype": str(self.generator.dtype).removeprefix("torch."), "engine": "vllm"}
        self.counters = {"prompts": 0, "requests": 0, "cancelled": 0, "active": 0}
        self.generator.export_metrics_to_ray()  # queue time, running requests, KV cache use: vLLM's own metrics
        self.generator.start()

    def describe(self) -> dict:
        """The LM's source, whether the default run has an adapter, the dtype vLLM loaded, engine "vllm"."""
        return dict(self.info)

    def prepare(self, request: GenerationRequest) -> Prompt:
        """Tokenise the turns with the engine's tokenizer and chat template (ValueError past the prompt limit)."""
        return request_prompt(self.generator, request)

    def stats(self) -> dict:
        """Counters: prompts received, requests decoded, requests cancelled by their caller, requests active;
        adapters loaded in the engine now, loads and evictions so far."""
        slots = self.generator.adapters
        return {**self.counters, "adapters_loaded": slots.loaded, "adapter_loads": slots.loads,
                "adapter_evictions": slots.evictions}

    async def generate(self, request: GenerationRequest, adapter: Any = RUN_ADAPTER) -> AsyncIterator[dict]:
        """Stream dicts: first {"prompt_tokens"} (or {"error"}), then {"text", "finish_reason", "completion_tokens"}.

        The last dict has a finish_reason. If the caller stops iterating early, the request is aborted.
        """
        self.counters["prompts"] += 1
        adapter = adapter_ref(request.run) if adapter is RUN_ADAPTER else adapter
        try:
            prompt = self.prepare(request)
        except ValueError as exc:
            yield {"error": str(exc)}
            return
        async with contextlib.AsyncExitStack() as held:
            try:  # load the adapter before answering, so a run that cannot be loaded fails alone, up front
                await held.enter_async_context(self.generator.lease(adapter))
            except ValueError as exc:
                yield {"error": str(exc), "code": RUN_UNAVAILABLE}
                return
            yield {"prompt_tokens": len(prompt.input_ids)}
            async with contextlib.aclosing(self._stream(prompt, request, adapter)) as outs:
                async for out in outs:
                    yield out

    async def _stream(self, prompt: Prompt, request: GenerationRequest, adapter: Any) -> AsyncIterator[dict]:
        self.counters["requests"] += 1
        self.counters["active"] += 1
        finished = False
        try:
            async with contextlib.aclosing(self.generator.stream(prompt, request.params, adapter)) as deltas:
                async for delta in deltas:
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
