"""experiments/profile_score_probe.py: the share of a map's top pixels on high profile lines."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from profile_score_probe import share_on_high_lines  # noqa: E402


def test_share_counts_the_top_pixels_on_rows_or_columns_at_the_level():
    maps = torch.zeros(2, 8, 8)
    maps[0, 3, :] = 5.0 + 0.1 * torch.arange(8)  # image 0: its top 8 pixels fill row 3 (no ties)
    maps[1, :, 6] = 5.0 + 0.1 * torch.arange(8)  # image 1: they fill column 6
    values = torch.zeros(2, 8)
    values[0, 3] = 2.5
    values[1, 6] = 1.0
    np.testing.assert_allclose(share_on_high_lines(maps, values, 8, 2.0, "rows"), [1.0, 0.0])
    values[1, 6] = 2.0  # at the level counts
    np.testing.assert_allclose(share_on_high_lines(maps, values, 8, 2.0, "columns"), [0.125, 1.0])
    # the top 4 of image 1 are rows 7, 6, 5, 4 of column 6: one of them (row 6) has a value >= 2
    values = torch.stack([values[0], torch.tensor([0, 0, 0, 0, 0, 0, 2.0, 0])])
    np.testing.assert_allclose(share_on_high_lines(maps, values, 4, 2.0, "rows"), [1.0, 0.25])
