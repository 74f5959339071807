"""bench/position_probe.py's parts: the patches it takes for a shape, and the probe's score when the features do and
do not carry x."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the script is run as a file, not installed

from position_probe import object_rows, ridge_r2  # noqa: E402


def test_a_shape_is_the_mean_of_the_patches_inside_it():
    features = np.arange(49, dtype=np.float32)[:, None].repeat(3, axis=1)  # patch k's feature is [k, k, k]
    (feature, x), = object_rows(features, [{"center": [48, 16], "radius": 25}], grid=7, image_size=224)
    assert x == 48.0 and np.allclose(feature, 1.0)  # only patch 1 (column 1, row 0) has its centre inside
    assert object_rows(features, [{"center": [0, 0], "radius": 1}], grid=7, image_size=224) == []


def test_the_probe_scores_features_that_carry_x_and_features_that_do_not():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 224, size=400).astype(np.float32)
    carries = np.c_[x / 224, rng.normal(size=(400, 7))].astype(np.float32)
    blind = rng.normal(size=(400, 8)).astype(np.float32)
    assert ridge_r2(carries[:300], x[:300], carries[300:], x[300:])[0] > 0.95
    assert ridge_r2(blind[:300], x[:300], blind[300:], x[300:])[0] < 0.05
