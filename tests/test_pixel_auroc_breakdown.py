"""experiments/pixel_auroc_breakdown.py: the decomposition of the pooled pixel AUROC on toy maps."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from pixel_auroc_breakdown import breakdown  # noqa: E402


def test_a_halo_around_a_defect_is_measured_and_bounded():
    """A defect square scored 3 with a ring scored 5 around it (the bleed of a coarse map): the
    pooled AUROC loses to the ring, the bound without the halo does not, and the ring's pixels
    rank above the good images' while those far from the defect do not."""
    s = 64
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 1, (4, s, s)).astype(np.float32) * 0.1
    masks = np.zeros((4, s, s), bool)
    for i in (2, 3):
        masks[i, 28:36, 28:36] = True
        maps[i, 24:40, 24:40] = 5.0  # a halo of up to 4 px, above the defect itself
        maps[i, 28:36, 28:36] = 3.0
    out = breakdown(maps, masks, ["good", "good", "spot", "spot"], halo=6)  # the square ring: 4 px, corners 5.7
    assert out["pooled_pixel_auroc"] < 0.99
    assert out["pooled_without_halos"] == pytest.approx(1.0)
    spot = out["per_class"]["spot"]
    assert spot["defect_vs_good_pixels"] == pytest.approx(1.0)
    assert spot["defect_vs_normal_pixels_of_its_images"] < spot["defect_vs_good_pixels"]
    assert spot["defect_vs_normal_pixels_of_other_defective_images"] is None  # one defect class only
    rings = spot["normal_pixels_by_distance"]
    assert rings["0-4"]["auroc_vs_good_pixels"] == pytest.approx(1.0) and rings["0-4"]["median"] == 5.0
    assert 0.3 < rings["16-32"]["auroc_vs_good_pixels"] < 0.7
    assert spot["share_of_defect_pixels"] == pytest.approx(1.0)
