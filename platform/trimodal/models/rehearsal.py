"""Rehearsal weights for the `phi2` preset, built offline: Phi-2's real tokenizer on a tiny random Phi, and a random
CLIP vision tower shaped like TinyCLIP ViT-61M/32.

The `phi2` preset names Hub models that cannot be reached here. Overriding only its two weight sources with these
directories runs the preset's whole code path on CPU (bf16 LM, NF4 QLoRA on Phi's linear names, the instruct
template, end-of-image marker 23893, [B, 49, 640] image features) without a download. The weights are random: the
answers mean nothing; the shapes, token ids, module names and file layout are Phi-2's and TinyCLIP's.

Phi-2's tokenizer is GPT-2's byte-level BPE plus 38 whitespace-run tokens. GPT-2's BPE ranks ship with
openai-whisper (`whisper/assets/gpt2.tiktoken`: base64 token, rank); the merges are recovered from the ranks.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PhiConfig, PhiForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trimodal.models.init import seeded
from trimodal.weights.sources import atomic_build

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
"""GPT-2's and Phi-2's <|endoftext|>: Phi-2's bos, eos and unk (microsoft/phi-2 config.json bos/eos_token_id)."""
# Phi-2's added tokens 50257..50294 (CodeGen's whitespace runs): 31 down to 2 spaces, then 9 down to 2 tabs.
# Source: microsoft/phi-2 added_tokens.json, as copied in the public repo bacoco/Phi-2; the same runs Salesforce
# CodeGen's jaxformer/hf/sample.py adds (spaces 2..31, tabs 2..9, longest first).
WHITESPACE_TOKENS: tuple[str, ...] = (tuple(" " * n for n in range(31, 1, -1))
                                      + tuple("\t" * n for n in range(9, 1, -1)))
MODEL_MAX_LENGTH = 2048
"""Phi-2's context length (config.json max_position_embeddings)."""
LM_DIR = "phi2-lm"
VISION_DIR = "tinyclip-vit-61m-32"
MANIFEST = "rehearsal.json"
"""Written into each directory: says the weights are random and how they were made."""


def gpt2_ranks_file() -> Path:
    """openai-whisper's copy of GPT-2's BPE ranks, located without importing whisper (its import is slow)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("openai-whisper is not installed (it ships GPT-2's BPE ranks); run `make install`")
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the openai-whisper install")
    return path


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file (one `base64(token) rank` per line) -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: run BPE on its bytes using only merges ranked below it.

    Rank order is merge order, so the pieces left when no lower-ranked merge applies are the last merge's operands.
    """
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best: tuple[int, int] | None = None  # (rank of the merged pair, its left index)
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            raise ValueError(f"token {token!r} cannot be built from lower-ranked tokens")
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every multi-byte token's merge, in rank order (for GPT-2: its 50,000 merges.txt lines, in order)."""
    multi = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    return [merge_pair(ranks, token) for _, token in multi]


def gpt2_bpe(ranks: dict[bytes, int]) -> Tokenizer:
    """GPT-2's byte-level BPE (no added tokens): bytes shown through GPT-2's byte-to-unicode table, GPT-2's split
    regex (ByteLevel use_regex), no prefix space, ByteLevel decoder."""
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def phi2_tokenizer() -> PreTrainedTokenizerFast:
    """Phi-2's tokenizer ids: GPT-2 BPE, <|endoftext|> (50256) as bos = eos = unk, the whitespace runs 50257..50294.

    No pad token and no chat template, as Phi-2 ships (our loader sets pad = eos and picks the instruct template).
    """
    tok = gpt2_bpe(load_bpe_ranks(gpt2_ranks_file()))
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    # Not special: they are ordinary text (kept by skip_special_tokens), matched before BPE like Phi-2's.
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in WHITESPACE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, model_max_length=MODEL_MAX_LENGTH,
                                   clean_up_tokenization_spaces=False)
    if fast.convert_tokens_to_ids(EOS_TOKEN) != EOS_ID or len(fast) != EOS_ID + 1 + len(WHITESPACE_TOKENS):
        raise ValueError("the GPT-2 ranks file does not give Phi-2's ids")
    return fast


@dataclass(frozen=True)
class TinyPhiShape:
    """Size of the tiny random Phi; every other config value is Phi-2's.

    Widths are multiples of 64 as Phi-2's are: bitsandbytes' CPU 4-bit kernel (AVX512-BF16 machines, inference)
    repacks each NF4 weight in blocks of 64 input features and 32 output features and fails on other widths.
    """

    hidden_size: int = 320
    """Residual width; with 4 heads the head size is Phi-2's 80 (2560 / 32); 320 = lcm(80, 64)."""
    num_layers: int = 2
    """Decoder layers (Phi-2: 32)."""
    num_heads: int = 4
    """Attention heads, also key/value heads (Phi-2: 32)."""
    intermediate_size: int = 1280
    """MLP width, 4 x hidden as in Phi-2 (10240)."""
    seed: int = 0
    """Seed of the random initialisation."""


