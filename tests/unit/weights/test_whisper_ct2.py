"""The CT2 -> openai-whisper converter: the CT2 reader on synthetic files, and a lossless round trip of a random
Whisper written the way CTranslate2's converter lays it out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trimodal.models.speech import build_random_whisper, load_whisper_from_dir
from trimodal.weights.whisper_ct2 import CT2FormatError, convert_ct2_whisper, parse_ct2, read_ct2

CT2_CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}


# ----------------------------------------------------------------------------------------------- helpers

def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec",
              revision: int = 3, bf16: tuple[str, ...] = ()) -> bytes:
    """A CT2 version-6 model.bin; names in `bf16` hold raw bfloat16 bits (uint16 arrays)."""
    out = [struct.pack("<I", 6), ct2_string(spec), struct.pack("<II", revision, len(variables))]
    for name, a in variables.items():
        code = 5 if name in bf16 else CT2_CODES[a.dtype]
        out += [ct2_string(name), struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape), struct.pack("<BI", code, a.nbytes),
                np.ascontiguousarray(a).tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [ct2_string(k) + ct2_string(v) for k, v in aliases.items()]
    return b"".join(out)


def _ct2_block(v: dict, sd: dict, src: str, dst: str, cross: bool) -> None:
    """Inverse of the converter for one block: fuse q/k/v (zero key bias) and rename."""
    def lin(s: str, d: str) -> None:
        v[f"{s}/weight"], v[f"{s}/bias"] = sd[f"{d}.weight"], sd[f"{d}.bias"]

    def norm(s: str, d: str) -> None:
        v[f"{s}/gamma"], v[f"{s}/beta"] = sd[f"{d}.weight"], sd[f"{d}.bias"]

    def fuse(s: str, d: str, names: tuple[str, ...]) -> None:
        v[f"{s}/weight"] = np.concatenate([sd[f"{d}.{n}.weight"] for n in names])
        v[f"{s}/bias"] = np.concatenate([sd.get(f"{d}.{n}.bias", np.zeros_like(sd[f"{d}.query.bias"]))
                                         for n in names])

    norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    fuse(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
    lin(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
    if cross:
        norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        lin(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        fuse(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
        lin(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
    norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
    lin(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
    lin(f"{src}/ffn/linear_1", f"{dst}.mlp.2")


def _ct2_scalars(d) -> dict[str, np.ndarray]:
    """The WhisperSpec scalars CTranslate2 writes (values as in the packaged Whisper base)."""
    i8, i16 = (lambda x: np.array(x, np.int8)), (lambda x: np.array(x, np.int16))
    return {"encoder/num_heads": i16(d.n_audio_head), "decoder/num_heads": i16(d.n_text_head),
            "decoder/activation": i8(3), "decoder/alibi": i8(0), "decoder/pre_norm": i8(1),
            "decoder/scale_embeddings": i8(0), "decoder/start_from_zero_embedding": i8(0),
            "decoder/alignment_heads": i16(1), "decoder/alignment_layer": i16(-1)}


def whisper_to_ct2(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """CT2 WhisperSpec variables (float16) of an openai-whisper model, as CTranslate2's converter lays them out."""
    sd = {k: t.detach().numpy().astype(np.float16) for k, t in model.state_dict().items()}
    v = {"encoder/position_encodings/encodings": sd["encoder.positional_embedding"],
         "decoder/position_encodings/encodings": sd["decoder.positional_embedding"],
         "decoder/embeddings/weight": sd["decoder.token_embedding.weight"], **_ct2_scalars(model.dims)}
    for src, dst in [("encoder/conv1", "encoder.conv1"), ("encoder/conv2", "encoder.conv2")]:
        v[f"{src}/weight"], v[f"{src}/bias"] = sd[f"{dst}.weight"], sd[f"{dst}.bias"]
    for src, dst in [("encoder/layer_norm", "encoder.ln_post"), ("decoder/layer_norm", "decoder.ln")]:
        v[f"{src}/gamma"], v[f"{src}/beta"] = sd[f"{dst}.weight"], sd[f"{dst}.bias"]
    for i in range(model.dims.n_audio_layer):
        _ct2_block(v, sd, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    for i in range(model.dims.n_text_layer):
        _ct2_block(v, sd, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    return dict(sorted(v.items()))


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


# ----------------------------------------------------------------------------------------------- CT2 reader

def test_ct2_reader_round_trip(tmp_path):
    variables = {"a/float32": np.arange(6, dtype=np.float32).reshape(2, 3),
                 "b/int8": np.array([-3, 4], np.int8), "c/int16": np.array(8, np.int16),
                 "d/int32": np.arange(24, dtype=np.int32).reshape(2, 3, 4), "e/float16": np.ones((5,), np.float16),
                 "f/bfloat16": (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)}
    aliases = {"g/alias": "a/float32", "h/other": "e/float16"}
    raw = ct2_bytes(variables, aliases, spec="TestSpec", revision=7, bf16=("f/bfloat16",))
    cut = len(raw) // 2 + 1  # an odd split point, inside some tensor
    (tmp_path / "model.bin.part1").write_bytes(raw[:cut])
    (tmp_path / "model.bin.part2").write_bytes(raw[cut:])
    model = read_ct2([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"])
    assert (model.spec, model.revision, model.aliases) == ("TestSpec", 7, aliases)
    assert list(model.variables) == list(variables)
    for name, want in variables.items():
        got = model.variables[name]
        if name == "f/bfloat16":
            np.testing.assert_array_equal(got, np.array([1.5, -2.0], np.float32))
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("damage", ["truncate", "version", "trailing", "dtype"])
def test_ct2_reader_rejects_damaged_files(damage):
    raw = ct2_bytes({"x": np.ones((3,), np.float16)}, {})
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "version":
        raw = struct.pack("<I", 5) + raw[4:]
    elif damage == "trailing":
        raw += b"\0"
    else:
        raw = raw.replace(struct.pack("<BI", 4, 6), struct.pack("<BI", 9, 6))
    with pytest.raises(CT2FormatError):
        parse_ct2(raw)


# ----------------------------------------------------------------------------------------------- converter

def test_convert_is_lossless_for_a_random_whisper(tmp_path):
    model = build_random_whisper(seed=3, width=64, layers=2)
    (tmp_path / "model.bin").write_bytes(ct2_bytes(whisper_to_ct2(model), TIED))
    out = tmp_path / "converted"
    (out / "stale").mkdir(parents=True)
    assert convert_ct2_whisper([tmp_path / "model.bin"], out) == out
    assert sorted(p.name for p in out.iterdir()) == ["dims.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.bin"]  # no temp dir left behind
    assert json.loads((out / "dims.json").read_text()) == vars(model.dims)
    loaded = load_whisper_from_dir(out)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].half().float(), rtol=0, atol=0, msg=k)


def test_convert_refuses_a_key_bias(tmp_path):
    variables = whisper_to_ct2(build_random_whisper(seed=0))
    variables["decoder/layer_0/attention/linear_1/bias"][3] = 0.5  # the key slice of the fused cross kv bias
    (tmp_path / "model.bin").write_bytes(ct2_bytes(variables, TIED))
    with pytest.raises(CT2FormatError, match="key-projection slice is not zero"):
        convert_ct2_whisper([tmp_path / "model.bin"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_convert_refuses_other_specs_and_quantized(tmp_path):
    variables = whisper_to_ct2(build_random_whisper(seed=0))
    with pytest.raises(CT2FormatError, match="WhisperSpec"):
        convert_ct2_whisper_bytes(tmp_path, ct2_bytes(variables, TIED, spec="TransformerSpec"))
    variables["encoder/conv1/weight"] = variables["encoder/conv1/weight"].astype(np.int8)
    with pytest.raises(CT2FormatError, match="quantized"):
        convert_ct2_whisper_bytes(tmp_path, ct2_bytes(variables, TIED))


def convert_ct2_whisper_bytes(tmp_path: Path, raw: bytes) -> Path:
    (tmp_path / "model.bin").write_bytes(raw)
    return convert_ct2_whisper([tmp_path / "model.bin"], tmp_path / "out")
