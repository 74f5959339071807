"""Finished training runs, and the one way to load one for answering questions.

A run's `final/` directory holds `run.json` (naming the vision tower the projector was trained with), the resolved
`config.yaml`, `projector.safetensors` and, after stage 2, a peft LoRA `adapter/`. Without a run (None) the
projector is freshly initialised from the config's seed and every part says it is untrained.

From a run this module loads:

- its images: the tower it was trained with + its projector, as one `ImageEncoder` (PIL images -> LM-space
  embeddings; see docs/architecture.md, "The path of an image");
- its text: the LM + its adapter + the tokenizer, as a `TextGenerator`;
- speech: the config's Whisper, as a transcriber;
- or all three in one `Engine` (the CLI). The serving deployments and evaluation call the same loaders;
- several runs' LoRA adapters at once over one base LM (`RunAdapters`), for batches whose rows are answered by
  different runs.

A run whose files cannot be loaded (run.json or adapter_config.json not JSON, a missing or truncated safetensors
file, weights whose shapes do not fit the model) raises `RunLoadError`, whose message names the file relative to
the run's final/ directory and what is wrong, never a server path: the serving replicas pass it to clients.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from trimodal.config import SpeechConfig, TrimodalConfig, config_from_dict
from trimodal.hardware import native_bf16
from trimodal.inference.engine import Engine, TextGenerator
from trimodal.inference.messages import MediaLimits
from trimodal.inference.requests import RunBundle, prompt_token_limit
from trimodal.lru import Lru
from trimodal.models.language import DTYPES, image_end_id, load_language_model
from trimodal.models.multimodal import ImageEncoder
from trimodal.models.projector import Projector, build_projector
from trimodal.models.vision import VisionTower, load_vision_tower
from trimodal.weights.sources import resolve_source


class RunLoadError(ValueError):
    """A finished run's files cannot be loaded; the message names the file (relative to final/) and the fault."""


def _fault(exc: BaseException, directory: Path) -> str:
    """The first line of an error, with the run's directory cut out (clients see it), at most 300 characters."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0].replace(f"{directory}/", "").replace(str(directory), "final")
    return text if len(text) <= 300 else text[:297] + "..."


def check_safetensors(path: Path, label: str) -> None:
    """RunLoadError unless `path` exists and its safetensors header reads (`label`: the name clients see)."""
    if not path.is_file():
        raise RunLoadError(f"{label} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as exc:
        raise RunLoadError(f"{label} is not a readable safetensors file ({_fault(exc, path.parent)})") from None


def check_adapter_files(adapter_dir: Path) -> None:
    """RunLoadError unless a peft adapter directory has a JSON adapter_config.json and a readable
    adapter_model.safetensors (whether its shapes fit shows when it is loaded)."""
    config = adapter_dir / "adapter_config.json"
    try:
        parsed = json.loads(config.read_text())
    except FileNotFoundError:
        raise RunLoadError("adapter/adapter_config.json is missing") from None
    except (OSError, ValueError) as exc:
        raise RunLoadError(f"adapter/adapter_config.json is not valid JSON ({_fault(exc, adapter_dir)})") from None
    if not isinstance(parsed, dict):
        raise RunLoadError("adapter/adapter_config.json is not a JSON object")
    check_safetensors(adapter_dir / "adapter_model.safetensors", "adapter/adapter_model.safetensors")


@dataclass
class RunInfo:
    """What a finished run exported (read from `final/run.json`)."""

    directory: Path | None
    """The run's final/ directory, or None for an untrained projector."""
    vision_tower: str | None
    """Tower directory the projector was trained with (None: the config's tower)."""
    has_adapter: bool
    """A LoRA adapter was exported."""


def read_run(final_dir: str | Path | None) -> RunInfo:
    """Read a run's `final/` (a run directory is accepted too)."""
    if final_dir is None:
        return RunInfo(None, None, False)
    path = Path(final_dir)
    if (path / "final").is_dir():
        path = path / "final"
    meta_file = path / "run.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a finished run (no run.json); train with jobs/pretrain.py")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise RunLoadError(f"run.json is not valid JSON ({_fault(exc, path)})") from None
    if not isinstance(meta, dict):
        raise RunLoadError("run.json is not a JSON object")
    return RunInfo(path, meta.get("vision_tower"), (path / "adapter").is_dir())


def read_run_config(run: RunInfo) -> TrimodalConfig:
    """The config the run was trained with (its `config.yaml`)."""
    import yaml

    return config_from_dict(yaml.safe_load((run.directory / "config.yaml").read_text()))


