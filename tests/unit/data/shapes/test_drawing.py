"""Drawing the shapes set's images: shapes apart and inside the border, drawn in their colour, every colour/shape
pair drawn, the two-shape share, and stable PNG bytes."""

from __future__ import annotations

from collections import Counter

import pytest

import trimodal.data.shapes.drawing as drawing
from trimodal.data.shapes.drawing import EDGE_MARGIN, IMAGE_SIZE, TWO_OBJECT_SHARE, apart, encode_png, render
from trimodal.data.shapes.samples import sample_image
from trimodal.data.shapes.vocabulary import COLORS, SHAPES


def test_shapes_are_apart_inside_and_drawn_in_their_colour() -> None:
    for index in range(150):
        sample = sample_image(7, "train", index)
        assert len(sample.objects) in (1, 2)
        assert min(sample.background) >= 200
        if len(sample.objects) == 2:
            a, b = sample.objects
            assert apart(a, b)
            assert a.color != b.color
        pixels = render(sample.background, sample.objects).load()
        for obj in sample.objects:
            x, y, w, h = obj.bbox()
            assert x >= EDGE_MARGIN and y >= EDGE_MARGIN
            assert x + w <= IMAGE_SIZE - EDGE_MARGIN and y + h <= IMAGE_SIZE - EDGE_MARGIN
            assert pixels[obj.cx, obj.cy] == COLORS[obj.color]


def test_all_colour_shape_pairs_are_covered() -> None:
    samples = [sample_image(0, "train", i) for i in range(200)]
    pairs = Counter((o.color, o.shape) for s in samples for o in s.objects)
    assert set(pairs) == {(c, s) for c in COLORS for s in SHAPES}
    counts = Counter(len(s.objects) for s in samples)
    assert counts[1] > 50 and counts[2] > 50
    assert any(s.objects[0].shape == s.objects[1].shape for s in samples if len(s.objects) == 2)


def test_two_shape_share_and_a_lower_share_changes_only_images_between_the_cuts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = 400
    at_share = [sample_image(0, "train", i) for i in range(n)]
    share = sum(len(s.objects) == 2 for s in at_share) / n
    assert abs(share - TWO_OBJECT_SHARE) < 3 * (TWO_OBJECT_SHARE * (1 - TWO_OBJECT_SHARE) / n) ** 0.5
    monkeypatch.setattr(drawing, "TWO_OBJECT_SHARE", 0.5)
    lower = [sample_image(0, "train", i) for i in range(n)]
    changed = [i for i in range(n) if lower[i] != at_share[i]]
    assert all(len(lower[i].objects) == 1 and len(at_share[i].objects) == 2 for i in changed)
    assert 0 < len(changed) < n * (TWO_OBJECT_SHARE - 0.5) * 2  # only images drawn between the two cuts


def test_png_encoding_is_stable() -> None:
    sample = sample_image(3, "train", 11)
    background, objects = sample.background, sample.objects
    assert encode_png(render(background, objects)) == encode_png(render(background, objects))
