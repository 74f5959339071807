"""The image projector: Linear(vision_dim, lm_hidden) followed by a SimpleResBlock (a residual MLP).

Layout and parameter names are those of the recipe's original Phi-2 + TinyCLIP projector (see README.md, "What it
is"), so a Phi-2-sized projector has exactly its parameter counts (tests/unit/models/test_projector.py).
"""

from __future__ import annotations

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


class Projector(nn.Module):
    """Maps CLIP patch features into the LM's embedding space."""

    def __init__(self, vision_dim: int, lm_hidden: int):
        super().__init__()
        self.vision_dim = vision_dim
        self.lm_hidden = lm_hidden
        self.linear = nn.Linear(vision_dim, lm_hidden)
        self.res_block = SimpleResBlock(lm_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # [B, N, vision_dim] -> [B, N, lm_hidden], e.g. [B, 49, 640] -> [B, 49, 2560] for Phi-2
        return self.res_block(self.linear(features))


def build_projector(vision_dim: int, lm_hidden: int, seed: int = 0) -> Projector:
    """A freshly initialised projector, reproducible from `seed`."""
    with seeded(seed):
        return Projector(vision_dim, lm_hidden)
