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


def test_position_embeddings_start_at_zero_and_tell_patches_apart():
    plain, placed = build_projector(32, 64, seed=3), build_projector(32, 64, seed=3, positions=49)
    assert placed.position.shape == (49, 32)
    same = torch.randn(1, 1, 32).expand(1, 49, 32)  # the same feature at every patch
    assert torch.equal(placed(same), plain(same))  # zero at the start: the plain projector's output
    with torch.no_grad():
        placed.position.normal_()
    out = placed(same)  # [1, 49, 64]
    assert not torch.allclose(out[0, 0], out[0, 6])  # columns 0 and 6 of the 7x7 grid now differ


def test_position_embeddings_refuse_another_patch_count():
    placed = build_projector(32, 64, positions=49)
    try:
        placed(torch.randn(1, 50, 32))
    except ValueError as exc:
        assert "49 patch positions" in str(exc) and "50" in str(exc)
    else:
        raise AssertionError("50 patches went through a projector built for 49")
