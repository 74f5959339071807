"""Seeded initialisation: build a random model reproducibly without disturbing the caller's random stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generator seeded by `seed`; the CPU generator's state is restored after.

    `torch.manual_seed` also reseeds the CUDA generators, and those are left reseeded (not restored): every random
    builder has always done so, and a training loop seeds its own generators again after building its models.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
