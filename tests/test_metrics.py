"""Metrics against hand-computed values, scikit-learn and a slow straightforward AUPRO."""
from __future__ import annotations

import math
import warnings
from collections import deque

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

import defect_fast.metrics as metrics
from defect_fast.metrics import (
    MetricWarning,
    aupro,
    connected_components,
    evaluate,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)

# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------


def _flood_labels(mask: np.ndarray, connectivity: int = 8) -> list[np.ndarray]:
    """Regions of one [H, W] mask by breadth-first flood fill, in raster order of first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    regions = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                region = np.zeros_like(mask, dtype=bool)
                queue = deque([(y, x)])
                seen[y, x] = True
                while queue:
                    cy, cx = queue.popleft()
                    region[cy, cx] = True
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
                regions.append(region)
    return regions


def _slow_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Threshold every distinct score, measure FPR and mean region overlap, integrate."""
    regions = [(i, r) for i in range(len(masks)) for r in _flood_labels(masks[i])]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append(pred[normal].mean())
        ys.append(np.mean([pred[i][r].mean() for i, r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    keep = xs <= max_fpr
    x, y = list(xs[keep]), list(ys[keep])
    if x[-1] < max_fpr:
        j = int(np.flatnonzero(~keep)[0])
        x.append(max_fpr)
        y.append(ys[j - 1] + (ys[j] - ys[j - 1]) * (max_fpr - xs[j - 1]) / (xs[j] - xs[j - 1]))
    return float(np.sum(np.diff(x) * (np.array(y[1:]) + np.array(y[:-1])) / 2)) / max_fpr


def _sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    return float(np.max(2 * p * r / np.maximum(p + r, 1e-300)))


# --------------------------------------------------------------------------------------------
# AUROC and F1-max
# --------------------------------------------------------------------------------------------


def test_auroc_perfect_inverted_and_worked_example():
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > both) -> 3 of 4
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half: (1 + 0.5) / 2
    assert image_auroc([0.5, 0.2, 0.5], [1, 0, 0]) == pytest.approx(0.75)


def test_pixel_auroc_perfect_map():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 3:6] = True
    maps = masks.float() * 0.5 + 0.1
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0
    assert pixel_f1_max(maps, masks) == 1.0


def test_f1_max_worked_example():
    # thresholds 0.9..0.5: (tp, fp) = (1,0) (1,1) (2,1) (3,1) (3,2), 3 positives;
    # F1 = 2tp / (tp + fp + 3) -> 0.5, 0.4, 0.667, 0.857, 0.75
    s = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    y = np.array([[1, 0, 1, 1, 0]], dtype=bool)
    assert pixel_f1_max(s, y) == pytest.approx(6 / 7)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_and_f1_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random((4, 9, 11)), 1 + seed % 2).astype(np.float32)  # many ties
    y = rng.random((4, 9, 11)) < 0.2
    assert pixel_auroc(s, y) == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)
    assert pixel_f1_max(s, y) == pytest.approx(_sk_f1_max(y.ravel(), s.ravel()), abs=1e-12)
    img = rng.random(30).round(1)
    lab = rng.random(30) < 0.5
    assert image_auroc(img, lab) == pytest.approx(roc_auc_score(lab, img.astype(np.float32)), abs=1e-12)


def test_negative_scores_and_signed_zero():
    s = np.array([[-3.0, -0.0, 0.0, -1e-30, 2.0, -2.0]], dtype=np.float32)
    y = np.array([[0, 1, 0, 1, 1, 0]], dtype=bool)
    assert pixel_auroc(s, y) == pytest.approx(roc_auc_score(y.ravel(), s.ravel() + 0.0))


# --------------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------------


def test_components_hand_cases():
    diag = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert connected_components(diag, 8)[1] == 1
    lab4, k4 = connected_components(diag, 4)
    assert k4 == 3 and lab4.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
    u = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)  # joined only at the bottom
    lab, k = connected_components(u)
    assert k == 1 and lab[u].eq(1).all() and lab[~u].eq(0).all()
    two = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    lab, k = connected_components(two, 8)
    assert k == 2 and lab.tolist() == [[0, 1, 0, 0, 2], [1, 1, 0, 0, 2], [0, 0, 0, 2, 0]]


