"""Perlin noise and the irregular masks made from it."""
from __future__ import annotations

import pytest
import torch

from defect_fast.synthesis.perlin import (coverage_draw, fractal_noise, perlin_mask, perlin_noise, shape_noise,
                                          threshold_at_coverage)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_is_smooth_zero_mean_and_bounded():
    n = perlin_noise(8, 64, 80, _gen(0), scale_range=(2, 8))
    assert n.shape == (8, 1, 64, 80) and n.dtype == torch.float32
    assert n.abs().max() <= 1.0 + 1e-5
    assert n.std() > 0.15 and n.mean().abs() < 0.1
    # smooth: neighbouring pixels differ far less than the values spread
    assert (n[..., 1:] - n[..., :-1]).abs().mean() < 0.2 * n.std()
    # different images are different noise
    assert (n[0] - n[1]).abs().mean() > 0.1


def test_scale_sets_blob_size_and_rotation_changes_the_field():
    rough = lambda x: ((x[..., 1:] - x[..., :-1]).abs().mean() / x.std()).item()
    coarse = perlin_noise(4, 128, 128, _gen(1), scale_range=(2, 2), rotate=False)
    fine = perlin_noise(4, 128, 128, _gen(1), scale_range=(16, 16), rotate=False)
    assert rough(fine) > 4 * rough(coarse)
    turned = perlin_noise(4, 128, 128, _gen(1), scale_range=(2, 2), rotate=True)
    assert (turned - coarse).abs().mean() > 0.05


def test_fractal_noise_has_finer_detail():
    a = perlin_noise(4, 128, 128, _gen(2), scale_range=(4, 4))
    b = fractal_noise(4, 128, 128, _gen(2), scale_range=(4, 4), octaves=4)
    rough = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean() / x.std()
    assert rough(b) > 1.5 * rough(a)


@pytest.mark.parametrize("scale_range", [(1, 4), (1, 32), (16, 32)])
def test_mask_coverage_matches_request(scale_range):
    cov = torch.tensor([0.005, 0.02, 0.1, 0.25, 0.5, 0.8])
    m = perlin_mask(6, 96, 128, _gen(3), cov, scale_range=scale_range)
    assert m.shape == (6, 1, 96, 128) and m.dtype == torch.bool
    got = m.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, cov, atol=3e-3, rtol=0.05)


def test_mask_coverage_range_and_number():
    m = perlin_mask(40, 64, 64, _gen(4), (0.05, 0.2))
    got = m.float().mean(dim=(1, 2, 3))
    assert got.min() >= 0.05 - 3e-3 and got.max() <= 0.2 + 3e-3
    assert got.std() > 0.02  # drawn per image
    m = perlin_mask(3, 64, 64, _gen(4), 0.0)
    assert not m.any()
    m = perlin_mask(3, 64, 64, _gen(4), 1.0)
    assert m.all()


def test_threshold_matches_sorted_quantile():
    f = perlin_noise(5, 70, 90, _gen(5), scale_range=(3, 12))
    cov = torch.tensor([0.01, 0.07, 0.2, 0.33, 0.6])
    mask, thr = threshold_at_coverage(f, cov)
    k = (cov * 70 * 90).round().long()
    exact = f.reshape(5, -1).sort(dim=1, descending=True).values.gather(1, (k - 1).view(-1, 1)).squeeze(1)
    assert ((mask.reshape(5, -1).sum(1) - k).abs() <= 0.003 * 70 * 90).all()
    torch.testing.assert_close(thr, exact, atol=0.02, rtol=0)


def test_masks_are_irregular_not_rectangles():
    m = perlin_mask(16, 128, 128, _gen(6), 0.1, scale_range=(2, 16))
    for i in range(16):
        ys, xs = m[i, 0].nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert m[i].sum() < 0.8 * box  # far from filling its bounding box
    # edge pixels: a rectangle of area A has ~4 sqrt(A) boundary pixels; these have many more
    inner = m[:, :, 1:-1, 1:-1] & m[:, :, :-2, 1:-1] & m[:, :, 2:, 1:-1] & m[:, :, 1:-1, :-2] & m[:, :, 1:-1, 2:]
    boundary = m[:, :, 1:-1, 1:-1].sum() - inner.sum()
    assert boundary > 16 * 4 * (0.1 * 128 * 128) ** 0.5


def test_seeded_masks_are_reproducible():
    a = perlin_mask(4, 64, 64, _gen(7), (0.02, 0.3))
    b = perlin_mask(4, 64, 64, _gen(7), (0.02, 0.3))
    c = perlin_mask(4, 64, 64, _gen(8), (0.02, 0.3))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_follow_request(dtype):
    n = perlin_noise(2, 32, 48, _gen(9), dtype=dtype, device="cpu")
    assert n.dtype == dtype and n.device.type == "cpu"
    m, a = perlin_mask(2, 32, 48, _gen(9), 0.2, softness=3.0, dtype=dtype, return_alpha=True)
    assert a.dtype == dtype and m.dtype == torch.bool


@pytest.mark.cuda
def test_cuda_output_from_cpu_generator():
    m, a = perlin_mask(3, 64, 64, _gen(10), 0.1, softness=3.0, device="cuda", return_alpha=True)
    assert m.is_cuda and a.is_cuda
    cpu = perlin_mask(3, 64, 64, _gen(10), 0.1)
    assert (m.cpu() != cpu).float().mean() < 0.01  # same draws, float differences at the contour only