def phi2_config(shape: TinyPhiShape) -> PhiConfig:
    """Phi-2's config (microsoft/phi-2 config.json, transformers_version 4.37: vocab_size 51200, partial_rotary_factor
    0.4, rope_theta 10000, resid_pdrop 0.1, embd_pdrop 0.0, attention_dropout 0.0, layer_norm_eps 1e-5,
    max_position_embeddings 2048, hidden_act gelu_new, qk_layernorm false, tie_word_embeddings false,
    initializer_range 0.02, bos/eos 50256) with the sizes of `shape`."""
    return PhiConfig(vocab_size=51200, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                     num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                     num_key_value_heads=shape.num_heads, resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0,
                     hidden_act="gelu_new", max_position_embeddings=MODEL_MAX_LENGTH, initializer_range=0.02,
                     layer_norm_eps=1e-5, tie_word_embeddings=False, qk_layernorm=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
                     bos_token_id=EOS_ID, eos_token_id=EOS_ID)


def build_tiny_phi(shape: TinyPhiShape) -> PhiForCausalLM:
    """A seeded random PhiForCausalLM with Phi-2's config at `shape`'s size (float32)."""
    with seeded(shape.seed):
        return PhiForCausalLM(phi2_config(shape))


@dataclass(frozen=True)
class TinyClipTextShape:
    """The text tower saved beside the vision tower; only the vision tower is used, so it is tiny."""

    hidden_size: int = 64
    """Width (TinyCLIP's Text-29M: 512)."""
    num_layers: int = 1
    """Layers (TinyCLIP's Text-29M: 9)."""
    num_heads: int = 2
    """Heads (TinyCLIP's Text-29M: 8)."""


def tinyclip_61m_config(text: TinyClipTextShape = TinyClipTextShape()) -> CLIPConfig:
    """TinyCLIP ViT-61M/32's shape (wkcn/TinyCLIP src/open_clip/model_configs/TinyCLIP-ViT-61M-32-Text-29M.json:
    vision width 640, 12 layers, patch 32, image 224, embed_dim 512; open_clip's defaults head_width 64 -> 10 heads,
    mlp_ratio 4 -> 2560, nn.GELU since the config does not ask for QuickGELU; text vocab 49408, context 77)."""
    vision = CLIPVisionConfig(hidden_size=640, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=10,
                              image_size=224, patch_size=32, projection_dim=512, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    text_cfg = CLIPTextConfig(hidden_size=text.hidden_size, intermediate_size=4 * text.hidden_size,
                              num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(), projection_dim=512)


def build_tinyclip_shaped(seed: int = 0) -> CLIPModel:
    """A seeded random CLIPModel with TinyCLIP ViT-61M/32's vision tower and a tiny text tower (float32)."""
    with seeded(seed):
        return CLIPModel(tinyclip_61m_config())


@dataclass(frozen=True)
class RehearsalWeights:
    """The directories that stand in for the `phi2` preset's Hub weights."""

    lm: Path
    """PhiForCausalLM (float32 safetensors) with Phi-2's tokenizer files."""
    vision: Path
    """CLIPModel directory whose vision tower has TinyCLIP ViT-61M/32's shape."""


def _write_manifest(directory: Path, what: str, shape: dict) -> None:
    note = {"what": what, "random": True, "trained": False, "shape": shape,
            "use": "rehearsing the phi2 preset offline (python -m trimodal rehearsal-weights)"}
    (directory / MANIFEST).write_text(json.dumps(note, indent=2) + "\n")


def _write_lm(directory: Path, shape: TinyPhiShape) -> None:
    build_tiny_phi(shape).save_pretrained(directory, safe_serialization=True)
    phi2_tokenizer().save_pretrained(directory)
    _write_manifest(directory, "tiny random Phi (Phi-2 config at a small size) with Phi-2's tokenizer", asdict(shape))


def _write_vision(directory: Path, seed: int) -> None:
    build_tinyclip_shaped(seed).save_pretrained(directory, safe_serialization=True)
    _write_manifest(directory, "random CLIPModel, vision tower shaped like TinyCLIP ViT-61M/32", {"seed": seed})


def _check_reused(directory: Path, shape: dict) -> Path:
    """A finished directory is reused only when it was built with the same shape and seed."""
    built = json.loads((directory / MANIFEST).read_text())["shape"]
    if built != shape:
        raise ValueError(f"{directory} was built with {built}, not {shape}; choose another --out directory")
    return directory


def build_phi2_rehearsal(out_dir: Path, shape: TinyPhiShape = TinyPhiShape(), vision_seed: int = 0
                         ) -> RehearsalWeights:
    """Write (once; finished directories are reused) the LM and vision directories under `out_dir`."""
    out_dir = Path(out_dir).expanduser().resolve()
    lm = atomic_build(out_dir / LM_DIR, lambda tmp: _write_lm(tmp, shape))
    vision = atomic_build(out_dir / VISION_DIR, lambda tmp: _write_vision(tmp, vision_seed))
    return RehearsalWeights(lm=_check_reused(lm, asdict(shape)), vision=_check_reused(vision, {"seed": vision_seed}))


def rehearsal_overrides(weights: RehearsalWeights) -> list[str]:
    """The `--set` overrides that point the `phi2` preset at `weights`: absolute paths in compact JSON (which YAML
    reads as a flow mapping), one shell word each where the path has no spaces."""
    def source(path: Path) -> str:
        return json.dumps({"kind": "path", "name": str(path.resolve())}, separators=(",", ":"))

    return [f"model.language_model.source={source(weights.lm)}", f"model.vision.source={source(weights.vision)}"]
