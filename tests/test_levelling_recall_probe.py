"""experiments/levelling_recall_probe.py: recall at matched false positives, and its brightness trend, on toy maps."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from levelling_recall_probe import compare, matched_cut  # noqa: E402


def test_matched_cut_flags_the_asked_number_of_normal_pixels():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    normal = np.ones_like(maps, bool)
    normal[0, 9] = False  # the ten highest are defect pixels
    for n in (0, 1, 7, 90):
        assert int(((maps > matched_cut(maps, normal, n)) & normal).sum()) == n


def test_contrast_scaled_by_brightness_shows_as_a_negative_trend():
    """Each defect scores its contrast times the image's brightness / 100 as read, and the contrast
    alone levelled (what the levelling does to a defect's contrast): at one count of false
    positives the bright images lose recall and the dark ones gain, so the per-image change ranks
    against brightness; the good images' normal pixels are the same noise in both runs."""
    rng = np.random.default_rng(0)
    n, s = 12, 32
    brightness = np.r_[np.full(4, 110.0), np.linspace(60, 170, 8)]
    classes = ["good"] * 4 + ["spot"] * 8
    masks = np.zeros((n, s, s), bool)
    noise = rng.normal(0, 1, (n, s, s)).astype(np.float32)
    as_read, levelled = noise.copy(), noise.copy()
    for i in range(4, n):
        masks[i, 8:24, 8:24] = True
        contrast = rng.uniform(1, 4, (16, 16)).astype(np.float32)
        as_read[i, 8:24, 8:24] = contrast * brightness[i] / 100
        levelled[i, 8:24, 8:24] = contrast * 1.15
    gray = np.broadcast_to(brightness[:, None, None], (n, s, s)).copy()
    gray[masks] += 20.0  # the defects 20 grey levels brighter than the rest of their images
    out = compare(as_read, levelled, masks, classes, gray)
    spot = out["per_class"]["spot"]
    assert spot["n_images_with_defect"] == 8 and spot["share_of_defect_pixels"] == pytest.approx(1.0)
    assert spot["mean_brightness"] == pytest.approx(115.0 + 20 * 0.25) and out["good_mean_brightness"] == pytest.approx(110.0)
    assert spot["normal_pixels_brightness"] == pytest.approx(115.0) and spot["defect_pixels_brightness"] == pytest.approx(135.0)
    assert spot["recall_change_vs_brightness_rank_correlation"] < -0.9
    matched = out["levelled_cut_matched_to_as_read_false_positives"]
    assert int(((levelled > matched["threshold"]) & ~masks).sum()) == matched["normal_pixels_flagged"]
    best = out["f1_optimal_as_read"]
    flagged = as_read > best["threshold"]
    tp = int((flagged & masks).sum())
    assert best["f1"] == pytest.approx(2 * tp / (flagged.sum() + masks.sum()))
    assert sum(best["normal_pixels_flagged"].values()) == int((flagged & ~masks).sum())
