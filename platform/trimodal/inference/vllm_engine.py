"""The vllm engine: vLLM's AsyncLLM (continuous batching, paged KV cache) decoding the merged text + image
embeddings that the builtin engine builds (`PromptBuilder`), streaming the same deltas (`RowText`).

It runs in the `.venv-vllm` environment (`make install-vllm`): vLLM pins transformers and fastapi below the
project's. `vllm` is imported only when an engine starts, so the pure pieces here load in either environment.

- Prompts go in as `{"prompt_embeds": [T, H]}` (`enable_prompt_embeds`); vLLM never tokenises or detokenises
  (`skip_tokenizer_init`): our tokenizer renders the prompt and `RowText` the answer, exactly as builtin does.
- EOS is our tokenizer's (vLLM's own EOS check is off, the ids are stop tokens), stop strings end a row through
  `RowText` and abort its request, as does a caller that goes away.
- LoRA: a request may name an adapter (`AdapterRef`). Adapters may not target the embeddings (prompt embeddings
  bypass them; vLLM's wrapper fails on them), and vLLM's CPU kernels give base rows the adapter in the last slot
  when every slot is taken, so at most `max_loras - 1` adapters are ever loaded (`AdapterSlots`). A new adapter
  past that evicts the least recently used one that no running request uses (`AsyncLLM.remove_lora`), then is
  loaded explicitly (`AsyncLLM.add_lora`, which reports a broken adapter as an error instead of failing a decoding
  step); while every slot is in use it waits for one to free. Ids are never reused: vLLM keys its caches by id.
- AsyncLLM belongs to the event loop it is first used on: start and use one engine from one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch

from trimodal.config import TrimodalConfig, VllmConfig
from trimodal.hardware import resolve_dtype
from trimodal.inference.engine import Completion, Delta, Prompt, PromptBuilder, RowText, completions_from_deltas
from trimodal.inference.requests import SamplingParams, prompt_token_limit
from trimodal.lru import Lru

PACKED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}
"""peft target names -> vLLM's fused module names."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VllmUnavailable(RuntimeError):
    """The vllm environment is missing or broken; the message says how to install it."""


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter a request decodes with: a peft adapter directory, under a name unique to it."""

    name: str
    """The adapter's name (a run's name, say)."""
    path: str
    """Its peft directory (adapter_config.json + adapter_model.safetensors)."""


def vllm_lora_targets(peft_targets: Sequence[str]) -> list[str]:
    """peft LoRA target names -> vLLM module names (ValueError for embeddings)."""
    embeds = [t for t in peft_targets if "embed" in t or t == "lm_head"]
    if embeds:
        raise ValueError(f"LoRA on {', '.join(embeds)} cannot serve with the vllm engine (it decodes prompt "
                         "embeddings); train adapters on the linear layers only")
    return list(dict.fromkeys(PACKED_NAMES.get(t, t) for t in peft_targets))


def check_adapter(path: str | Path) -> list[str]:
    """The peft target modules of an adapter directory; ValueError if it cannot serve (embeddings, missing or
    unreadable files; the message names the file within the adapter, not its server path)."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterLoadError("adapter/adapter_config.json is missing")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise AdapterLoadError(f"adapter/adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterLoadError("adapter/adapter_config.json is not a JSON object")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    saved = [m for m in (config.get("modules_to_save") or []) if "embed" in m or m == "lm_head"]
    vllm_lora_targets(targets + saved)
    check_adapter_weights(Path(path) / "adapter_model.safetensors")
    return targets


def check_adapter_weights(file: Path) -> None:
    """AdapterLoadError unless the adapter's safetensors file exists and its header reads."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise AdapterLoadError("adapter/adapter_model.safetensors is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as exc:
        raise AdapterLoadError(f"adapter/adapter_model.safetensors is not a readable safetensors file ({exc})") \
            from None


def omp_threads_bind(setting: str) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a setting: `all` -> the cores this process may run on (e.g. 0-1)."""
    if setting != "all":
        return setting
    cores = sorted(os.sched_getaffinity(0))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    return f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))


NO_TELEMETRY_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
"""Environment that turns off vLLM's usage statistics (vllm.usage.usage_lib reads VLLM_NO_USAGE_STATS and
DO_NOT_TRACK) and Hugging Face Hub telemetry: set in every process the project starts that may run either."""


