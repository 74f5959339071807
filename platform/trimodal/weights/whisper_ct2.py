"""Convert a CTranslate2 (faster-whisper) Whisper `model.bin` into an openai-whisper checkpoint, losslessly.

The CT2 binary format (version 6) is little-endian:

    u32 version | str spec name | u32 revision | u32 n_variables
    n_variables x (str name | u8 ndim | ndim x u32 dims | u8 dtype | u32 n_bytes | raw bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where `str` is a u16 length that counts a trailing NUL, then the bytes and the NUL. The tensors are renamed to
openai-whisper's names; CT2's fused self-attention qkv and cross-attention kv projections are split. Whisper's key
projection has no bias, so the key slice of CT2's fused bias must be all zeros. The output is a directory with
`model.safetensors` (the source dtype, float16 for the packaged models) and `dims.json` (`ModelDimensions`).
Nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from trimodal.files import publish_dir

CT2_VERSION = 6
# CTranslate2 DataType enum -> numpy dtype; bfloat16 (5) is read as raw uint16 and widened to float32.
CT2_DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
                                   4: np.dtype("<f2"), 5: np.dtype("<u2")}
BFLOAT16 = 5
# Scalars of a CT2 WhisperSpec that must hold these values for the weights to mean what openai-whisper computes.
EXPECTED_FLAGS = {"decoder/pre_norm": 1, "decoder/alibi": 0, "decoder/scale_embeddings": 0,
                  "decoder/start_from_zero_embedding": 0}
IGNORED_SCALARS = ("encoder/num_heads", "decoder/num_heads", "decoder/activation", "decoder/alignment_heads",
                   "decoder/alignment_layer")


class CT2FormatError(ValueError):
    """The file is not a CT2 Whisper model this converter understands; the message says why."""


@dataclass
class CT2Model:
    """The parsed content of a CT2 model.bin."""

    spec: str
    """Spec name, e.g. 'WhisperSpec'."""
    revision: int
    """Spec revision."""
    variables: dict[str, np.ndarray]
    """Tensors by name (0-d arrays for scalars), in file order."""
    aliases: dict[str, str]
    """Alias name -> target variable name (e.g. the tied output projection)."""


class _CT2Cursor:
    """A cursor over the bytes of a CT2 file."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        """The next `n` bytes; raise if the file ends first."""
        if n < 0 or self.pos + n > len(self.data):
            raise CT2FormatError(f"truncated CT2 file: wanted {n} bytes at offset {self.pos}, size {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str) -> int:
        """One little-endian integer of struct format `fmt` (B, H, I)."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        """A u16-length string whose length counts a trailing NUL."""
        raw = bytes(self.take(self.uint("H")))
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"malformed string at offset {self.pos}")
        return raw[:-1].decode("utf-8")


def _read_variable(r: _CT2Cursor) -> tuple[str, np.ndarray]:
    """One (name, array) record."""
    name = r.string()
    shape = tuple(r.uint("I") for _ in range(r.uint("B")))
    code = r.uint("B")
    if code not in CT2_DTYPES:
        raise CT2FormatError(f"{name}: unknown CT2 dtype code {code}")
    nbytes = r.uint("I")
    dtype = CT2_DTYPES[code]
    if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CT2FormatError(f"{name}: {nbytes} bytes do not fit shape {shape} of dtype {dtype}")
    array = np.frombuffer(r.take(nbytes), dtype=dtype).reshape(shape)
    if code == BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return name, array


def parse_ct2(data: bytes | memoryview) -> CT2Model:
    """Parse the bytes of a CT2 model.bin (arrays are read-only views into `data`)."""
    r = _CT2Cursor(data)
    version = r.uint("I")
    if version != CT2_VERSION:
        raise CT2FormatError(f"CT2 binary version {version} is not supported (expected {CT2_VERSION})")
    spec, revision = r.string(), r.uint("I")
    variables = dict(_read_variable(r) for _ in range(r.uint("I")))
    aliases = {}
    for _ in range(r.uint("I")):
        alias, target = r.string(), r.string()
        aliases[alias] = target
    if r.pos != len(r.data):
        raise CT2FormatError(f"{len(r.data) - r.pos} unexpected trailing bytes after the aliases")
    return CT2Model(spec, revision, variables, aliases)


def read_ct2(parts: Sequence[Path]) -> CT2Model:
    """Read a CT2 model.bin given as one file or as split parts to concatenate in order."""
    if not parts:
        raise ValueError("no CT2 model files given")
    return parse_ct2(b"".join(Path(p).read_bytes() for p in parts))


def _scalar(m: CT2Model, name: str) -> int:
    if name not in m.variables:
        raise CT2FormatError(f"CT2 model lacks the scalar {name}")
    return int(m.variables[name].reshape(()))


def _n_layers(m: CT2Model, stack: str) -> int:
    ids = {int(g) for k in m.variables if (g := _layer_id(k, stack)) is not None}
    if ids != set(range(len(ids))) or not ids:
        raise CT2FormatError(f"{stack} layers are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _layer_id(name: str, stack: str) -> str | None:
    match = re.match(rf"{stack}/layer_(\d+)/", name)
    return match.group(1) if match else None


def whisper_dims(m: CT2Model) -> dict[str, int]:
    """openai-whisper `ModelDimensions` fields derived from the CT2 tensors and head-count scalars."""
    v = m.variables
    conv1, emb = v["encoder/conv1/weight"], v["decoder/embeddings/weight"]
    return {
        "n_mels": conv1.shape[1], "n_audio_ctx": v["encoder/position_encodings/encodings"].shape[0],
        "n_audio_state": conv1.shape[0], "n_audio_head": _scalar(m, "encoder/num_heads"),
        "n_audio_layer": _n_layers(m, "encoder"), "n_vocab": emb.shape[0],
        "n_text_ctx": v["decoder/position_encodings/encodings"].shape[0], "n_text_state": emb.shape[1],
        "n_text_head": _scalar(m, "decoder/num_heads"), "n_text_layer": _n_layers(m, "decoder"),
    }


def _check_spec(m: CT2Model) -> None:
    """Refuse specs whose computation differs from openai-whisper's (wrong model type, odd flags)."""
    if m.spec != "WhisperSpec":
        raise CT2FormatError(f"CT2 spec is {m.spec!r}, not 'WhisperSpec'")
    for name, want in EXPECTED_FLAGS.items():
        if name in m.variables and _scalar(m, name) != want:
            raise CT2FormatError(f"{name} = {_scalar(m, name)}, expected {want} for an openai-whisper model")
    for name, array in m.variables.items():
        if array.dtype == np.int8 and array.ndim > 0:
            raise CT2FormatError(f"{name} is int8: quantized CT2 models are not supported (convert a float16 one)")