def test_components_do_not_cross_images():
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, 3, :] = True  # last row of image 0
    m[1, 0, :] = True  # first row of image 1: same flat neighbourhood, different image
    m[2, 0, 0] = m[2, 3, 3] = True
    lab, k = connected_components(m)
    assert k == 4
    assert lab[0, 3].eq(1).all() and lab[1, 0].eq(2).all() and lab[2, 0, 0] == 3 and lab[2, 3, 3] == 4
    assert connected_components(torch.zeros(2, 5, 5, dtype=torch.bool))[1] == 0


def test_int32_labels_are_the_int64_ones_and_a_count_past_their_range_is_refused():
    """The pixel metrics label the masks in int32 (with the sort keys the labels were their largest
    array: 17.5 -> 13.3 bytes a pixel over the maps, `python benchmarks/memory.py metrics`)."""
    rng = np.random.default_rng(3)
    m = torch.from_numpy(rng.random((4, 37, 41)) < 0.4)
    lab64, k64 = connected_components(m, 8)
    lab32, k32 = connected_components(m, 8, dtype=torch.int32)
    assert lab32.dtype == torch.int32 and k32 == k64 and torch.equal(lab32.long(), lab64)
    with pytest.raises(ValueError, match="int32 labels cannot number 2147483648 pixels"):
        connected_components(torch.zeros(1, 1, 1, dtype=torch.bool).expand(1, 1 << 16, 1 << 15), dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype must be torch.int32 or torch.int64"):
        connected_components(m, dtype=torch.float32)


def test_the_pixel_metrics_label_the_masks_in_int32(monkeypatch):
    import defect_fast.metrics as metrics

    asked = []
    real = metrics.connected_components
    monkeypatch.setattr(metrics, "connected_components", lambda *a, **k: (asked.append(k.get("dtype")), real(*a, **k))[1])
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[1, 4:8, 4:8] = True
    assert metrics.aupro(maps, masks) == pytest.approx(metrics.aupro(maps.double(), masks))
    assert asked and set(asked) == {torch.int32}


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(8):
        m = rng.random((3, 11, 13)) < rng.uniform(0.1, 0.7)
        m[rng.integers(0, 3)] = False
        lab, k = connected_components(m, connectivity)
        expected = np.zeros(m.shape, dtype=np.int64)
        count = 0
        for i in range(3):
            for r in _flood_labels(m[i], connectivity):
                count += 1
                expected[i][r] = count
        assert k == count
        np.testing.assert_array_equal(lab.numpy(), expected)


def test_components_spiral_converges():
    # a one-pixel-wide serpentine path: one region whose runs chain through every row
    s = np.zeros((41, 41), dtype=bool)
    s[::2, :] = True
    for r in range(1, 41, 2):
        s[r, 40 if (r // 2) % 2 == 0 else 0] = True
    lab, k = connected_components(s, 4)
    assert k == 1 and int(lab.max()) == 1 and int((lab == 1).sum()) == int(s.sum())


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


def test_aupro_perfect_constant_and_worked_example():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4, 4] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    # constant map: the curve jumps straight to (1, 1); area under y = x up to 0.3 is 0.045
    assert aupro(np.zeros((2, 6, 6)), masks) == pytest.approx(0.045 / 0.3)

    # two one-pixel regions A (score 1.0) and B (0.5); ten normal pixels, one of them at 0.7:
    # points (0, .5) (.1, .5) (.1, 1) (1, 1) -> area up to 0.3: .1*.5 + .2*1 = .25
    maps = np.zeros((1, 3, 4), dtype=np.float32)
    gt = np.zeros((1, 3, 4), dtype=bool)
    maps[0, 0, 0], gt[0, 0, 0] = 1.0, True
    maps[0, 2, 3], gt[0, 2, 3] = 0.5, True
    maps[0, 1, 1] = 0.7
    assert aupro(maps, gt) == pytest.approx(0.25 / 0.3)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 8, 10)) < 0.15
    masks[0] = False  # one good image
    maps = (rng.random(masks.shape) + masks * rng.uniform(0.0, 1.0)).astype(np.float32)
    if seed % 2:
        maps = np.round(maps, 1)  # ties
    for max_fpr in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, max_fpr) == pytest.approx(_slow_aupro(maps, masks, max_fpr), abs=1e-9)