def engine_env(vcfg: VllmConfig) -> dict[str, str]:
    """Environment variables vLLM reads at start: no usage statistics, OpenMP core binding on CPU. Its engine
    processes are started after this is applied, so they inherit it."""
    return {**NO_TELEMETRY_ENV, "VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind(vcfg.omp_threads_bind)}


def engine_kwargs(model_dir: str | Path, vcfg: VllmConfig, lora_targets: Sequence[str], max_model_len: int,
                  device: str = "cpu") -> dict:
    """AsyncEngineArgs keyword arguments for our use of vLLM."""
    kwargs = {"model": str(model_dir), "dtype": vcfg.dtype, "enable_prompt_embeds": True,
              "skip_tokenizer_init": True, "enforce_eager": vcfg.enforce_eager, "max_num_seqs": vcfg.max_num_seqs,
              "max_model_len": max_model_len, "enable_prefix_caching": vcfg.enable_prefix_caching, "seed": 0}
    if vcfg.block_size:
        kwargs["block_size"] = vcfg.block_size
    if lora_targets:
        kwargs.update(enable_lora=True, max_loras=vcfg.max_loras, max_lora_rank=vcfg.max_lora_rank,
                      lora_target_modules=list(lora_targets))
    if device.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(vcfg.kv_cache_gib * 2**30)
    return kwargs


def sampling_kwargs(params: SamplingParams, eos_ids: set[int]) -> dict:
    """vLLM SamplingParams keyword arguments matching the builtin decoder (our EOS, our detokenising)."""
    return {"n": 1, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p if params.temperature > 0 else 1.0, "seed": params.seed, "ignore_eos": True,
            "stop_token_ids": sorted(eos_ids), "detokenize": False}


class AdapterLoadError(ValueError):
    """An adapter the engine cannot load; the message says what is wrong, without server paths."""


@dataclass
class AdapterSlot:
    """One adapter held for the engine."""

    id: int
    """Its LoRARequest id (from 1, never reused)."""
    path: str
    """Its peft directory."""
    users: int = 0
    """Requests holding it now (`lease`): it is not evicted while any does."""
    loaded: bool = False
    """The engine has loaded it (add_lora succeeded)."""


class AdapterSlots:
    """LoRARequest ids for adapters by name, at most `limit` held (vLLM's max_loras - 1), least recently used first:
    a new adapter past the limit evicts the least recently used one that no request holds. Plain bookkeeping (no
    vLLM): the generator loads and removes what `claim` and `take_evicted` say."""

    def __init__(self, limit: int):
        self.limit = limit
        self.slots: Lru[str, AdapterSlot] = Lru(max(1, limit), on_evict=self._evicted)
        """Adapter name -> its slot, least recently used first."""
        self.next_id = 1
        self.loads = 0
        """Adapters loaded into the engine so far."""
        self._evicted_ids: list[int] = []

    @property
    def evictions(self) -> int:
        """Adapters evicted so far to stay within the limit."""
        return self.slots.stats.evictions

    @property
    def loaded(self) -> int:
        """Adapters the engine holds now."""
        return sum(slot.loaded for slot in self.slots.values())

    def claim(self, adapter: AdapterRef) -> AdapterSlot | None:
        """The adapter's slot with one more user (load it unless `loaded`), most recently used; None while every
        slot is held by a request (retry after a `release`). ValueError: another path under its name, or an adapter
        that cannot serve (check_adapter)."""
        slot = self.slots.get(adapter.name)
        if slot is not None and slot.path != adapter.path:
            raise AdapterLoadError(f"adapter {adapter.name!r} is already loaded from another directory")
        if slot is None:
            held = {name for name, held_slot in zip(self.slots.keys(), self.slots.values()) if held_slot.users}
            if len(held) >= self.limit:
                return None
            check_adapter(adapter.path)
            slot = AdapterSlot(self.next_id, adapter.path)
            self.next_id += 1
            self.slots.add(adapter.name, slot)
            self.slots.evict(keep=held | {adapter.name})
        slot.users += 1
        return slot

    def release(self, name: str) -> None:
        """One user of the adapter `name` is done with it."""
        slot = self.slots.get(name)
        if slot is not None:
            slot.users -= 1

    def take_evicted(self) -> list[int]:
        """Ids evicted since the last call, that the engine still holds (remove them before loading another)."""
        ids, self._evicted_ids = self._evicted_ids, []
        return ids

    def _evicted(self, name: str, slot: AdapterSlot) -> None:
        if slot.loaded:
            self._evicted_ids.append(slot.id)


class VllmGenerator:
    """vLLM decoding with the builtin engine's prompts and deltas; one request per call, batched by vLLM."""

    def __init__(self, prompts: PromptBuilder, kwargs: dict, env: dict[str, str], eos_ids: set[int], dtype: str,
                 max_loras: int):
        self.prompts = prompts
        self.kwargs = kwargs
        self.env = env
        self.eos_ids = set(eos_ids)
        self.dtype = DTYPES[dtype]
        self.adapters = AdapterSlots(max_loras - 1)
        self._slots_changed: asyncio.Condition | None = None
        """Held while adapters are loaded or removed; notified when a request releases one."""
        self.stat_loggers: list = []
        """vLLM stat-logger factories the engine starts with (none: vLLM records no metrics)."""
        self._engine = None

    def export_metrics_to_ray(self) -> None:
        """Have the engine record its own metrics (vllm:num_requests_running, vllm:kv_cache_usage_perc, time to
        first token, ...) through Ray's metrics API, exported as `ray_vllm_*` with Ray's (call before start)."""
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.kwargs["disable_log_stats"] = False
        self.stat_loggers = [RayPrometheusStatLogger]

    def encode(self, turns, num_patches: int) -> list[int]:
        """Chat-formatted prompt ids (the builtin engine's, same limit)."""
        return self.prompts.encode(turns, num_patches)

    def start(self):
        """Start the engine (once; call it from the event loop that will use it)."""
        if self._engine is None:
            os.environ.update(self.env)
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs),
                                                     stat_loggers=self.stat_loggers or None)
        return self._engine

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def check_lora(self, adapter: AdapterRef | None) -> None:
        """ValueError if the adapter cannot serve here (LoRA off, embeddings targeted, files missing or unreadable)."""
        if adapter is None:
            return
        if not self.kwargs.get("enable_lora"):
            raise ValueError("this vllm engine was started without LoRA (no adapter targets)")
        check_adapter(adapter.path)

    @contextlib.asynccontextmanager
    async def lease(self, adapter: AdapterRef | None) -> AsyncIterator:
        """vLLM's LoRARequest for an adapter (None for the base model), loaded in the engine and not evicted until
        the block ends; AdapterLoadError (a ValueError) when vLLM cannot load it."""
        if adapter is None:
            yield None
            return
        self.check_lora(adapter)
        from vllm.lora.request import LoRARequest

        if self._slots_changed is None:
            self._slots_changed = asyncio.Condition()
        async with self._slots_changed:
            slot = await self._slots_changed.wait_for(lambda: self.adapters.claim(adapter))
            try:
                await self._load(LoRARequest(adapter.name, slot.id, adapter.path), slot)
            except BaseException:
                self.adapters.release(adapter.name)
                raise
        try:
            yield LoRARequest(adapter.name, slot.id, adapter.path)
        finally:
            self.adapters.release(adapter.name)
            await asyncio.shield(self._released())  # a cancelled caller still wakes the requests waiting for a slot

    async def _released(self) -> None:
        async with self._slots_changed:
            self._slots_changed.notify_all()

    async def _load(self, lora, slot: AdapterSlot) -> None:
        """Remove what was evicted from the engine, then load `lora` unless it is loaded (under the slot lock)."""
        engine = self.start()
        for evicted in self.adapters.take_evicted():
            await engine.remove_lora(evicted)
        if slot.loaded:
            return
        try:
            await engine.add_lora(lora)
        except Exception as exc:  # vLLM answers a failed load as a plain Exception naming the call
            message = str(exc).replace(f"{slot.path}/", "adapter/").replace(slot.path, "adapter")
            raise AdapterLoadError(f"the adapter does not load in vLLM ({message.splitlines()[0][:300]})") from None
        slot.loaded = True
        self.adapters.loads += 1

    def _sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        return VllmSampling(output_kind=RequestOutputKind.DELTA, **sampling_kwargs(params, self.eos_ids))

    async def stream(self, prompt: Prompt, params: SamplingParams, adapter: AdapterRef | None = None,
                     row: int = 0) -> AsyncIterator[Delta]:
        """One request's deltas (row index `row`); closing the iterator early aborts the request."""
        params = self.prompts.fit(prompt, params)
        text = RowText(row, self.prompts.tokenizer, params)
        self.check_lora(adapter)
        if params.max_tokens <= 0:
            yield text.end(False)
            return
        async with self.lease(adapter) as lora:
            async for delta in self._generate(prompt, params, text, lora):
                yield delta

    async def _generate(self, prompt: Prompt, params: SamplingParams, text: RowText, lora) -> AsyncIterator[Delta]:
        """One request's deltas from the engine, with `lora` (held by the caller); aborted if closed early."""
        engine = self.start()
        embeds = self.prompts.embed(prompt).to(self.dtype).cpu()  # [T, H]
        request_id = uuid.uuid4().hex
        reason = None
        try:
            async for out in engine.generate({"prompt_embeds": embeds}, self._sampling(params), request_id,
                                             lora_request=lora):
                for delta in self._deltas(text, out.outputs[0].token_ids):
                    yield delta
                reason = out.outputs[0].finish_reason
                if text.done:
                    break
            if not text.done:
                yield text.eos() if reason == "stop" else text.end(False)
        finally:
            if not text.done or reason is None:
                await engine.abort(request_id)

    def _deltas(self, text: RowText, token_ids: Sequence[int]) -> list[Delta]:
        deltas = []
        for token in token_ids:
            delta = text.eos() if token in self.eos_ids else text.token(token)
            if delta is not None:
                deltas.append(delta)
            if text.done:
                break
        return deltas

    async def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
                       adapters: Sequence[AdapterRef | None] | None = None) -> list[Completion]:
        """All prompts at once (vLLM batches them), non-streaming."""
        import asyncio

        adapters = adapters or [None] * len(prompts)

        async def run(i: int) -> list[Delta]:
            return [d async for d in self.stream(prompts[i], params[i], adapters[i], row=i)]

        rows = await asyncio.gather(*(run(i) for i in range(len(prompts))))
        return completions_from_deltas(iter([d for deltas in rows for d in deltas]), prompts)


