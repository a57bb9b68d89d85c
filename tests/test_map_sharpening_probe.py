"""experiments/map_sharpening_probe.py: the spread measurement and the erosion on toy maps."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from map_sharpening_probe import erode, half_radius, radial_profile  # noqa: E402


def test_the_half_radius_of_a_gaussian_spot_is_its_half_width():
    """A Gaussian of sigma 6 centred off the grid's centre: half its peak at sigma sqrt(2 ln 2) = 7.06 px."""
    s, sigma = 96, 6.0
    centres = torch.tensor([[40.0, 55.0], [60.0, 30.0]])
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    r2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    maps = 5.0 * torch.exp(-r2 / (2 * sigma * sigma))
    radii, prof = radial_profile(maps, centres, step=1.0, r_max=30)
    assert prof[0] == pytest.approx(5.0, rel=0.05) and np.all(np.diff(prof) < 0)
    assert half_radius(radii, prof, 2.5) == pytest.approx(sigma * math.sqrt(2 * math.log(2)), abs=0.3)
    assert half_radius(radii, prof, -1.0) is None  # never reached


def test_erosion_removes_a_halo_narrower_than_its_window_and_keeps_a_wide_region():
    m = torch.zeros(1, 40, 40)
    m[0, 5:25, 5:25] = 1.0  # a region 20 px wide
    m[0, 30, 30] = 9.0  # a one-pixel spike
    e = erode(m, 5)
    assert e[0, 30, 30] == 0  # the spike is gone
    assert torch.equal(e[0, 7:23, 7:23], torch.ones(16, 16))  # the region shrinks by 2 px a side
    assert e[0, 6, 10] == 0 and e.sum() == 16 * 16
    assert torch.equal(erode(m, 1), m)
    with pytest.raises(ValueError, match="odd"):
        erode(m, 4)


def test_erosion_at_the_border_uses_the_map_itself():
    m = torch.arange(16.0).view(1, 4, 4)
    assert torch.equal(erode(m, 3)[0, 0], torch.tensor([0.0, 0.0, 1.0, 2.0]))