def test_streaming_blocks_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(7)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 2).astype(np.float32)
    labels = [0, 1, 1, 1]
    classes = ["good", "a", "b", "a"]
    big = evaluate(maps, masks, maps.reshape(4, -1).max(1), labels, classes)
    monkeypatch.setattr(metrics, "_BLOCK", 5)  # many blocks, each extended to the end of a tie run
    small = evaluate(maps, masks, maps.reshape(4, -1).max(1), labels, classes)
    for key in ("pixel_auroc", "image_auroc", "pixel_f1_max"):  # integer counts: identical
        assert small[key] == big[key]
    assert small["aupro"] == pytest.approx(big["aupro"], abs=1e-12)  # float sums: same up to rounding
    for cls in ("a", "b"):
        for key, value in big["per_class"][cls].items():
            assert small["per_class"][cls][key] == pytest.approx(value, abs=1e-12)
    assert big["aupro"] == pytest.approx(_slow_aupro(maps, masks, 0.3), abs=1e-9)
    # pixel AUROC and F1-max alone pack their keys in the same slices
    flat_masks = masks.reshape(-1)
    assert pixel_auroc(maps, masks) == roc_auc_score(flat_masks, maps.reshape(-1))
    assert pixel_auroc(maps, masks) == big["pixel_auroc"]


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def test_evaluate_overall_and_per_class_match_direct_calls():
    rng = np.random.default_rng(11)
    n = 7
    labels = np.array([0, 0, 1, 1, 1, 0, 1])
    classes = ["good", "good", "crack", "spot", "crack", "good", "spot"]
    masks = np.zeros((n, 12, 12), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, 9, 2)
        masks[i, y : y + 3, x : x + 2] = True
    maps = torch.from_numpy((rng.random(masks.shape) * 0.6 + masks * 0.5).astype(np.float32))
    scores = maps.flatten(1).amax(1)
    res = evaluate(maps, torch.from_numpy(masks), scores, torch.tensor(labels), classes)
    assert set(res) == {"pixel_auroc", "image_auroc", "aupro", "pixel_f1_max", "num_images", "per_class"}
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.numpy().ravel()), abs=1e-12)
    assert res["pixel_f1_max"] == pytest.approx(_sk_f1_max(masks.ravel(), maps.numpy().ravel()), abs=1e-12)
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores.numpy()), abs=1e-12)
    assert res["aupro"] == pytest.approx(_slow_aupro(maps.numpy(), masks, 0.3), abs=1e-9)
    assert sorted(res["per_class"]) == ["crack", "spot"]
    for cls, own in (("crack", [2, 4]), ("spot", [3, 6])):
        idx = [0, 1, 5] + own
        pc = res["per_class"][cls]
        assert pc["num_images"] == 5
        assert pc["pixel_auroc"] == pytest.approx(pixel_auroc(maps[idx], masks[idx]), abs=1e-12)
        assert pc["aupro"] == pytest.approx(_slow_aupro(maps.numpy()[idx], masks[idx], 0.3), abs=1e-9)
        assert pc["pixel_f1_max"] == pytest.approx(pixel_f1_max(maps[idx], masks[idx]), abs=1e-12)
        assert pc["image_auroc"] == pytest.approx(roc_auc_score(labels[idx], scores.numpy()[idx]), abs=1e-12)


def test_single_class_gives_nan_with_warning():
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.warns(MetricWarning, match="pixel AUROC is undefined"):
        assert math.isnan(pixel_auroc(maps, masks))
    with pytest.warns(MetricWarning, match="image AUROC"):
        assert math.isnan(image_auroc([0.1, 0.2], [1, 1]))
    with pytest.warns(MetricWarning, match="AUPRO"):
        assert math.isnan(aupro(maps, masks))
    with pytest.warns(MetricWarning):
        res = evaluate(maps, masks, [0.1, 0.2], [0, 0], ["good", "good"])
    assert math.isnan(res["pixel_auroc"]) and math.isnan(res["image_auroc"]) and res["per_class"] == {}


