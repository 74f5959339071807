"""The image projector: Linear(vision_dim, lm_hidden) followed by a SimpleResBlock (a residual MLP).

Layout and parameter names are those of the recipe's original Phi-2 + TinyCLIP projector (see README.md, "What it
is"), so a Phi-2-sized projector has exactly its parameter counts (tests/unit/models/test_projector.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trimodal.models.init import seeded


class SimpleResBlock(nn.Module):
    """x = LayerNorm(x); return x + Linear(GELU(Linear(x)))."""

    def __init__(self, dim: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        return x + self.proj(x)


def grid_positions(positions: int, dim: int) -> torch.Tensor:
    """Where each of `positions` patches (a square grid, raster order) is: its column and its row, each scaled to
    [-1, 1], along two random directions of a `dim`-wide space, at the scale of layer-normalised features."""
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"position embeddings need a square grid of patches, got {positions}")
    steps = torch.linspace(-1.0, 1.0, side)
    column = steps.repeat(side)  # [side] -> [N]: left to right along each row
    row = steps.repeat_interleave(side)  # [side] -> [N]: top to bottom
    across, down = torch.randn(dim), torch.randn(dim)
    return column[:, None] * across + row[:, None] * down  # [N, 1] * [dim] -> [N, dim]


class Projector(nn.Module):
    """Maps CLIP patch features into the LM's embedding space.

    With `positions` > 0 it first adds a learned embedding per patch position (`position`) to the features. The LM
    reads the patch tokens in raster order, and its own positions do not tell it a patch's column; a tower trained
    from scratch on captions need not keep where a patch is in its outputs (the cpu preset's does not), so this puts
    it back. A pretrained CLIP's patch features carry position and need none.

    The features are layer-normalised first (`feature_norm`) and the embedding starts as the patch's column and row
    (`grid_positions`), so from the first step where a patch is weighs as much in the sum as what it shows. Without
    `feature_norm` (the layout of runs trained before it) the features enter as they are.
    """

    def __init__(self, vision_dim: int, lm_hidden: int, positions: int = 0, feature_norm: bool = True):
        super().__init__()
        self.vision_dim = vision_dim
        self.lm_hidden = lm_hidden
        self.positions = positions
        if positions:
            self.feature_norm = nn.LayerNorm(vision_dim) if feature_norm else nn.Identity()
            self.position = nn.Parameter(grid_positions(positions, vision_dim))
        self.linear = nn.Linear(vision_dim, lm_hidden)
        self.res_block = SimpleResBlock(lm_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.positions:
            if features.shape[-2] != self.positions:
                raise ValueError(f"the projector was built for {self.positions} patch positions, "
                                 f"got features of {features.shape[-2]}")
            features = self.feature_norm(features) + self.position  # [B, N, vision_dim] + [N, vision_dim]
        # [B, N, vision_dim] -> [B, N, lm_hidden], e.g. [B, 49, 640] -> [B, 49, 2560] for Phi-2
        return self.res_block(self.linear(features))


def build_projector(vision_dim: int, lm_hidden: int, seed: int = 0, positions: int = 0,
                    feature_norm: bool = True) -> Projector:
    """A freshly initialised projector, reproducible from `seed`; `positions`, `feature_norm`: see `Projector`."""
    with seeded(seed):
        return Projector(vision_dim, lm_hidden, positions, feature_norm)