def test_soft_alpha_edges():
    m, a = perlin_mask(4, 64, 64, _gen(11), 0.2, softness=3.0, return_alpha=True)
    assert torch.equal(a >= 0.5, m)
    assert ((a > 0) & (a < 1)).float().mean() > 0.05  # a real transition band
    # the band's width is set in pixels: about proportional to softness, whatever the noise scale
    for scale in ((2, 2), (16, 16)):
        band = []
        for soft in (2.0, 6.0):
            _, a = perlin_mask(4, 96, 96, _gen(12), 0.2, scale_range=scale, softness=soft, return_alpha=True)
            band.append(((a > 0) & (a < 1)).float().sum())
        assert 2.2 < band[1] / band[0] < 3.8
    assert a.min() >= 0 and a.max() <= 1
    m2, hard = perlin_mask(4, 64, 64, _gen(11), 0.2, softness=0.0, return_alpha=True)
    assert torch.equal(hard, m2.float())


def test_empty_batch_and_errors():
    assert perlin_mask(0, 16, 16, _gen(0), 0.1).shape == (0, 1, 16, 16)
    assert perlin_noise(0, 16, 16, _gen(0)).shape == (0, 1, 16, 16)
    assert perlin_mask(1, 16, 16, _gen(0), 0.25).float().mean().item() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="scale_range"):
        perlin_noise(1, 16, 16, _gen(0), scale_range=(0.5, 2))
    with pytest.raises(ValueError, match="coverage"):
        perlin_mask(1, 16, 16, _gen(0), (0.0, 0.5))
    with pytest.raises(ValueError, match="coverage"):
        coverage_draw(torch.tensor([0.1, 0.2]), 3, _gen(0), torch.device("cpu"), "f")
    with pytest.raises(ValueError, match="coverage"):
        perlin_mask(1, 16, 16, _gen(0), 1.5)


def test_soft_alpha_is_below_half_off_the_mask_even_one_rounding_from_the_contour():
    """alpha >= 0.5 exactly on the mask: a field one float32 step below the threshold stays off."""
    import numpy as np

    from defect_fast.synthesis.perlin import soft_alpha

    below = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    field = torch.tensor([[[[0.0, below, 2.0]]]])
    mask = field >= 1.0
    alpha = soft_alpha(field, torch.tensor([1.0]), mask, 12.0)
    assert torch.equal(alpha >= 0.5, mask)


def test_the_coarsest_lattice_has_two_cells_not_one_gradient():
    """A lattice of one wrapping cell has a single gradient, and its noise is a function of y
    plus a function of x (bands, no blobs): scale 1 is taken as 2 cells per side, whose noise
    is not such a sum."""
    f = perlin_noise(6, 64, 64, _gen(3), scale_range=(1.0, 1.0), rotate=False, dtype=torch.float64)
    interaction = f - f.mean(dim=-1, keepdim=True) - f.mean(dim=-2, keepdim=True) + f.mean(dim=(-2, -1), keepdim=True)
    assert (interaction.flatten(1).abs().amax(1) > 0.05).all()


def test_refined_thresholds_hit_the_coverage_within_a_fraction_of_a_percent():
    """The threshold read from the subsample is corrected on the full field: at 256 px every
    image's mask covers the asked share to within 0.25 % of the image."""
    f = perlin_noise(16, 256, 256, _gen(0), scale_range=(2.0, 32.0))
    mask, _thr = threshold_at_coverage(f, 0.1)
    assert (mask.float().mean((1, 2, 3)) - 0.1).abs().max() < 0.0025


def test_line_fields_follow_the_zero_contour_of_the_noise_whatever_its_sign():
    """A line (crack) runs along the noise's zero contour: its field depends on |noise| only, so
    the noise and its negative give the same lines (not blobs where the noise is negative)."""
    noise = perlin_noise(2, 32, 32, _gen(1), scale_range=(2.0, 4.0))
    envelope = perlin_noise(2, 32, 32, _gen(2), scale_range=(2.0, 3.0))
    shape, side = torch.ones(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    torch.testing.assert_close(shape_noise(noise, envelope, shape, side), shape_noise(-noise, envelope, shape, side))
    # the field is highest on the contour (|noise| small), lower away from it
    field = shape_noise(noise, envelope, shape, side)
    assert (field - envelope).max() <= 0 and float((field - envelope).min()) < -1


def test_an_edge_chip_is_placed_along_its_side_where_asked():
    """``where`` centres an edge chip along its side: on the top side that is a column position
    (x), on the left side a row position (y)."""
    zero = torch.zeros(2, 1, 40, 40)
    shape = torch.full((2,), 2, dtype=torch.int64)
    side = torch.tensor([0, 2])  # top, left
    where = torch.tensor([[0.2, 0.1], [0.2, 0.1]])
    field = shape_noise(zero, zero, shape, side, where)
    top, left = field[0, 0], field[1, 0]
    assert top[0, 8] > 2.5 and top[0, 32] < 0.1  # columns near 0.2 of the width, on the top row
    assert left[8, 0] > 2.5 and left[32, 0] < 0.1  # rows near 0.2 of the height, on the left column