def test_no_images_give_nan_with_warning():
    maps, masks = np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), bool)
    with pytest.warns(MetricWarning, match="AUPRO"):
        assert math.isnan(aupro(maps, masks))
    with pytest.warns(MetricWarning):
        res = evaluate(maps, masks, None, None, None)
    assert res["num_images"] == 0 and all(math.isnan(res[k]) for k in ("pixel_auroc", "aupro", "pixel_f1_max"))


def test_bad_inputs_raise():
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(maps, masks[:, :3])
    # lists of maps of two sizes: the module's words, not numpy's "inhomogeneous shape"
    with pytest.raises(ValueError, match="anomaly maps must be \\[N, H, W\\]: got a list of differently sized"):
        pixel_auroc([maps[0], maps[1, :3]], [masks[0], masks[1, :3]])
    with pytest.raises(ValueError, match="masks must be \\[N, H, W\\]: got a list of differently sized"):
        aupro(maps, [masks[0], masks[1, :3]])
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, masks, [0, 1], [0, 1], ["good", "x"])
    with pytest.raises(ValueError, match="2 anomaly maps but 3 labels"):
        evaluate(maps, masks, [0, 1], [0, 1, 1], ["good", "x"])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        evaluate(maps, masks, [0, 1], [0, 2], ["good", "x"])
    # a label between 0 and 1 is refused as given, not truncated to 0 (nor read as defective)
    for labels in ([0, 0.5], [0, -0.4]):
        with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
            evaluate(maps, masks, [0, 1], labels, ["good", "x"])
        with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
            image_auroc([0.1, 0.2], labels)
    # labels of any dtype, bfloat16 included (numpy has none: an internal TypeError), as the
    # calibration's F1 threshold reads them, which checks them alike
    from defect_fast.calibration import f1_optimal_threshold

    for dtype in (torch.bfloat16, torch.bool, torch.uint8, torch.float64):
        assert image_auroc([0.1, 0.2], torch.tensor([0, 1]).to(dtype)) == 1.0
        assert f1_optimal_threshold([0.1, 0.2], torch.tensor([0, 1]).to(dtype))["f1"] == 1.0
    for dtype in (torch.bfloat16, torch.uint8, torch.float64):
        with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
            f1_optimal_threshold([0.1, 0.2], torch.tensor([0, 2]).to(dtype))
    # numpy labels of any kind the calibration read before: object arrays, another byte order
    for labels in (np.array([0, 1], dtype=object), np.array([0, 1], dtype=">i4")):
        assert f1_optimal_threshold([0.1, 0.2], labels)["f1"] == 1.0 and image_auroc([0.1, 0.2], labels) == 1.0
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_auroc([0.1, 0.2], np.array(["a", "b"], dtype=object))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(bad.astype(np.float64), masks)


def test_float64_and_wide_integer_scores_keep_their_order():
    """float64 scores were compared at float32: distinct values float32 cannot tell apart
    became ties (image scores 1e6 + 0.01 i gave AUROC 0.9, not 1.0; a float64 map 1 + 1e-9 i gave
    a pixel AUROC of 0.5 and AUPRO 0.15, not 1.0), and values past float32's range were refused."""
    y = np.array([0] * 5 + [1] * 5)
    for s in (1e6 + 0.01 * np.arange(10), np.arange(10) * 1e-300, np.arange(10) * 1e300 - 4e300,
              (1 << 40) + np.arange(10, dtype=np.int64), torch.arange(10, dtype=torch.int32) + (1 << 30)):
        assert image_auroc(s, y) == 1.0, s
        assert image_auroc(-np.asarray(s), y) == 0.0, s
    maps = (1.0 + 1e-9 * np.arange(32)).reshape(2, 4, 4)
    masks = maps > np.median(maps)
    assert pixel_auroc(maps, masks) == 1.0 and aupro(maps, masks) == pytest.approx(1.0)
    assert pixel_f1_max(maps, masks) == 1.0
    # ties stay ties (-0.0 and 0.0 too), as sklearn counts them, and evaluate agrees per class
    rng = np.random.default_rng(0)
    maps = np.round(rng.random((4, 9, 11)), 2) * 1e-12 + 7.0
    maps[0, 0, :2] = (-0.0, 0.0)
    masks = rng.random(maps.shape) < 0.3
    expect = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expect, abs=1e-12)
    out = evaluate(maps, masks, maps.max(axis=(1, 2)), [0, 1, 0, 1], ["good", "a", "good", "b"])
    assert out["pixel_auroc"] == pytest.approx(expect, abs=1e-12)
    sub = [0, 1, 2]  # class a: its image and the good ones
    assert out["per_class"]["a"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks[sub].ravel(), maps[sub].ravel()), abs=1e-12)


