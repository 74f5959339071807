"""Builders that load each part of the model for a config and (optionally) a finished training run.

A run's `final/` directory holds `projector.safetensors`, an optional peft `adapter/`, the resolved
`config.yaml` and `run.json` naming the vision tower the projector was trained with. Without a run the
projector is freshly initialised and every part says it is untrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from trimodal.config import SpeechConfig, TrimodalConfig
from trimodal.models.language import image_end_id, load_language_model
from trimodal.models.projector import Projector, build_projector
from trimodal.models.vision import VisionTower, load_vision_tower
from trimodal.sources import resolve_source


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
    meta = json.loads(meta_file.read_text())
    return RunInfo(path, meta.get("vision_tower"), (path / "adapter").is_dir())


def load_projector(run: RunInfo, vision_dim: int, lm_hidden: int, seed: int = 0) -> tuple[Projector, bool]:
    """(projector, trained): the run's weights (safetensors only) or a fresh seeded one."""
    projector = build_projector(vision_dim, lm_hidden, seed)
    if run.directory is None:
        return projector, False
    state = load_file(str(run.directory / "projector.safetensors"))
    projector.load_state_dict(state, strict=True)
    return projector, True


def load_tower_for_run(cfg: TrimodalConfig, run: RunInfo, device: str | torch.device = "cpu") -> VisionTower:
    """The tower the run was trained with, else the config's."""
    tower_dir = run.vision_tower if run.vision_tower and Path(run.vision_tower).exists() else None
    return load_vision_tower(cfg.model.vision, tower_dir, device=device)


def load_lm_for_run(cfg: TrimodalConfig, run: RunInfo, device: str | torch.device = "cpu"):
    """(lm, tokenizer, image_end_id) with the run's LoRA adapter applied when it has one."""
    lm, tokenizer = load_language_model(cfg.model.language_model, device=device)
    if run.has_adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run.directory / "adapter"))
    lm.eval().requires_grad_(False)
    return lm, tokenizer, image_end_id(cfg.model.language_model, tokenizer)


def load_speech(cfg: SpeechConfig, device: str | torch.device = "cpu"):
    """The Speech transcriber for the config (packaged/path Whisper, or a tiny random one)."""
    from trimodal.models.speech import Speech, build_random_whisper, load_whisper_from_dir

    if cfg.source.kind == "random":
        model = build_random_whisper(seed=0)
    else:
        model = load_whisper_from_dir(resolve_source(cfg.source), device=device)
    return Speech(model.to(device), language=cfg.language)