def load_projector(run: RunInfo, vision_dim: int, lm_hidden: int, seed: int = 0,
                   positions: int = 0) -> tuple[Projector, bool]:
    """(projector, trained): the run's weights (safetensors only) or a fresh seeded one with `positions` (see
    `Projector`); RunLoadError when the run's projector is missing, unreadable or of other shapes.

    A run's projector keeps the layout it was trained with: it has position embeddings (and normalises the features
    before them) exactly when its file does, whatever the serving preset says, so runs trained with and without
    them serve side by side."""
    if run.directory is None:
        return build_projector(vision_dim, lm_hidden, seed, positions), False
    file = run.directory / "projector.safetensors"
    check_safetensors(file, "projector.safetensors")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            saved = handle.get_slice("position").get_shape()[0] if "position" in keys else 0
        projector = build_projector(vision_dim, lm_hidden, seed, saved, "feature_norm.weight" in keys)
        projector.load_state_dict(load_file(str(file)), strict=True)
    except (OSError, SafetensorError) as exc:  # truncated after its header
        raise RunLoadError(f"projector.safetensors cannot be read ({_fault(exc, run.directory)})") from None
    except (RuntimeError, ValueError) as exc:  # missing keys, a size mismatch, positions that fill no square grid
        raise RunLoadError(f"projector.safetensors does not fit this model ({_fault(exc, run.directory)})") from None
    return projector, True


def load_tower_for_run(cfg: TrimodalConfig, run: RunInfo, device: str | torch.device = "cpu") -> VisionTower:
    """The tower the run was trained with, else the config's."""
    tower_dir = run.vision_tower if run.vision_tower and Path(run.vision_tower).exists() else None
    return load_vision_tower(cfg.model.vision, tower_dir, device=device)


def load_image_encoder(cfg: TrimodalConfig, run: RunInfo, lm_hidden: int,
                       device: str | torch.device = "cpu") -> ImageEncoder:
    """The run's tower + projector (projecting to the LM width `lm_hidden`) as one image encoder."""
    tower = load_tower_for_run(cfg, run, device)
    projector, trained = load_projector(run, tower.info.hidden_size, lm_hidden, cfg.model.projector_seed,
                                        cfg.model.projector_positions_for(tower.info.num_patches))
    if projector.positions not in (0, tower.info.num_patches):
        raise RunLoadError(f"projector.safetensors has position embeddings for {projector.positions} patches; "
                           f"the run's tower gives {tower.info.num_patches}")
    return ImageEncoder(tower, projector.to(device), trained)


def load_lm_for_run(cfg: TrimodalConfig, run: RunInfo, device: str | torch.device = "cpu",
                    merge_adapter: bool = False):
    """(lm, tokenizer, image_end_id) for inference: the run's LoRA adapter applied when it has one (folded into the
    weights with `merge_adapter`), in serving's dtype and attention kernel.

    The adapter is applied (and merged) in the dtype training saw, before the cast to the inference dtype."""
    lm_cfg = dataclasses.replace(cfg.model.language_model, attn_implementation=cfg.serving.attn_implementation)
    lm, tokenizer = load_language_model(lm_cfg, device=device)
    if run.has_adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run.directory / "adapter"))
        if merge_adapter:
            lm = lm.merge_and_unload()
    lm = lm.to(inference_dtype(cfg, device)).eval().requires_grad_(False)
    return lm, tokenizer, image_end_id(cfg.model.language_model, tokenizer)


def inference_dtype(cfg: TrimodalConfig, device: str | torch.device) -> torch.dtype:
    """serving.dtype for `device`: auto is bfloat16 where the device runs it natively (on CPU, 4x float32's matmul
    throughput with AMX), else the LM's configured dtype."""
    name = cfg.serving.dtype
    if name == "auto":
        name = "bfloat16" if native_bf16(device) else cfg.model.language_model.dtype
    return DTYPES[name]


def load_text_generator(cfg: TrimodalConfig, run: RunInfo, device: str | torch.device = "cpu",
                        max_prompt_tokens: int | None = None, merge_adapter: bool = False) -> TextGenerator:
    """The run's LM + adapter + tokenizer; prompts up to `max_prompt_tokens` (default `prompt_token_limit`).

    `merge_adapter` folds the adapter into the weights: fewer operations for a generator that only ever answers
    with this run (evaluation); serving keeps it apart, to add other runs' adapters beside it."""
    lm, tokenizer, end_id = load_lm_for_run(cfg, run, device, merge_adapter)
    limit = max_prompt_tokens if max_prompt_tokens is not None else prompt_token_limit(cfg)
    return TextGenerator(lm, tokenizer, end_id, max_length=limit)


