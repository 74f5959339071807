"""Phi-2 rehearsal weights: Phi-2's tokenizer rebuilt offline, a tiny random Phi and a TinyCLIP-shaped tower that the
`phi2` preset loads (bf16, 4-bit NF4 + LoRA) once its two weight sources are overridden."""

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trimodal.__main__ import main
from trimodal.config import ModelSource, VisionConfig, load_config
from trimodal.models.chat import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_ID, Turn, encode_conversation
from trimodal.models.language import INSTRUCT_TEMPLATE, load_language_model
from trimodal.models.vision import load_vision_tower
from trimodal.models import rehearsal
from trimodal.models.rehearsal import (EOS_ID, WHITESPACE_TOKENS, TinyPhiShape, build_phi2_rehearsal,
                                        build_tiny_phi, build_tinyclip_shaped, gpt2_bpe, gpt2_ranks_file,
                                        load_bpe_ranks, merge_pair, phi2_tokenizer, rehearsal_overrides,
                                        recover_merges)

# GPT-2's pre-tokenizer split (openai/gpt-2 src/encoder.py), the pattern tiktoken's "gpt2" encoding uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAR_POOLS = (
    [chr(c) for c in range(0x20, 0x7F)],  # ASCII
    [" ", " ", "\t", "\n", "\r", "\u00a0", "\u3000", "\u200b"],  # whitespace, extra weight on spaces
    [chr(c) for c in range(0xA0, 0x250)],  # Latin-1 and Latin Extended
    [chr(c) for c in range(0x300, 0x370)],  # combining marks
    [chr(c) for c in range(0x4E00, 0x4F00)],  # CJK
    [chr(c) for c in range(0x1F600, 0x1F650)],  # emoji (4-byte UTF-8)
)


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing scripts, byte lengths and whitespace runs."""
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(CHAR_POOLS)) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def tok():
    return phi2_tokenizer()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_phi2_rehearsal(tmp_path_factory.mktemp("rehearsal"))


def test_token_ids_are_phi2s(tok):
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == EOS_ID == 50256
    assert tok.pad_token is None and tok.chat_template is None  # Phi-2 ships neither
    assert len(tok) == 50295
    # The seed's end-of-image marker: the same string as GPT-2's rank 23893.
    gpt2_bytes = {rank: token for token, rank in load_bpe_ranks(gpt2_ranks_file()).items()}[23893]
    assert tok.decode([23893]) == gpt2_bytes.decode() == "comment"
    assert tok.convert_tokens_to_ids([" " * 31, "  ", "\t" * 9, "\t\t"]) == [50257, 50286, 50287, 50294]
    assert tok("if x:\n    return")["input_ids"][-2] == 50284  # four spaces are one token, as in Phi-2
    assert tok("a<|endoftext|>")["input_ids"] == [64, EOS_ID]


def test_bpe_encodes_exactly_like_tiktoken_on_the_same_ranks():
    """The recovered merges reproduce GPT-2's BPE: token for token what tiktoken gives from the same ranks file."""
    import tiktoken
    ranks = load_bpe_ranks(gpt2_ranks_file())
    reference = tiktoken.Encoding("gpt2-ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    bpe = gpt2_bpe(ranks)
    texts = random_texts(300) + Path(__file__).read_text().splitlines()
    for text in texts:
        assert bpe.encode(text).ids == reference.encode_ordinary(text), text
    assert len(recover_merges(ranks)) == len(ranks) - 256  # one merge per multi-byte token


def test_merge_pair_refuses_a_token_lower_ranks_cannot_build():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bcd": 5, b"d": 6}
    assert merge_pair(ranks, b"abc") == (b"ab", b"c")
    with pytest.raises(ValueError, match="cannot be built"):
        merge_pair(ranks, b"bcd")


def test_decode_round_trips_arbitrary_unicode(tok):
    for text in random_texts(300, seed=1) + ["  lead", "tail\t\t", " " * 40, "\t" * 12 + "x"]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_saved_lm_loads_as_phi2_with_the_instruct_template(weights, tok):
    cfg = load_config("phi2", overrides=rehearsal_overrides(weights)).model.language_model
    lm, loaded_tok = load_language_model(cfg)
    c = lm.config
    assert type(lm).__name__ == "PhiForCausalLM" and lm.dtype == torch.bfloat16
    assert lm.get_input_embeddings().weight.shape[0] == c.vocab_size == 51200
    assert c.hidden_size // c.num_attention_heads == 80
    assert c.rope_parameters["partial_rotary_factor"] == 0.4 and c.rope_parameters["rope_theta"] == 10000.0
    assert (c.resid_pdrop, c.embd_pdrop, c.attention_dropout) == (0.1, 0.0, 0.0)
    assert (c.max_position_embeddings, c.layer_norm_eps, c.hidden_act) == (2048, 1e-5, "gelu_new")
    assert (c.tie_word_embeddings, c.qk_layernorm, c.bos_token_id, c.eos_token_id) == (False, False, EOS_ID, EOS_ID)
    assert loaded_tok.chat_template == INSTRUCT_TEMPLATE and loaded_tok.pad_token_id == EOS_ID
    for text in random_texts(50, seed=2):
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    enc = encode_conversation(loaded_tok, [Turn("user", f"{IMAGE_MARKER}\nWhat is it?"), Turn("assistant", "A cat.")],
                              num_patches=49, image_end_id=cfg.image_end_token_id)
    start = enc.input_ids.index(IMAGE_TOKEN_ID)
    assert enc.input_ids[start:start + 50] == [IMAGE_TOKEN_ID] * 49 + [23893]
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert loaded_tok.decode(answer).strip() == "A cat.<|endoftext|>" and answer[-1] == EOS_ID


def test_phi2_preset_loads_the_lm_in_4_bit_and_trains_lora(weights):
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model

    cfg = load_config("phi2", overrides=rehearsal_overrides(weights))
    assert cfg.quant.load_in_4bit and cfg.quant.compute_dtype == "bfloat16"
    lm, tok = load_language_model(cfg.model.language_model, cfg.quant)
    linears = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, Linear4bit)}
    assert linears == set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    ids = tok(["Instruct: What is 2+2?\nOutput: 4"], return_tensors="pt")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(lm, lora).train()
    # Training comes first: on AVX512-BF16 CPUs bitsandbytes 0.50 repacks NF4 weights for its inference kernel on the
    # first no-grad eval forward, and training forwards after that lose the gradient through those weights.
    model(**ids, labels=ids["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 6 * lm.config.num_hidden_layers
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 51200) and torch.isfinite(logits).all()


def test_vision_tower_gives_tinyclip_patch_features(weights):
    tower = load_vision_tower(VisionConfig(source=ModelSource(kind="path", name=str(weights.vision)), image_size=224))
    features = tower.encode_images([Image.new("RGB", (300, 200), (200, 30, 30))])
    assert features.shape == (1, 49, 640) and torch.isfinite(features).all()
    vc = tower.model.config
    assert (vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.patch_size) == (12, 10, 2560, 32)


def test_weights_are_seeded(weights):
    saved_lm = load_file(weights.lm / "model.safetensors")
    for name, tensor in build_tiny_phi(TinyPhiShape()).state_dict().items():
        assert torch.equal(saved_lm[name], tensor), name
    saved_vision = load_file(weights.vision / "model.safetensors")
    fresh = build_tinyclip_shaped(0).state_dict()
    for name in ("vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.11.mlp.fc2.weight"):
        assert torch.equal(saved_vision[name], fresh[name])


def test_second_build_reuses_the_directories(weights, monkeypatch):
    def files(w):
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for d in (w.lm, w.vision) for p in d.iterdir()}

    before = files(weights)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a finished directory")

    monkeypatch.setattr(rehearsal, "build_tiny_phi", no_rebuild)
    monkeypatch.setattr(rehearsal, "build_tinyclip_shaped", no_rebuild)
    again = build_phi2_rehearsal(weights.lm.parent)
    assert again == weights and files(again) == before
    with pytest.raises(ValueError, match="choose another --out"):
        build_phi2_rehearsal(weights.lm.parent, vision_seed=1)


def test_cli_prints_the_overrides(weights, capsys):
    assert main(["rehearsal-weights", "--out", str(weights.lm.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == rehearsal_overrides(weights)
    cfg = load_config("phi2", overrides=lines)
    assert cfg.model.language_model.source == ModelSource(kind="path", name=str(weights.lm))
    assert cfg.model.vision.source == ModelSource(kind="path", name=str(weights.vision))
    assert cfg.model.language_model.image_end_token_id == 23893  # the rest of the preset stays
