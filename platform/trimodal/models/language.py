"""The causal language model and its tokenizer: any Hugging Face causal LM, a packaged one, or a tiny random one."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerFast)

from trimodal.config import LanguageModelConfig, QuantConfig, TinyLMShape
from trimodal.models.init import seeded
from trimodal.weights.sources import atomic_build, default_cache_dir, resolve_source

# ChatML, as SmolLM2 and Qwen use; for tokenizers that ship no chat template (e.g. Phi-2 uses its own below).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Phi-2's documented QA format ("Instruct: ...\nOutput: ..."), each answer closed by EOS.
INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Instruct: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Output: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_LM_POSITIONS = 1024
"""Positions of the tiny random Llama (its max_position_embeddings)."""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + 4 specials) built in-process, with a ChatML template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # alphabet() is a set: sort for stable ids
    byte_vocab = {ch: i + len(TINY_SPECIALS) for i, ch in enumerate(alphabet)}
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)} | byte_vocab
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_random_lm(shape: TinyLMShape, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama, reproducible from `seed`."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
                         intermediate_size=shape.intermediate_size, max_position_embeddings=RANDOM_LM_POSITIONS,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.2)  # wide init: a random model that does not repeat one token
    with seeded(seed):
        return LlamaForCausalLM(config)


def set_chat_template(tokenizer, choice: str) -> None:
    if choice == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif choice == "instruct" or tokenizer.chat_template is None:
        tokenizer.chat_template = INSTRUCT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def bnb_config(quant: QuantConfig) -> BitsAndBytesConfig:
    """bitsandbytes 4-bit config (NF4 QLoRA); works on CPU with bitsandbytes >= 0.48."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype])


def load_language_model(cfg: LanguageModelConfig, quant: QuantConfig | None = None,
                        device: str | torch.device = "cpu",
                        cache_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load (model, tokenizer) for `cfg`; `quant` with load_in_4bit loads the weights in 4 bit."""
    quantized = quant is not None and quant.load_in_4bit
    if cfg.source.kind == "random" and not quantized:
        tokenizer = build_tiny_tokenizer()
        model = build_random_lm(cfg.random_shape, len(tokenizer)).to(DTYPES[cfg.dtype])
        model.set_attn_implementation(cfg.attn_implementation)
        return model.to(device), tokenizer
    if cfg.source.kind == "random":
        path = saved_random_lm(cfg.random_shape, cache_dir or default_cache_dir())  # bitsandbytes loads from disk
    else:
        path = resolve_source(cfg.source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_chat_template(tokenizer, cfg.chat_template)
    kwargs = {"dtype": DTYPES[cfg.dtype], "use_safetensors": True, "attn_implementation": cfg.attn_implementation}
    if quant is not None and quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return model, tokenizer


def saved_random_lm(shape: TinyLMShape, cache_dir: Path) -> Path:
    """The random LM and tokenizer written once to disk, so quantised loading takes the normal path."""
    name = f"random-lm-{shape.hidden_size}x{shape.num_layers}x{shape.num_heads}x{shape.intermediate_size}"

    def build(tmp: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        build_random_lm(shape, len(tokenizer)).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_build(cache_dir / name, build)


def lm_directory(cfg: LanguageModelConfig, cache_dir: Path | None = None) -> tuple[Path, PreTrainedTokenizerFast]:
    """(a directory of the LM's config + safetensors, its tokenizer) for engines that load weights themselves (vLLM);
    a random LM is written there once, the same weights as `load_language_model` builds."""
    if cfg.source.kind == "random":
        return saved_random_lm(cfg.random_shape, cache_dir or default_cache_dir()), build_tiny_tokenizer()
    path = resolve_source(cfg.source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_chat_template(tokenizer, cfg.chat_template)
    return path, tokenizer


def image_end_id(cfg: LanguageModelConfig, tokenizer) -> int:
    """The end-of-image marker token id (configured, else EOS)."""
    return cfg.image_end_token_id if cfg.image_end_token_id is not None else tokenizer.eos_token_id