def load_embedding_table(model_dir: str | Path) -> torch.nn.Embedding:
    """The LM's input embedding table, read from its safetensors (float32) without loading the model."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = [k for k in handle.keys() if k.endswith("embed_tokens.weight")]
            if names:
                return torch.nn.Embedding.from_pretrained(handle.get_tensor(names[0]).float(), freeze=True)
    raise FileNotFoundError(f"{model_dir}: no embed_tokens.weight in its safetensors files")


def max_model_len(cfg: TrimodalConfig, model_dir: str | Path) -> int:
    """The longest prompt plus the most new tokens, within the model's position limit (max_position_embeddings)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    context = config.get("max_position_embeddings")
    want = prompt_token_limit(cfg, context) + cfg.serving.max_tokens_limit
    return min(want, context or want)


def load_vllm_generator(cfg: TrimodalConfig, adapter_targets: Sequence[str] = (), device: str = "cpu",
                        max_prompt_tokens: int | None = None) -> VllmGenerator:
    """The config's LM as a VllmGenerator; `adapter_targets`: the peft targets its adapters may have (the
    config's lora.target_modules when serving runs; empty: no LoRA). The engine starts on first use."""
    from trimodal.models.language import image_end_id, lm_directory

    vcfg = dataclasses.replace(cfg.serving.vllm, dtype=resolve_dtype(cfg.serving.vllm.dtype, device))
    model_dir, tokenizer = lm_directory(cfg.model.language_model)
    limit = max_prompt_tokens if max_prompt_tokens is not None else prompt_token_limit(cfg)
    model_len = max_model_len(cfg, model_dir)
    prompts = PromptBuilder(tokenizer, load_embedding_table(model_dir), image_end_id(cfg.model.language_model,
                                                                                     tokenizer), limit, model_len)
    targets = vcfg.lora_target_modules or (vllm_lora_targets(adapter_targets) if adapter_targets else [])
    kwargs = engine_kwargs(model_dir, vcfg, targets, model_len, device)
    return VllmGenerator(prompts, kwargs, engine_env(vcfg), {tokenizer.eos_token_id}, vcfg.dtype, vcfg.max_loras)
