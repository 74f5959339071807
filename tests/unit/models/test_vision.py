"""CLIP preprocessing: resize + centre crop (bounded in memory for extreme aspect ratios) and normalisation."""

import numpy as np
import pytest
import torch
from PIL import Image

from trimodal.models.vision import (CLIP_MEAN, CLIP_STD, MAX_RESIZE_FACTOR, normalise_pixels, preprocess_images,
                                    resize_crop, shortest_side_to)
from trimodal.training.clip import normalise


@pytest.mark.parametrize("w, h", [(1, 4_000_000), (4_000_000, 1), (2, 1_000_000)])
def test_extreme_aspect_ratios_crop_without_building_the_full_resize(w, h, monkeypatch):
    resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= MAX_RESIZE_FACTOR * 64 * 64, f"resize to {size} builds the whole image"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)  # the full resize would be ~64 GB of pixels
    out = resize_crop(Image.new("RGB", (w, h), (200, 30, 30)), 64)
    assert out.shape == (64, 64, 3) and (out == (200, 30, 30)).all()


def test_crop_box_path_matches_resize_then_crop_on_a_smooth_image():
    ramp = np.linspace(0, 255, 600, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (40, 1))] * 3, axis=-1).astype(np.uint8)  # 600 x 40, a horizontal ramp
    image = Image.fromarray(pixels)
    assert 600 * 64 / 40 * 64 > MAX_RESIZE_FACTOR * 64 * 64  # takes the crop-box path
    full = np.asarray(image.resize((960, 64), Image.BICUBIC).crop((448, 0, 512, 64)), dtype=np.int16)
    assert np.abs(resize_crop(image, 64).astype(np.int16) - full).max() <= 1


def test_ordinary_images_keep_the_plain_resize_then_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 256, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((224, 262), Image.BICUBIC).crop((0, 19, 224, 243)), dtype=np.uint8)
    np.testing.assert_array_equal(resize_crop(image, 224), expected)


def test_preprocessing_and_stage0_normalisation_match_the_previous_formulas_bit_for_bit():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(90, 70), (64, 300)]]
    pixels = torch.from_numpy(np.stack([resize_crop(im, 64) for im in images]))  # uint8 [B, S, S, 3]
    scaled = pixels.permute(0, 3, 1, 2).float() / 255.0  # both previous copies: this, then CLIP's mean and std
    previous = (scaled - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(normalise_pixels(pixels), previous)
    assert torch.equal(normalise(pixels), previous)  # stage 0's collator
    assert torch.equal(preprocess_images(images, 64), previous)


@pytest.mark.parametrize("w, h", [(300, 256), (256, 300), (640, 480), (63, 65), (1, 4_000_000), (64, 64)])
def test_shortest_side_to_is_the_previous_resize_maths(w, h):
    scale = 64 / min(w, h)
    assert shortest_side_to(w, h, 64) == (max(64, round(w * scale)), max(64, round(h * scale)))