def _linear(sd: dict, v: dict, src: str, dst: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v.pop(f"{src}/weight"), v.pop(f"{src}/bias")


def _norm(sd: dict, v: dict, src: str, dst: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v.pop(f"{src}/gamma"), v.pop(f"{src}/beta")


def _split(sd: dict, v: dict, src: str, dst: str, names: Sequence[str]) -> None:
    """Split a fused projection into `names` (openai's key has no bias: its CT2 slice must be zero)."""
    weights = np.split(v.pop(f"{src}/weight"), len(names), axis=0)
    biases = np.split(v.pop(f"{src}/bias"), len(names), axis=0)
    for name, w, b in zip(names, weights, biases):
        sd[f"{dst}.{name}.weight"] = w
        if name != "key":
            sd[f"{dst}.{name}.bias"] = b
        elif np.any(b != 0):
            raise CT2FormatError(f"{src}/bias: the key-projection slice is not zero (max |b| = "
                                 f"{float(np.abs(b).max()):.3g}); openai-whisper's key has no bias")


def _block(sd: dict, v: dict, src: str, dst: str, cross: bool) -> None:
    """One residual block: self-attention, optional cross-attention, MLP."""
    _norm(sd, v, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    _split(sd, v, f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
    _linear(sd, v, f"{src}/self_attention/linear_1", f"{dst}.attn.out")
    if cross:
        _norm(sd, v, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        _linear(sd, v, f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        _split(sd, v, f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
        _linear(sd, v, f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
    _norm(sd, v, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
    _linear(sd, v, f"{src}/ffn/linear_0", f"{dst}.mlp.0")
    _linear(sd, v, f"{src}/ffn/linear_1", f"{dst}.mlp.2")


def ct2_to_whisper(m: CT2Model) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """openai-whisper state_dict (numpy, source dtype) and dims from a parsed CT2 Whisper model."""
    _check_spec(m)
    v, sd = dict(m.variables), {}
    try:
        dims = whisper_dims(m)
        sd["encoder.positional_embedding"] = v.pop("encoder/position_encodings/encodings")
        _linear(sd, v, "encoder/conv1", "encoder.conv1")
        _linear(sd, v, "encoder/conv2", "encoder.conv2")
        for i in range(dims["n_audio_layer"]):
            _block(sd, v, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
        _norm(sd, v, "encoder/layer_norm", "encoder.ln_post")
        sd["decoder.positional_embedding"] = v.pop("decoder/position_encodings/encodings")
        sd["decoder.token_embedding.weight"] = v.pop("decoder/embeddings/weight")
        for i in range(dims["n_text_layer"]):
            _block(sd, v, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
        _norm(sd, v, "decoder/layer_norm", "decoder.ln")
    except KeyError as exc:
        raise CT2FormatError(f"CT2 Whisper model lacks the variable {exc.args[0]}") from None
    for name in (*EXPECTED_FLAGS, *IGNORED_SCALARS):
        v.pop(name, None)
    if v:
        raise CT2FormatError(f"CT2 variables this converter does not know: {sorted(v)[:10]}")
    if m.aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise CT2FormatError("decoder/projection/weight is not tied to the token embedding")
    return sd, dims


def verify_loadable(state_dict: dict[str, np.ndarray], dims: dict[str, int]) -> None:
    """Check names and shapes with strict=True against openai-whisper's encoder and decoder (on the meta device).

    `Whisper` itself holds no other persistent state; its alignment-heads buffer cannot be built on meta.
    """
    import torch
    from whisper.model import AudioEncoder, ModelDimensions, TextDecoder

    d = ModelDimensions(**dims)
    with torch.device("meta"):
        model = torch.nn.Module()
        model.encoder = AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer)
        model.decoder = TextDecoder(d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer)
    tensors = {k: torch.empty(a.shape, dtype=torch.float32, device="meta") for k, a in state_dict.items()}
    model.load_state_dict(tensors, strict=True)


def write_whisper_dir(parts: Sequence[Path], directory: Path) -> None:
    """Convert a CT2 Whisper model.bin (one file or parts) into `directory/{model.safetensors,dims.json}`."""
    from safetensors.numpy import save_file

    state_dict, dims = ct2_to_whisper(read_ct2(parts))
    verify_loadable(state_dict, dims)
    save_file({k: np.ascontiguousarray(a) for k, a in state_dict.items()}, str(Path(directory) / "model.safetensors"),
              metadata={"format": "openai-whisper", "source": "ctranslate2"})
    (Path(directory) / "dims.json").write_text(json.dumps(dims, indent=2) + "\n")


def convert_ct2_whisper(parts: Sequence[Path], out_dir: Path) -> Path:
    """Convert a CT2 Whisper model.bin (one file or parts) to `out_dir/{model.safetensors,dims.json}` atomically."""
    with publish_dir(Path(out_dir)) as scratch:
        write_whisper_dir(parts, scratch)
    return Path(out_dir)

