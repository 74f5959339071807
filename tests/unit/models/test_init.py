"""Seeded initialisation: reproducible random models that leave the caller's CPU random stream where it was."""

import torch

from trimodal.config import load_config
from trimodal.models.init import seeded
from trimodal.models.language import build_random_lm
from trimodal.models.projector import build_projector
from trimodal.models.speech import build_random_whisper
from trimodal.models.vision import build_random_clip


def test_seeded_block_is_reproducible_and_restores_the_cpu_generator():
    torch.manual_seed(99)
    state = torch.get_rng_state()
    with seeded(5):
        a = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded(5):
        assert torch.equal(torch.randn(4), a)


def test_random_builders_are_reproducible_and_leave_the_global_generator_alone():
    model = load_config("test").model
    builders = [lambda: build_projector(32, 64, seed=3),
                lambda: build_random_lm(model.language_model.random_shape, 260, seed=1),
                lambda: build_random_clip(model.vision.random_shape, model.vision.image_size),
                lambda: build_random_whisper(seed=2)]
    for build in builders:
        torch.manual_seed(1234)
        first = build().state_dict()
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(1234).get_state())
        second = build().state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
