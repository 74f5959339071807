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


def test_position_embeddings_start_as_column_and_row_and_tell_patches_apart():
    placed = build_projector(32, 64, seed=3, positions=49)
    assert placed.position.shape == (49, 32)
    pos = placed.position.detach()  # [49, 32]: raster order of a 7x7 grid
    assert torch.allclose(pos[0] - pos[6], pos[42] - pos[48])  # left to right is one direction in every row
    assert torch.allclose(pos[0] - pos[42], pos[6] - pos[48])  # top to bottom is another in every column
    assert torch.allclose(pos[24], torch.zeros(32), atol=1e-6)  # the centre patch is at (0, 0)
    assert torch.allclose(pos[3] + pos[45], torch.zeros(32), atol=1e-6)  # top and bottom middle: opposite rows
    same = torch.randn(1, 1, 32).expand(1, 49, 32)  # the same feature at every patch
    out = placed(same)  # [1, 49, 64]
    assert not torch.allclose(out[0, 0], out[0, 6])  # columns 0 and 6 differ from the first step


def test_positioned_projector_normalises_features_so_their_scale_cannot_drown_position():
    placed = build_projector(32, 64, seed=3, positions=49)
    x = torch.randn(2, 49, 32)
    assert torch.allclose(placed(x), placed(40 * x), atol=1e-4)  # a tower whose features are 40x larger
    ratio = placed.position.norm(dim=-1).mean() / placed.feature_norm(x).norm(dim=-1).mean()
    assert 0.3 < ratio < 1.5  # position starts at about the size of a normalised feature


def test_position_embeddings_need_a_square_grid():
    try:
        build_projector(32, 64, positions=50)
    except ValueError as exc:
        assert "square grid" in str(exc) and "50" in str(exc)
    else:
        raise AssertionError("a projector was built for 50 positions, which no square grid has")


def test_position_embeddings_refuse_another_patch_count():
    placed = build_projector(32, 64, positions=49)
    try:
        placed(torch.randn(1, 50, 32))
    except ValueError as exc:
        assert "49 patch positions" in str(exc) and "50" in str(exc)
    else:
        raise AssertionError("50 patches went through a projector built for 49")
