"""An image's layout and pixels: one or two shapes sampled, placed apart inside the border, drawn without
antialiasing and encoded as PNG bytes that depend only on the pixels."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from trimodal.data.shapes.vocabulary import COLORS, SHAPES

IMAGE_SIZE = 224
"""Width and height (px) of every image."""
MIN_RADIUS, MAX_RADIUS = 25, 55
"""Radius range (px) of the circle every shape is inscribed in."""
EDGE_MARGIN = 4
"""Minimum gap (px) between a shape's bounding circle and the image border."""
GAP = 8
"""Minimum gap (px) between the bounding circles of two shapes."""
BACKGROUND_MIN = 228
"""Each background channel is drawn from BACKGROUND_MIN..255: light, so every colour stands out."""
TWO_OBJECT_SHARE = 0.65
"""Chance that an image shows two shapes. Above one half because every question that needs colour bound to shape,
position or the whole set (colour and shape of one of two, left/right, two-object describe) is asked about them.
An image shows one shape when its draw falls below 1 - TWO_OBJECT_SHARE, so changing the share changes only the
images whose draw falls between the two cuts."""
PNG_PARAMS: dict[str, Any] = {"format": "PNG", "compress_level": 6, "optimize": False}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape, inscribed in the circle of `radius` around (cx, cy); pixel coordinates."""

    color: str
    """One of COLORS."""
    shape: str
    """One of SHAPES."""
    cx: int
    """Centre x (px)."""
    cy: int
    """Centre y (px)."""
    radius: int
    """Radius (px) of the circle the shape is inscribed in."""

    def vertices(self) -> list[tuple[int, int]]:
        """Polygon vertices (square, triangle) or the two corners of the ellipse box (circle)."""
        x, y, r = self.cx, self.cy, self.radius
        if self.shape == "circle":
            return [(x - r, y - r), (x + r, y + r)]
        if self.shape == "square":
            h = round(r / math.sqrt(2))
            return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
        dx, dy = round(r * math.sqrt(3) / 2), round(r / 2)
        return [(x, y - r), (x + dx, y + dy), (x - dx, y + dy)]

    def bbox(self) -> list[int]:
        """COCO-style [x, y, width, height] of the drawn pixels."""
        xs, ys = zip(*self.vertices(), strict=True)
        return [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1]

    def phrase(self) -> str:
        """'a red circle', 'an orange square'."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


def sample_layout(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[ShapeObject, ...]]:
    """(background RGB, objects sorted left to right), drawn from `rng` in that order."""
    red, green, blue = (int(v) for v in rng.integers(BACKGROUND_MIN, 256, size=3))
    return (red, green, blue), _place(rng, _sample_kinds(rng))


def _sample_kinds(rng: np.random.Generator) -> list[tuple[str, str]]:
    """One or two (colour, shape) pairs (two with chance TWO_OBJECT_SHARE); two shapes always have different
    colours."""
    colors = list(COLORS)
    first = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
    if rng.random() < 1 - TWO_OBJECT_SHARE:
        return [first]
    others = [c for c in colors if c != first[0]]
    return [first, (others[int(rng.integers(len(others)))], SHAPES[int(rng.integers(len(SHAPES)))])]


def _place(rng: np.random.Generator, kinds: list[tuple[str, str]]) -> tuple[ShapeObject, ...]:
    """Sizes and positions by rejection sampling until the bounding circles keep GAP px apart."""
    for _ in range(10_000):
        radii = [int(r) for r in rng.integers(MIN_RADIUS, MAX_RADIUS, size=len(kinds), endpoint=True)]
        low, high = (EDGE_MARGIN + r for r in radii), (IMAGE_SIZE - 1 - EDGE_MARGIN - r for r in radii)
        centers = [rng.integers(lo, hi, size=2, endpoint=True) for lo, hi in zip(low, high, strict=True)]
        objects = [ShapeObject(c, s, int(xy[0]), int(xy[1]), r)
                   for (c, s), xy, r in zip(kinds, centers, radii, strict=True)]
        if all(apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            return tuple(sorted(objects, key=lambda o: (o.cx, o.cy)))
    raise RuntimeError(f"could not place {len(kinds)} shapes without overlap")  # pragma: no cover


def apart(a: ShapeObject, b: ShapeObject, gap: int = GAP) -> bool:
    """True when the bounding circles of a and b are at least `gap` px apart."""
    return math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + gap


def render(background: tuple[int, int, int], objects: Sequence[ShapeObject]) -> Image.Image:
    """Draw the objects on a plain background (no antialiasing)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        if obj.shape == "circle":
            draw.ellipse(obj.vertices(), fill=COLORS[obj.color])
        else:
            draw.polygon(obj.vertices(), fill=COLORS[obj.color])
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fixed save parameters and no metadata, so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, **PNG_PARAMS)
    return buffer.getvalue()
