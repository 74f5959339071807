"""The frozen CLIP vision tower: patch features with the CLS position dropped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import logging as hf_logging
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

from trimodal.config import TinyCLIPShape, VisionConfig
from trimodal.models.init import seeded
from trimodal.weights.sources import SourceError, resolve_source

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(shape: TinyCLIPShape, image_size: int, vocab_size: int = 512) -> CLIPConfig:
    """A small CLIPConfig: the stage-0 model and the untrained fallback share it."""
    vision = CLIPVisionConfig(hidden_size=shape.hidden_size, intermediate_size=4 * shape.hidden_size,
                              num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                              image_size=image_size, patch_size=shape.patch_size,
                              projection_dim=shape.projection_dim)
    text = CLIPTextConfig(hidden_size=shape.text_hidden_size, intermediate_size=4 * shape.text_hidden_size,
                          num_hidden_layers=shape.text_num_layers, num_attention_heads=shape.num_heads,
                          vocab_size=vocab_size, max_position_embeddings=32, projection_dim=shape.projection_dim,
                          bos_token_id=1, eos_token_id=3, pad_token_id=0)  # eos != 2: pool at the EOS position
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=shape.projection_dim)


def build_random_clip(shape: TinyCLIPShape, image_size: int, vocab_size: int = 512) -> CLIPModel:
    """A seeded, randomly initialised CLIPModel (both towers)."""
    with seeded(shape.seed):
        return CLIPModel(tiny_clip_config(shape, image_size, vocab_size))


def preprocess_images(images: list[Image.Image], size: int) -> torch.Tensor:
    """CLIP preprocessing: RGB, shortest side to `size` (bicubic), centre crop, normalise. -> [B, 3, size, size]."""
    arrays = [resize_crop(img.convert("RGB"), size) for img in images]
    return normalise_pixels(torch.from_numpy(np.stack(arrays)))


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (scaled to [0, 1], then CLIP's mean and std)."""
    batch = pixels.permute(0, 3, 1, 2).float() / 255.0  # [B, S, S, 3] -> [B, 3, S, S]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


MAX_RESIZE_FACTOR = 4
"""Past this many times size x size pixels, the full resize is skipped and only the crop box is resampled."""


def shortest_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so the shortest side is `size`, rounded, neither side below `size`."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> uint8 [size, size, 3]: shortest side to `size` (bicubic), centre crop.

    An extreme aspect ratio (a 1 x 4,000,000 image would resize to 64 x 256,000,000) never builds the whole
    resized image: past MAX_RESIZE_FACTOR x size^2 pixels only the source region under the crop is resampled.
    """
    w, h = img.size
    new_w, new_h = shortest_side_to(w, h, size)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if new_w * new_h > MAX_RESIZE_FACTOR * size * size:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return np.asarray(img.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@dataclass
class TowerInfo:
    """What a vision tower is, for manifests, run configs and `/v1/models`."""

    model_id: str
    """Hub name, directory, or 'random(seed=N)'."""
    untrained: bool
    """True for a randomly initialised tower (stage 0 has not run)."""
    num_patches: int
    """Patch positions per image (CLS dropped)."""
    hidden_size: int
    """Feature width."""
    image_size: int
    """Input resolution."""


class VisionTower(nn.Module):
    """Frozen CLIPVisionModel returning patch features last_hidden_state[:, 1:, :]."""

    def __init__(self, model: CLIPVisionModel, info: TowerInfo):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.info = info

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        hidden = self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return hidden[:, 1:, :]  # [B, 1 + N, D] -> [B, N, D]: drop CLS

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> patch features [B, N, D] on the tower's device."""
        device = next(self.model.parameters()).device
        return self(preprocess_images(images, self.info.image_size).to(device))


def _wrap(model: CLIPVisionModel, model_id: str, untrained: bool) -> VisionTower:
    cfg = model.config
    info = TowerInfo(model_id=model_id, untrained=untrained, num_patches=(cfg.image_size // cfg.patch_size) ** 2,
                     hidden_size=cfg.hidden_size, image_size=cfg.image_size)
    return VisionTower(model, info)


def random_vision_tower(cfg: VisionConfig) -> VisionTower:
    """The seeded random tower: used by the `test` preset and before stage 0 has run."""
    clip = build_random_clip(cfg.random_shape, cfg.image_size)
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    return _wrap(vision, f"random(seed={cfg.random_shape.seed}) UNTRAINED", untrained=True)


def load_vision_tower(cfg: VisionConfig, directory: str | Path | None = None,
                      device: str | torch.device = "cpu", cache_dir: Path | None = None) -> VisionTower:
    """Load the tower named by `directory` (a CLIPVisionModel or CLIPModel dir) or by the config's source.

    With `fallback_to_random` and a missing path, returns the seeded random tower marked UNTRAINED.
    """
    if directory is None and cfg.source.kind == "random":
        return random_vision_tower(cfg).to(device)
    if directory is None and cfg.source.kind == "path" and not Path(cfg.source.name).exists():
        if not cfg.fallback_to_random:
            raise SourceError(f"vision tower {cfg.source.name} does not exist (run stage 0: jobs/train_clip.py)")
        return random_vision_tower(cfg).to(device)
    path = Path(directory) if directory is not None else resolve_source(cfg.source, cache_dir)
    if not (path / "config.json").exists():
        raise SourceError(f"{path} is not a CLIP model directory (no config.json)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel directory has text-tower weights the vision model skips
    try:
        model = CLIPVisionModel.from_pretrained(path, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    name = str(directory) if directory is not None else cfg.source.name
    return _wrap(model, name, untrained=False).to(device)