def load_transcriber(cfg: SpeechConfig, device: str | torch.device = "cpu"):
    """The Whisper transcriber for the config (packaged/path Whisper, or a tiny random one)."""
    from trimodal.models.speech import Transcriber, build_random_whisper, load_whisper_from_dir

    if cfg.source.kind == "random":
        model = build_random_whisper(seed=0)
    else:
        model = load_whisper_from_dir(resolve_source(cfg.source), device=device)
    return Transcriber(model.to(device), language=cfg.language)


def load_engine(cfg: TrimodalConfig, run_dir: str | Path | None = None, device: str = "cpu", vision: bool = True,
                speech: bool = True) -> Engine:
    """The parts named by `cfg` (with a finished run's tower, projector and adapter) in one Engine."""
    run = read_run(run_dir)
    generator = load_text_generator(cfg, run, device)
    encoder = load_image_encoder(cfg, run, generator.lm.config.hidden_size, device) if vision else None
    transcriber = load_transcriber(cfg.model.speech, device) if speech else None
    limits = MediaLimits(cfg.serving.max_image_pixels, cfg.serving.max_images, cfg.model.speech.max_seconds)
    return Engine(generator, encoder, transcriber, limits)


BASE_ADAPTER = "__base__"
"""peft's adapter name for a row that gets no adapter in a mixed batch."""


class RunAdapters:
    """The LoRA adapters of several runs in one peft model over one base LM, each under its own adapter name.

    `names(runs)` gives each row of a batch its adapter name (BASE_ADAPTER for the base model and for runs without
    an adapter), loading what is missing; past `max_loaded` adapters the least recently used ones that the batch
    does not need are deleted. The first adapter wraps the generator's LM in a peft model (`generator.lm` is
    replaced); the last one is never deleted, so base rows always go through `adapter_names`. Not thread-safe:
    call it from the thread that decodes.
    """

    def __init__(self, generator: TextGenerator, max_loaded: int):
        self.generator = generator
        self.loaded: Lru[tuple[str, int], str] = Lru(max(1, max_loaded), on_evict=self._delete)
        """(adapter directory, run version) -> adapter name, least recently used first."""
        self.loads = 0

    @property
    def evictions(self) -> int:
        """Adapters deleted so far to stay within `max_loaded`."""
        return self.loaded.stats.evictions

    @staticmethod
    def key(run: RunBundle | None) -> tuple[str, int] | None:
        return (run.adapter, run.version) if run is not None and run.adapter else None

    def load(self, run: RunBundle | None) -> str:
        """The adapter name of `run` (loaded now if it is not), most recently used; BASE_ADAPTER without one.

        Nothing is evicted here: `names` evicts once the whole batch's adapters are loaded."""
        key = self.key(run)
        if key is None:
            return BASE_ADAPTER
        name = self.loaded.get(key)
        if name is not None:
            return name
        check_adapter_files(Path(key[0]))
        self.loads += 1
        name = f"run{self.loads}"
        self.generator.lm = self._load_into_lm(key[0], name).eval().requires_grad_(False)
        self.loaded.add(key, name)
        return name

    def _load_into_lm(self, adapter_dir: str, name: str):
        """The LM with one more adapter; RunLoadError (and the LM as it was) when the adapter does not fit it."""
        lm = self.generator.lm
        try:
            if self.loaded:
                lm.load_adapter(adapter_dir, adapter_name=name)
                return lm
            from peft import PeftModel

            return PeftModel.from_pretrained(lm, adapter_dir, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            if self.loaded and name in getattr(lm, "peft_config", {}):  # half-made: its layers exist, unloaded
                lm.delete_adapter(name)
            raise RunLoadError(f"adapter does not fit this model ({_fault(exc, Path(adapter_dir).parent)})") \
                from None

    def names(self, runs: Sequence[RunBundle | None]) -> list[str] | None:
        """Each row's adapter name, everything needed loaded; None while no adapter was ever loaded (plain LM).
        Then the least recently used adapters past `max_loaded` are deleted, never one this batch needs."""
        names = [self.load(run) for run in runs]
        self.loaded.evict(keep={self.key(run) for run in runs})
        return names if self.loaded else None

    def _delete(self, key: tuple[str, int], name: str) -> None:
        self.generator.lm.delete_adapter(name)