def test_masks_of_other_values_than_0_and_1_are_refused():
    """A soft mask (a 0.05 halo from a bilinear resize) counted every non-zero pixel as a defect:
    pixel AUROC 0.65 and AUPRO 0.41 where the hard mask gives 1.0, and nothing was said (sklearn
    refuses such labels)."""
    maps = np.zeros((1, 8, 8), np.float32)
    maps[0, 2:5, 2:5] = 1.0
    hard = maps > 0.5
    soft = hard.astype(np.float32)
    soft[0, 1:6, 1:6] += 0.05 * (soft[0, 1:6, 1:6] == 0)
    for fn in (pixel_auroc, aupro, pixel_f1_max):
        assert fn(maps, hard.astype(np.float32)) == pytest.approx(1.0)  # 0/1 of any dtype is read as given
        assert fn(maps, torch.from_numpy(hard).to(torch.uint8)) == pytest.approx(1.0)
        with pytest.raises(ValueError, match="masks must be bool or 0/1, got a value 0.05"):
            fn(maps, soft)
    with pytest.raises(ValueError, match="got a value -1"):
        evaluate(maps, -hard.astype(np.int64), None, None, None)
    with pytest.raises(ValueError, match="got a value 255"):
        connected_components(hard.astype(np.uint8) * 255)


def test_a_perfect_map_has_an_aupro_of_exactly_one():
    """One region of 9 pixels: summing 9 x 1/9 gives 1 + 2**-52 without the clip to 1."""
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 2:5, 2:5] = True
    assert aupro(mask.astype(np.float32), mask) == 1.0


def test_a_block_ending_one_ulp_above_the_next_score_does_not_split_its_tie(monkeypatch):
    """Blocks of the streaming pass end on a tie boundary: with one-pixel blocks, scores 1, a, a
    (a one float32 step below 1) and the defect on the last pixel, the ROC step is that of the tie."""
    a = np.nextafter(np.float32(1.0), np.float32(0.0))
    scores = np.array([[[1.0, a, a]]], dtype=np.float32)
    masks = np.array([[[False, False, True]]])
    monkeypatch.setattr(metrics, "_BLOCK", 1)
    assert metrics.pixel_auroc(scores, masks) == roc_auc_score(masks.reshape(-1), scores.reshape(-1)) == 0.25


def test_negative_scores_one_ulp_apart_keep_their_order():
    """Negative float32 scores map to keys by flipping every bit below the sign: a score one ulp
    below another must rank below it (the lowest bit too)."""
    for base in (-1.0, -0.3, -7.5):
        hi = np.float32(base)
        lo = np.nextafter(hi, np.float32(-np.inf))
        for a, b in ((hi, lo), (lo, np.nextafter(lo, np.float32(-np.inf)))):
            assert image_auroc(np.array([a, b], np.float32), [1, 0]) == 1.0, (a, b)
            assert image_auroc(np.array([a, b], np.float32), [0, 1]) == 0.0, (a, b)


def test_f1_max_is_defined_when_every_pixel_is_a_defect():
    """F1 needs defect pixels, not defect-free ones: a mask that is all defect gives F1 1."""
    maps = torch.rand(1, 4, 4)
    masks = torch.ones(1, 4, 4, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricWarning)
        assert pixel_f1_max(maps, masks) == 1.0
