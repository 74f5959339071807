"""The vllm engine's pure pieces (no vllm needed): adapter checks, LoRA target names, the adapter slots' eviction
bookkeeping, engine and sampling arguments, the embedding table read from safetensors, and the shared per-row delta
logic."""

import json
from pathlib import Path

import pytest
import torch

from trimodal.config import load_config
from trimodal.inference.engine import Prompt, RowText, TextGenerator
from trimodal.inference.generation import decode_steps
from trimodal.inference.requests import SamplingParams
from trimodal.inference.vllm_engine import (AdapterRef, AdapterSlots, check_adapter, engine_kwargs,
                                            load_embedding_table, max_model_len, omp_threads_bind, sampling_kwargs,
                                            vllm_lora_targets)
from trimodal.models.chat import Turn


def _adapter(tmp_path: Path, name: str, targets, modules_to_save=None) -> str:
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"target_modules": targets,
                                                            "modules_to_save": modules_to_save}))
    save_file({"lora_A": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_lora_targets_map_to_vllm_names_and_refuse_embeddings():
    assert vllm_lora_targets(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) == [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert vllm_lora_targets(["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]) == [
        "qkv_proj", "dense", "fc1", "fc2"]
    with pytest.raises(ValueError, match="LoRA on embed_tokens cannot serve with the vllm engine"):
        vllm_lora_targets(["q_proj", "embed_tokens"])


def test_check_adapter_refuses_embeddings_and_non_adapters(tmp_path):
    assert check_adapter(_adapter(tmp_path, "ok", ["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="embed_tokens cannot serve"):
        check_adapter(_adapter(tmp_path, "emb", ["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="lm_head cannot serve"):
        check_adapter(_adapter(tmp_path, "head", ["q_proj"], ["lm_head"]))
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        check_adapter(tmp_path)


def test_check_adapter_names_the_broken_file_without_its_path(tmp_path):
    bad_json = Path(_adapter(tmp_path, "json", ["q_proj"]))
    (bad_json / "adapter_config.json").write_text("{not json")
    truncated = Path(_adapter(tmp_path, "cut", ["q_proj"]))
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    missing = Path(_adapter(tmp_path, "gone", ["q_proj"]))
    (missing / "adapter_model.safetensors").unlink()
    for folder, fault in ((bad_json, "adapter/adapter_config.json is not valid JSON"),
                          (truncated, "adapter/adapter_model.safetensors is not a readable safetensors file"),
                          (missing, "adapter/adapter_model.safetensors is missing")):
        with pytest.raises(ValueError, match=fault) as caught:
            check_adapter(folder)
        assert str(tmp_path) not in str(caught.value)


def _load(slots: AdapterSlots, adapter: AdapterRef):
    """What the generator does with a claim: remove what was evicted, load what is new; the slot (or None)."""
    slot = slots.claim(adapter)
    removed = slots.take_evicted()
    if slot is not None and not slot.loaded:
        slot.loaded = True
        slots.loads += 1
    return slot, removed


def test_adapter_slots_keep_a_slot_free_and_evict_the_least_recently_used_idle_adapter(tmp_path):
    slots = AdapterSlots(limit=2)  # max_loras 3: one slot stays free for base rows
    a, b, c = (AdapterRef(n, _adapter(tmp_path, n, ["q_proj"])) for n in "abc")
    (sa, _), (sb, _) = _load(slots, a), _load(slots, b)
    assert (sa.id, sb.id) == (1, 2) and slots.loaded == 2
    slots.release("a"), slots.release("b")
    assert _load(slots, a)[0].id == 1  # a is now the most recently used
    slots.release("a")
    sc, removed = _load(slots, c)  # full: b, the least recently used and idle, goes
    assert (sc.id, removed, slots.evictions, slots.loaded) == (3, [2], 1, 2)
    slots.release("c")
    sb2, removed = _load(slots, b)  # back again under a new id (vLLM keys its caches by id)
    assert (sb2.id, removed, slots.evictions, slots.loads) == (4, [1], 2, 4)
    with pytest.raises(ValueError, match="already loaded from another directory"):
        slots.claim(AdapterRef("b", a.path))


def test_adapter_slots_wait_while_every_slot_is_held(tmp_path):
    slots = AdapterSlots(limit=2)
    a, b, c = (AdapterRef(n, _adapter(tmp_path, n, ["q_proj"])) for n in "abc")
    _load(slots, a), _load(slots, b)  # both held by running requests
    assert slots.claim(c) is None and slots.evictions == 0  # nothing evicted under a running request
    assert _load(slots, a)[0].users == 2  # a held adapter is shared without a slot of its own
    slots.release("b")
    sc, removed = _load(slots, c)
    assert sc is not None and removed == [2] and slots.slots.keys() == ["a", "c"]


def test_engine_and_sampling_arguments():
    vcfg = load_config("cpu").serving.vllm
    plain = engine_kwargs("/m", vcfg, [], 2048)
    assert plain["enable_prompt_embeds"] and plain["skip_tokenizer_init"] and "enable_lora" not in plain
    assert "gpu_memory_utilization" not in plain and plain["kv_cache_memory_bytes"] == int(vcfg.kv_cache_gib * 2**30)
    assert plain["block_size"] == vcfg.block_size == 32
    assert "block_size" not in engine_kwargs("/m", load_config("phi2").serving.vllm, [], 2048, device="cuda")
    lora = engine_kwargs("/m", vcfg, ["qkv_proj"], 2048, device="cuda")
    assert (lora["max_loras"], lora["lora_target_modules"]) == (vcfg.max_loras, ["qkv_proj"])
    assert lora["gpu_memory_utilization"] == vcfg.gpu_memory_utilization and "kv_cache_memory_bytes" not in lora
    greedy = sampling_kwargs(SamplingParams(max_tokens=5, top_p=0.5), {7})
    assert greedy["ignore_eos"] and greedy["stop_token_ids"] == [7] and greedy["top_p"] == 1.0
    assert sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, seed=3), {7})["top_p"] == 0.9


def test_omp_threads_bind_all_names_this_process_cores():
    cores = sorted(__import__("os").sched_getaffinity(0))
    assert omp_threads_bind("all") in (f"{cores[0]}-{cores[-1]}", ",".join(map(str, cores)))
    assert omp_threads_bind("0-1") == "0-1"


def test_embedding_table_from_safetensors_equals_the_model(tiny_lm, tmp_path):
    lm, _ = tiny_lm
    lm.save_pretrained(tmp_path, safe_serialization=True)
    table = load_embedding_table(tmp_path)
    assert torch.equal(table.weight, lm.get_input_embeddings().weight)
    cfg = load_config("test")
    assert max_model_len(cfg, tmp_path) == min(cfg.data.max_length * 8 + cfg.serving.max_tokens_limit,
                                                lm.config.max_position_embeddings)


def test_row_text_streams_like_the_builtin_generator(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompt = Prompt(gen.encode([Turn("user", "hello there")], 0), None)
    for params in (SamplingParams(max_tokens=12), SamplingParams(max_tokens=30, stop=("e",))):
        builtin = list(gen.stream([prompt], [params]))
        ids = [t for step in decode_steps(lm, [gen.embed(prompt)], [params], gen.eos_ids) for _, t in step.tokens]
        row = RowText(0, tok, params)
        replay = []
        for token in ids:
            delta = row.eos() if token == -1 else row.token(token)
            replay += [delta] if delta is not None else []
            if row.done:
                break
        if not row.done:
            replay.append(row.end(False))
        assert [(d.text, d.finish_reason, d.completion_tokens) for d in replay] == [
            (d.text, d.finish_reason, d.completion_tokens) for d in builtin]


def test_row_text_stop_string_and_eos():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    row = RowText(2, Bytes(), SamplingParams(max_tokens=50, stop=("END",)))
    out = [row.token(t) for t in b"abEN"]
    assert "".join(d.text for d in out if d) == "ab"  # "EN" held back: it may start END
    final = row.token(ord("D"))
    assert (final.text, final.finish_reason, final.completion_tokens, final.row) == ("", "stop", 5, 2)
    eos_row = RowText(0, Bytes(), SamplingParams(max_tokens=5))
    eos_row.token(ord("x"))
    assert (eos_row.eos().finish_reason, eos_row.count) == ("stop", 1)
