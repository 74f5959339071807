import torch

from trimodal.models.projector import Projector, build_projector


def test_phi2_projector_parameter_counts_match_the_original_recipe():
    proj = Projector(vision_dim=640, lm_hidden=2560)  # TinyCLIP-61M/32 -> Phi-2, nothing downloaded
    linear = sum(p.numel() for p in proj.linear.parameters())
    res_block = sum(p.numel() for p in proj.res_block.parameters())
    assert linear == 1_640_960
    assert res_block == 13_117_440


def test_projector_shapes_and_seeded_init():
    a, b = build_projector(32, 64, seed=3), build_projector(32, 64, seed=3)
    x = torch.randn(2, 49, 32)
    assert a(x).shape == (2, 49, 64)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), build_projector(32, 64, seed=4)(x))
