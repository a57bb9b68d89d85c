"""Patch grids: extraction order, stitching with overlap averaging, size errors."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from defect_fast.data import extract_patches, grid_shape, stitch_patches
from defect_fast.data.patches import overlap_add


def _loop_extract(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Reference: patches by explicit loops (image, row, column)."""
    n, _, h, w = images.shape
    out = []
    for b in range(n):
        for i in range(0, h - patch + 1, stride):
            for j in range(0, w - patch + 1, stride):
                out.append(images[b, :, i : i + patch, j : j + patch])
    return torch.stack(out)


def _loop_stitch(patches: torch.Tensor, n: int, h: int, w: int, patch: int, stride: int) -> torch.Tensor:
    """Reference: accumulate and count by explicit loops."""
    c = patches.shape[1]
    acc = torch.zeros(n, c, h, w, dtype=torch.float64)
    cnt = torch.zeros(1, 1, h, w, dtype=torch.float64)
    k = 0
    for b in range(n):
        for i in range(0, h - patch + 1, stride):
            for j in range(0, w - patch + 1, stride):
                acc[b, :, i : i + patch, j : j + patch] += patches[k].double()
                if b == 0:
                    cnt[..., i : i + patch, j : j + patch] += 1
                k += 1
    return acc / cnt


@pytest.mark.parametrize("h, w, patch, stride", [(16, 16, 4, 4), (16, 16, 8, 4), (13, 17, 5, 2), (9, 12, 3, 3), (10, 10, 10, 1)])
def test_extract_matches_loops(h, w, patch, stride):
    x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    p = extract_patches(x, patch, stride)
    gh, gw = grid_shape((h, w), patch, stride)
    assert p.shape == (2 * gh * gw, 3, patch, patch) and p.dtype == torch.uint8
    assert torch.equal(p, _loop_extract(x, patch, stride))


def test_round_trip_without_overlap_is_exact():
    x = torch.randn(3, 2, 24, 32, dtype=torch.float64)
    p = extract_patches(x, 8)
    assert p.shape == (3 * 3 * 4, 2, 8, 8)
    assert torch.equal(stitch_patches(p, (24, 32), 8), x)


def test_round_trip_with_overlap():
    x = torch.randn(2, 3, 20, 20)
    p = extract_patches(x, 8, 4)
    assert p.shape == (2 * 4 * 4, 3, 8, 8)
    assert torch.allclose(stitch_patches(p, 20, 8, 4), x, atol=1e-6)


@pytest.mark.parametrize("h, w, patch, stride", [(20, 20, 8, 4), (13, 17, 5, 2), (12, 12, 6, 3)])
def test_stitch_averages_overlaps(h, w, patch, stride):
    gh, gw = grid_shape((h, w), patch, stride)
    patches = torch.randn(2 * gh * gw, 2, patch, patch, dtype=torch.float64)
    out = stitch_patches(patches, (h, w), patch, stride)
    assert out.shape == (2, 2, h, w) and out.dtype == torch.float64
    assert torch.allclose(out, _loop_stitch(patches, 2, h, w, patch, stride))


@pytest.mark.parametrize("h, w, patch, stride", [(24, 40, 8, 8), (20, 28, 8, 4), (18, 26, 8, 2), (13, 17, 5, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_overlap_add_is_col2im_bit_for_bit(h, w, patch, stride, channels_last):
    """Shifted block sums (stride dividing patch) add what col2im adds, in its order; other
    strides go to fold itself."""
    gh, gw = grid_shape((h, w), patch, stride)
    patches = torch.randn(3 * gh * gw, 3, patch, patch)
    if channels_last:
        patches = patches.contiguous(memory_format=torch.channels_last)
    cols = patches.reshape(3, gh * gw, 3 * patch * patch).transpose(1, 2)
    expected = F.fold(cols, output_size=(h, w), kernel_size=patch, stride=stride)
    out = overlap_add(patches, (gh, gw), patch, stride)
    assert out.shape == (3, 3, h, w)
    assert torch.equal(out, expected)


def test_stitch_integer_patches_become_float():
    p = torch.tensor([1, 2, 3, 4], dtype=torch.uint8).repeat_interleave(16).reshape(4, 1, 4, 4)
    out = stitch_patches(p, 6, 4, 2)
    assert out.dtype == torch.float32
    assert out[0, 0, 2, 2].item() == pytest.approx(2.5)  # covered by all four patches
    assert out[0, 0, 0, 0].item() == 1.0 and out[0, 0, 5, 5].item() == 4.0


def test_grid_errors_say_what_fits():
    with pytest.raises(ValueError, match=r"height 500 does not fit patch 64 with stride 32.*image size of 480 or 512"):
        grid_shape(500, 64, 32)
    with pytest.raises(ValueError, match=r"width 30 is smaller than the patch size 64"):
        grid_shape((64, 30), 64)
    with pytest.raises(ValueError, match=r"stride dividing 6 \(e\.g\. 3, 2, 1\)"):
        extract_patches(torch.zeros(1, 1, 10, 10), 4, 4)
    with pytest.raises(ValueError, match="positive"):
        grid_shape(16, 4, 0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        extract_patches(torch.zeros(10, 10), 5)


def test_stitch_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        stitch_patches(torch.zeros(5, 1, 4, 4), 8, 4)
    with pytest.raises(ValueError, match="uncovered"):
        stitch_patches(torch.zeros(4, 1, 2, 2), 6, 2, 4)
    with pytest.raises(ValueError, match=r"\[N\*P, C, 4, 4\]"):
        stitch_patches(torch.zeros(4, 1, 3, 3), 8, 4)
    assert stitch_patches(torch.zeros(0, 3, 4, 4), 8, 4).shape == (0, 3, 8, 8)


def test_a_side_one_pixel_short_of_the_patch_is_refused_as_too_small():
    """At stride 1 a side of patch - 1 gave "fits" arithmetic ((-1) % 1 == 0) and a grid of 0 rows."""
    with pytest.raises(ValueError, match=r"height 3 is smaller than the patch size 4"):
        grid_shape(3, 4, 1)
    with pytest.raises(ValueError, match=r"width 7 is smaller than the patch size 8"):
        grid_shape((8, 7), 8)


def test_a_stride_one_past_the_patch_is_refused_for_stitching():
    """stride = patch + 1 fits the grid (9 - 4 = 5) but leaves a pixel column and row uncovered."""
    assert grid_shape(9, 4, 5) == (2, 2)
    with pytest.raises(ValueError, match="uncovered"):
        stitch_patches(torch.zeros(4, 1, 4, 4), 9, 4, 5)
