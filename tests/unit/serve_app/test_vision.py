"""Vision as a plain class, no Ray: image embeddings match the engine (also after the ingress shrinks a large
image), each run's projector encodes its own rows of a mixed batch, and a resent image is a cache hit per run."""

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.ingress import shrink_image  # noqa: E402
from serve_app.registry import run_bundle  # noqa: E402
from serve_app.vision import Vision  # noqa: E402


@pytest.fixture(scope="module")
def vision(test_cfg):
    return Vision(test_cfg, None, test_cfg.model.language_model.random_shape.hidden_size)


def test_images_become_lm_space_embeddings_matching_the_engine(vision, test_cfg):
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    embed = asyncio.run(vision.encode(img))
    assert embed.dtype == np.float32
    assert embed.shape == (vision.describe()["num_patches"], test_cfg.model.language_model.random_shape.hidden_size)
    direct = vision.image_encoder([img])[0].numpy()
    np.testing.assert_allclose(embed, direct, atol=1e-6)
    info = vision.describe()
    assert info["projector_trained"] is False and info["vision_tower_untrained"] is True


def test_shrinking_a_large_image_keeps_its_embeddings(vision):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8))
    small = shrink_image(big, vision.describe()["image_size"])
    assert min(small.size) == 64 and shrink_image(small, 64) is small
    torch.testing.assert_close(vision.image_encoder([small]), vision.image_encoder([big]))


def test_vision_encodes_with_each_runs_projector_grouped_per_run(test_cfg, tmp_path, make_run):
    from trimodal.config import load_config

    cfg = load_config("test", {"serving.max_loaded_runs": 2})
    one, two = (run_bundle(make_run(tmp_path, name, seed, adapter=False), name)
                for name, seed in (("one", 1), ("two", 2)))
    vision = Vision(cfg, None, cfg.model.language_model.random_shape.hidden_size)
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "green", "blue", "white")]
    runs = [None, one, two, one]
    mixed = asyncio.run(vision.encode_batch(images, runs))
    alone = [asyncio.run(vision.encode(image, run)) for image, run in zip(images, runs)]
    assert all(np.allclose(m, a, atol=1e-5) for m, a in zip(mixed, alone))
    same_image = [asyncio.run(vision.encode(images[0], run)) for run in (None, one, two)]
    assert not np.allclose(same_image[0], same_image[1]) and not np.allclose(same_image[1], same_image[2])
    assert len(vision.encoders) == 2  # the least recently used encoder (the base model's) went


def test_vision_answers_a_resent_image_from_its_cache_per_run(test_cfg, tmp_path, make_run):
    vision = Vision(test_cfg, None, test_cfg.model.language_model.random_shape.hidden_size)
    one = run_bundle(make_run(tmp_path, "one", 1, adapter=False), "one")
    image = Image.new("RGB", (64, 64), "red")
    first = asyncio.run(vision.encode(image))
    again, other_run = asyncio.run(vision.encode_batch([image.copy(), image], [None, one]))
    assert np.array_equal(again, first)  # a hit gives exactly what the encoder gave
    assert not np.allclose(other_run, first)  # another run's projector is a miss, not the base model's entry
    assert vision.stats()["hits"] == 1 and vision.stats()["misses"] == 2
    assert vision.encoding.metrics.tallies["encoded"] == 2
