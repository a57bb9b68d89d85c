"""Diagnosis: region masks, top-pixel locations on synthetic maps with known answers, figure grids."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast.diagnose import (diagnose, draw_grid, location_stats, main, rank_correlation, region_masks, top_pixel_mask,
                                  top_pixel_weights)


def test_region_areas_match_counting():
    r = region_masks(64, patch=16, stride=16, border=4, seam=2)
    # border: 4 px on each side -> inner square of 56
    assert r["border"].float().mean().item() == pytest.approx(1 - (56 / 64) ** 2)
    # seams at 16, 32, 48, each +-2 px -> 12 rows (and columns) near a seam
    assert r["seam"].float().mean().item() == pytest.approx(1 - (52 / 64) ** 2)
    assert r["seam"][15, 0] and r["seam"][16, 0] and r["seam"][17, 0] and r["seam"][14, 0]
    assert not r["seam"][13, 20] and not r["seam"][18, 20] and not r["seam"][20, 20]
    # border, seam_only and interior partition the image
    total = r["border"].int() + r["seam_only"].int() + r["interior"].int()
    assert bool((total == 1).all())
    assert r["interior"].float().mean().item() == pytest.approx(1 - (1 - (56 / 64) ** 2) - r["seam_only"].float().mean().item())


def test_overlapping_grid_has_seams_at_every_stride():
    r = region_masks(64, patch=32, stride=16, border=0, seam=1)
    near = r["seam"][:, 40]  # a column away from any seam: rows near 16, 32, 48
    assert near.nonzero().flatten().tolist() == [15, 16, 31, 32, 47, 48]


def test_top_pixel_mask_counts():
    maps = torch.rand(3, 50, 40)
    m = top_pixel_mask(maps, top=0.01)
    assert m.sum(dim=(1, 2)).tolist() == [20, 20, 20]
    # they are the largest values
    for i in range(3):
        assert maps[i][m[i]].min() >= maps[i][~m[i]].max()
    assert top_pixel_mask(maps, top=1e-9).sum().item() == 3  # at least one per map
    # ties with the last top pixel count too: a flat map has no preferred place (topk gave its
    # first rows, the border band, all of them: "border 100 %"), a plateau all of its pixels
    assert bool(top_pixel_mask(torch.ones(2, 50, 40), top=0.01).all())
    plateau = torch.rand(1, 50, 40) * 0.5
    plateau[0, 20:30, 10:30] = 1.0
    assert torch.equal(top_pixel_mask(plateau, top=0.01)[0], plateau[0] == 1.0)
    r = region_masks(64, 16, 16, border=4, seam=1)
    s = location_stats(torch.zeros(3, 64, 64), 16, 16, border=4, seam=1, top=0.01)
    assert s["good"]["share"]["border"] == pytest.approx(float(r["border"].float().mean()))
    # tied pixels share what is left of k: a flat map weighs as much as any other (counted whole,
    # one flat map among twenty with their top pixels in the border took the share to its area)
    hot = torch.rand(20, 64, 64) * 0.1 + r["border"].float()
    s = location_stats(torch.cat([hot, torch.zeros(1, 64, 64)]), 16, 16, border=4, seam=1, top=0.01)
    k = max(1, round(64 * 64 * 0.01))
    assert s["good"]["top_pixels"] == 21 * k
    assert s["good"]["share"]["border"] == pytest.approx((20 + float(r["border"].float().mean())) / 21)
    spot = torch.zeros(1, 64, 64)
    spot[0, 30:32, 30:32] = 1.0  # 4 pixels above, k - 4 shared by the other 4092
    w = top_pixel_weights(spot, top=0.01)
    assert float(w.sum()) == pytest.approx(k) and float(w[0, 30, 30]) == 1.0


def _hot(where: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *where.shape, generator=g) * 0.1 + where.float()


@pytest.mark.parametrize("region", ["seam_only", "border", "interior"])
def test_hot_region_gets_all_top_pixels(region):
    r = region_masks(128, 32, 32, border=8, seam=2)
    maps = _hot(r[region], 5)
    s = location_stats(maps, 32, 32, border=8, seam=2, top=0.01)
    assert s["good"]["images"] == 5 and s["good"]["top_pixels"] == 5 * 164
    assert s["good"]["share"][region] == pytest.approx(1.0)
    others = {"seam_only": ["border", "interior"], "border": ["seam_only", "interior"], "interior": ["border", "seam", "seam_only"]}
    for o in others[region]:
        assert s["good"]["share"][o] == 0.0
    assert s["good"]["ratio"][region] == pytest.approx(1 / s["area"][region])
    assert s["good"]["mean_value"][region] > 1.0 > s["good"]["mean_value"]["interior" if region != "interior" else "border"]
    assert s["defective"] is None


def test_uniform_noise_matches_area_shares():
    maps = torch.rand(40, 128, 128, generator=torch.Generator().manual_seed(1))
    s = location_stats(maps, 32, border=16, seam=3, top=0.01)
    for reg in ("border", "seam", "interior"):
        assert abs(s["good"]["share"][reg] - s["area"][reg]) < 0.03
    assert s["area"]["border"] == pytest.approx(1 - (96 / 128) ** 2)


def test_defective_maps_in_mask_and_per_class():
    n, size = 6, 64
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[3:, 20:30, 20:30] = True
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    classes = ["good"] * 3 + ["spot", "spot", "scratch"]
    maps = torch.rand(n, size, size, generator=torch.Generator().manual_seed(2)) * 0.1
    maps[3:5] += masks[3:5].float()  # "spot" maps hot inside their masks; "scratch" only noise
    s = location_stats(maps, 16, border=4, seam=1, top=0.01, labels=labels, masks=masks, classes=classes)
    assert s["good"]["images"] == 3 and s["defective"]["images"] == 3
    assert s["defective"]["mask_area"] == pytest.approx(100 / size**2)
    assert s["per_class"]["spot"]["in_mask"] == pytest.approx(1.0)
    k = s["settings"]["top_pixels_per_map"]
    assert s["defective"]["in_mask"] == pytest.approx((2 * k + s["per_class"]["scratch"]["in_mask"] * k) / (3 * k))
    assert s["per_class"]["scratch"]["in_mask"] < 0.5


def test_the_top_pixels_are_those_of_the_maps_the_scores_come_from():
    """With the band profile the drawn map has lit rows the score does not read: the top pixels
    (and the red dots) follow score_maps, the mean values stay the drawn map's."""
    r = region_masks(64, 16, 16, border=4, seam=1)
    noise = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    score_maps = noise + r["interior"].float()  # what the scores read: hot inside
    maps = score_maps.clone()
    maps[:, :2, :] += 5.0  # a lit band row along the top edge, in the drawn map only
    s = location_stats(maps, 16, border=4, seam=1, top=0.01, score_maps=score_maps)
    assert s["good"]["share"]["interior"] == pytest.approx(1.0) and s["good"]["share"]["border"] == 0.0
    assert s["good"]["mean_value"]["border"] > 0.5  # of the drawn map (score_maps: about 0.05 there)
    assert location_stats(maps, 16, border=4, seam=1, top=0.01)["good"]["share"]["border"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="score_maps"):
        location_stats(maps, 16, score_maps=score_maps[:, :32])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="labels"):
        location_stats(torch.rand(2, 8, 8), 4, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="square"):
        location_stats(torch.rand(2, 8, 9), 4)
    with pytest.raises(ValueError, match="top"):
        top_pixel_mask(torch.rand(1, 8, 8), top=0)


def test_rank_correlation():
    x = np.array([3.0, 1.0, 2.0, 10.0, 5.0])
    assert rank_correlation(x, x**3) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    assert rank_correlation([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert math.isnan(rank_correlation([1.0], [2.0]))


def _fake_predictions(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    recon = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    maps = torch.rand(n, size, size, generator=g)
    return images, recon, maps, maps.flatten(1).max(1).values


def test_long_class_names_get_figures_whose_names_a_file_system_takes(tmp_path):
    """A class folder of 228 characters or more failed at its figure's temporary file (a file name
    is at most 255 bytes), after all the inference; two long names that share their start stay apart."""
    images, recon, maps, scores = _fake_predictions(4, 32)
    classes = ["good", "good", "k" * 300, "k" * 299 + "j"]
    paths = draw_grid(images, recon, maps, scores, classes, tmp_path, per_class=2)
    names = {paths[c].name for c in classes[2:]}
    assert len(names) == 2 and all(len(n.encode()) <= 215 and paths[c].is_file() for n, c in zip(names, classes[2:]))


def test_draw_grid_rows_and_files(tmp_path):
    images, recon, maps, scores = _fake_predictions(9, 32)
    classes = ["good"] * 5 + ["a/b"] * 2 + ["c"] * 2
    masks = torch.zeros(9, 32, 32, dtype=torch.bool)
    masks[5:, 8:16, 8:16] = True
    paths = draw_grid(images, recon, maps, scores, classes, tmp_path, masks=masks, per_class=4, patch=16)
    assert set(paths) == {"good", "a/b", "c"}
    assert paths["a/b"].name == "a_b.png"
    h_good = Image.open(paths["good"]).size[1]
    h_c = Image.open(paths["c"]).size[1]
    assert h_good > 1.5 * h_c  # 4 rows vs 2 rows
    row = draw_grid(images, recon, maps, scores, classes, tmp_path / "row", per_class=1, scale="row")
    assert Image.open(row["c"]).size[1] < h_c
    with pytest.raises(ValueError, match="scale"):
        draw_grid(images, recon, maps, scores, classes, tmp_path, scale="log")


def test_a_row_scale_below_zero_is_printed_beside_its_map(tmp_path, monkeypatch):
    """With --scale row each map has its own colour scale, from its lowest value where a
    standardised map goes below 0: the row printed only its maximum, and the docstring said the
    scale began at 0."""
    from matplotlib.axes import Axes

    images, recon, maps, scores = _fake_predictions(2, 32)
    maps = maps - 3.0  # a z-score map: below 0 in places
    maps[1] = 0.0  # and a map of one value, drawn on a scale of 1 (labelled "0..0" before)
    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, *a, **k: (labels.append(text), real(self, text, *a, **k))[1])
    draw_grid(images, recon, maps, scores, ["c", "c"], tmp_path, per_class=2, scale="row")
    want = {f"scale {float(maps[0].min()):.3g}..{float(maps[0].max()):.3g}", "scale 0..1"}
    assert want <= set(labels), labels


def test_classes_whose_figures_would_share_a_file_and_names_that_are_not_utf8(tmp_path):
    """"oil spot" and "oil_spot" both drew oil_spot.png (the second replaced the first); a class
    folder named in Latin-1 ("grün" as the file system gives it) stopped matplotlib's title."""
    images, recon, maps, scores = _fake_predictions(6, 32)
    classes = ["good", "good", "oil spot", "oil_spot", "Oil_Spot", "gr\udcfcn"]
    paths = draw_grid(images, recon, maps, scores, classes, tmp_path, per_class=1)
    assert len({p.name.lower() for p in paths.values()}) == 5 and all(p.is_file() for p in paths.values())
    # a class whose name the file has keeps it, in sorted order; a name made up ("oil spot") comes after
    assert [paths[c].name for c in ("Oil_Spot", "oil spot", "oil_spot")] == [
        "Oil_Spot.png", "oil_spot_3.png", "oil_spot_2.png"]
    from defect_fast.diagnose import figure_names

    # "oil spot" took oil_spot.png, and the class named oil_spot got oil_spot_2.png
    assert figure_names(["oil spot", "oil_spot"]) == {"oil spot": "oil_spot_2.png", "oil_spot": "oil_spot.png"}


def test_diagnose_end_to_end(tmp_path, synthetic_root, capsys):
    from defect_fast.data import load_test_set

    ts = load_test_set(synthetic_root, 64)
    border = region_masks(64, 16, 16, border=4, seam=1)["border"]

    def predict(images):
        n = images.shape[0]
        maps = torch.rand(n, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.1 + border.float()
        return {"maps": maps, "scores": maps.flatten(1).max(1).values, "recon": images.float() / 127.5 - 1}

    res = diagnose(predict, ts, tmp_path / "d", patch=16, per_class=2, border=4, seam=1, top=0.01)
    out = capsys.readouterr().out
    assert "border band 4 px" in out and "100.0 %" in out and "pixel AUROC" in out
    doc = json.loads((tmp_path / "d" / "locations.json").read_text())
    assert doc["locations"]["good"]["share"]["border"] == 1.0
    assert doc["locations"]["area"]["border"] == pytest.approx(1 - (56 / 64) ** 2)
    assert set(doc["figures"]) == set(ts.class_names)
    for name in doc["figures"].values():
        assert (tmp_path / "d" / name).stat().st_size > 1000
    assert res["metrics"] is not None and not math.isnan(res["metrics"]["pixel_auroc"])
    assert "mean brightness" in out and -1 <= doc["locations"]["good"]["score_vs_brightness"] <= 1



def test_rank_correlation_with_brightness_needs_three_images_and_says_its_count(tmp_path, synthetic_root, capsys):
    """Over two defect-free images the rank correlation is +1 or -1 whatever they hold: it was
    printed as "+1.00" beside the others, without a count or whether it meant anything."""
    from dataclasses import replace

    from defect_fast.data import load_test_set
    from defect_fast.diagnose import rank_significant

    full = load_test_set(synthetic_root, 64)

    def predict(images):
        maps = images.float().mean(dim=1)  # the score follows the brightness exactly
        return {"maps": maps, "scores": maps.flatten(1).mean(1), "recon": images.float() / 127.5 - 1}

    good = [i for i, y in enumerate(full.labels.tolist()) if y == 0]
    keep = good[:2] + [i for i, y in enumerate(full.labels.tolist()) if y == 1]
    two = replace(full, images=full.images[keep], masks=full.masks[keep], labels=full.labels[keep],
                  classes=[full.classes[i] for i in keep], paths=[full.paths[i] for i in keep],
                  mask_paths=[full.mask_paths[i] for i in keep], sizes=[full.sizes[i] for i in keep])
    res = diagnose(predict, two, tmp_path / "two", patch=16, per_class=1, border=4, seam=1, top=0.01)
    out = capsys.readouterr().out
    assert "rank correlation of image score with mean brightness n/a (2 images; it needs 3)" in out
    assert math.isnan(res["locations"]["good"]["score_vs_brightness"])
    doc = json.loads((tmp_path / "two" / "locations.json").read_text())
    assert doc["locations"]["good"]["score_vs_brightness"] is None
    assert doc["locations"]["good"]["score_vs_brightness_significant"] is None
    res = diagnose(predict, full, tmp_path / "all", patch=16, per_class=1, border=4, seam=1, top=0.01)
    out = capsys.readouterr().out
    n = len(good)
    rho = res["locations"]["good"]["score_vs_brightness"]
    assert rho == pytest.approx(1.0)
    sig = rank_significant(rho, n)
    assert sig == (n >= 6)  # rho = 1: 2 of the n! orders, p = 2 / n! <= 0.01 from n = 6 on
    assert f"mean brightness +1.00 ({n} images; {'' if sig else 'not '}significant at p <= 0.01 by an exact " \
           "permutation test up to 9 images, Student's t approximation above)" in out
    assert res["locations"]["good"]["score_vs_brightness_significant"] is sig

def test_rank_correlation_takes_tied_values_at_their_average_rank():
    """Ties were ranked by position: identical blank frames agreed with each other perfectly and
    swamped the trend (10 black frames beside 5 parts: -0.40 where Spearman's rho is -0.98)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    score = np.concatenate([rng.uniform(0.1, 0.2, 5), np.full(10, 0.9)])
    brightness = np.concatenate([rng.uniform(100, 120, 5), np.zeros(10)])
    assert rank_correlation(score, brightness) == pytest.approx(spearmanr(score, brightness).statistic)
    assert rank_correlation(score, brightness) < -0.9
    assert rank_correlation([1] * 7 + [2], range(8)) == pytest.approx(spearmanr([1] * 7 + [2], range(8)).statistic)


def test_rank_significance_is_exact_over_a_few_images_and_student_s_t_above():
    """The normal approximation called no set of 7 or fewer images significant: -0.93 over 8 (exact
    p = 0.002) was "not significant"."""
    from scipy.stats import permutation_test, t

    from defect_fast.diagnose import rank_significant

    for n in range(3, 8):
        x = np.arange(n, dtype=float)
        for rho_perm in (x, x[::-1], np.roll(x, 1)):
            rho = rank_correlation(x, rho_perm)
            exact = permutation_test((rho_perm,), lambda b: rank_correlation(x, b), permutation_type="pairings",
                                     n_resamples=np.inf, alternative="two-sided").pvalue  # every order of b: n!
            assert rank_significant(rho, n) == (exact <= 0.01 + 1e-12), (n, rho, exact)
    assert not rank_significant(1.0, 5) and rank_significant(1.0, 6) and rank_significant(-0.93, 8)
    for rho, n in ((0.5, 30), (0.45, 30), (0.3, 100), (0.25, 100)):
        p = 2 * t.sf(rho * np.sqrt((n - 2) / (1 - rho * rho)), n - 2)
        assert rank_significant(rho, n) == (p <= 0.01)
    assert not rank_significant(float("nan"), 20) and not rank_significant(1.0, 2)


def test_rank_significance_of_tied_values_permutes_their_own_ranks():
    """Ties take their average rank: identical blank frames or two lighting levels reach rho values
    the untied orders rarely do, and the untied null called them significant (7 identical frames
    beside 2 parts: rho = 1, exact p = 0.014)."""
    from scipy.stats import permutation_test, rankdata

    from defect_fast.diagnose import rank_significant

    score = np.array([0.9] * 7 + [0.1, 0.2])  # blank frames score high and are dark
    dark = np.array([0.0] * 7 + [120.0, 100.0])
    rho = rank_correlation(score, -dark)
    assert rho == pytest.approx(1.0) and rank_significant(rho, 9) and not rank_significant(rho, 9, (score, -dark))
    for x, y in (([1, 1, 1, 1, 2, 2, 2], [3, 4, 5, 6, 9, 8, 7]), ([5, 5, 1, 1, 1, 2, 3], [7, 6, 1, 2, 3, 4, 5])):
        x, y = np.array(x, float), np.array(y, float)
        rho = rank_correlation(x, y)
        exact = permutation_test((rankdata(y),), lambda b: rank_correlation(rankdata(x), b), permutation_type="pairings",
                                 n_resamples=np.inf, alternative="two-sided").pvalue
        assert rank_significant(rho, 7, (x, y)) == (exact <= 0.01 + 1e-12), (rho, exact)


def test_main_reports_missing_run(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    assert main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"), "--top", "2"]) == 2
    assert "--top" in capsys.readouterr().err
    # a figure's layout time grows with the square of its rows: refused before any work
    assert main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"), "--per-class", "51"]) == 2
    assert "--per-class: must be at most 50" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["map", "score", "score_map"])
def test_nan_maps_or_scores_are_refused_before_any_statistic(tmp_path, synthetic_root, bad):
    """A NaN map was an internal error; a NaN score gave a rank correlation and statistics of NaN."""
    from defect_fast.data import load_test_set
    from defect_fast.runs import RunError

    ts = load_test_set(synthetic_root, 64)

    def predict(images):
        maps = images.float().mean(dim=1) / 255.0
        out = {"maps": maps, "scores": maps.flatten(1).max(1).values, "score_maps": maps.clone(),
               "recon": images.float() / 127.5 - 1}
        {"map": out["maps"], "score": out["scores"], "score_map": out["score_maps"]}[bad].view(-1)[-1] = float("nan")
        return out

    with pytest.raises(RunError, match=rf"NaN or infinite maps or scores for 1 of {len(ts.paths)} test images "
                                       rf"\(the first: .*{ts.paths[-1].name}\)"):
        diagnose(predict, ts, tmp_path / "d", patch=16, per_class=1, border=4, seam=1, top=0.01)
    assert not (tmp_path / "d" / "locations.json").exists()


def test_diagnose_of_defective_images_only_gives_their_pixel_metrics(tmp_path, synthetic_root, capsys):
    import shutil
    import warnings

    from defect_fast.data import load_test_set

    root = tmp_path / "bad_only"
    shutil.copytree(synthetic_root / "ground_truth", root / "ground_truth")
    for d in (synthetic_root / "test").iterdir():
        if d.name != "good":
            shutil.copytree(d, root / "test" / d.name)
    ts = load_test_set(root, 64)

    def predict(images):
        maps = images.float().mean(dim=1) / 255.0
        return {"maps": maps, "scores": maps.flatten(1).max(1).values, "recon": images.float() / 127.5 - 1}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image AUROC is undefined without good images (nan, with a warning)
        res = diagnose(predict, ts, tmp_path / "d", patch=16, per_class=1, border=4, seam=1, top=0.01)
    assert res["metrics"] is not None and 0 <= res["metrics"]["pixel_auroc"] <= 1 and 0 <= res["metrics"]["aupro"] <= 1
    assert math.isnan(res["metrics"]["image_auroc"]) and "pixel AUROC" in capsys.readouterr().out


def test_diagnose_without_masks_gives_the_image_metrics_and_a_refused_overwrite_keeps_its_output(
        tmp_path, synthetic_root, capsys):
    """Without ground_truth/ the image AUROC was left out (evaluate gives it from the folder
    labels), and the table's n/a pixel metrics were not explained; an --overwrite refused for a user's file at a figure's name had cleared the earlier
    diagnosis first."""
    import shutil

    from defect_fast.data import load_test_set

    root = tmp_path / "labels_only"
    shutil.copytree(synthetic_root / "test", root / "test")
    ts = load_test_set(root, 64, require_masks=False)

    def predict(images):
        maps = images.float().mean(dim=1) / 255.0
        return {"maps": maps, "scores": maps.flatten(1).max(1).values, "recon": images.float() / 127.5 - 1}

    res = diagnose(predict, ts, tmp_path / "d", patch=16, per_class=1, border=4, seam=1, top=0.01)
    # the table's n/a pixel metrics are explained, as evaluate explains them
    assert "pixel metrics: none: the test set has no ground_truth/ folder" in capsys.readouterr().out
    from defect_fast.cli import main as cli_main
    from defect_fast.metrics import image_auroc

    want = image_auroc(predict(ts.images)["scores"], ts.labels)
    assert res["metrics"]["image_auroc"] == pytest.approx(want) and res["metrics"]["pixel_auroc"] is None
    assert "none: the test set has no ground_truth/ folder" in res["metrics"]["pixel_metrics"]
    assert set(res["metrics"]["per_class"]) == {c for c, y in zip(ts.classes, ts.labels.tolist()) if y == 1}
    tiny_run = tmp_path / "run"
    assert cli_main(["train", str(synthetic_root), "--out", str(tiny_run), "--image-size", "64", "--batch-size", "8",
                     "--max-steps", "1", "--set", "memory_size=10", "--quiet"]) == 0
    out = tmp_path / "o"
    assert main([str(tiny_run), str(synthetic_root), "--out", str(out), "--device", "cpu"]) == 0
    kept = (out / "locations.json").read_bytes()
    figure = sorted(p for p in out.glob("*.png"))[0]
    import defect_fast.safety as safety

    manifest = json.loads((out / safety.MANIFEST_NAME).read_text())
    manifest["files"] = [f for f in manifest["files"] if f != figure.name]  # the user's file now
    (out / safety.MANIFEST_NAME).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([str(tiny_run), str(synthetic_root), "--out", str(out), "--device", "cpu", "--overwrite"]) == 2
    assert "exists and was not written by defect-fast" in capsys.readouterr().err
    assert (out / "locations.json").read_bytes() == kept and figure.exists()
    # Ctrl-C while the figures are drawn: the folder it had made goes (it kept its manifest and lock)
    import defect_fast.diagnose as diagnose_module

    def interrupted(*args, **kwargs):
        (args[2] / "locations.json").write_text("{}")
        raise KeyboardInterrupt

    real = diagnose_module.diagnose
    diagnose_module.diagnose = interrupted
    try:
        assert main([str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "cut"), "--device", "cpu"]) != 0
    finally:
        diagnose_module.diagnose = real
    assert not (tmp_path / "cut").exists()


def test_rank_correlation_of_a_constant_sequence_is_nan():
    """A constant sequence has no rank order to correlate (ranked by position, it got ranks 0..N-1
    and a correlation it does not have)."""
    assert math.isnan(rank_correlation([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(rank_correlation([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))


def test_the_rows_shown_are_the_highest_then_the_lowest_scores():
    """An odd number of rows: one more of the highest scores, and the lowest still shown."""
    from defect_fast.diagnose import _pick_rows

    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])
    members = np.array([0, 1, 2, 3, 4])
    assert _pick_rows(scores, members, 3) == [1, 3, 2]
    assert _pick_rows(scores, members, 4) == [1, 3, 4, 2]
    assert _pick_rows(scores, members, 9) == [1, 3, 0, 4, 2]


def test_diagnose_takes_the_map_options_evaluate_and_predict_take(tmp_path, synthetic_root):
    """diagnose took --stride and --blend but not --map or --smooth: the maps evaluate scored with
    them could not be drawn; its locations.json now names the map, smoothing and blend it describes."""
    from defect_fast.cli import main as cli_main
    from defect_fast.data import load_test_set
    from defect_fast.detect import Detector

    run = tmp_path / "run"
    assert cli_main(["train", str(synthetic_root), "--out", str(run), "--image-size", "64", "--batch-size", "8",
                     "--max-steps", "1", "--set", "memory_size=10", "--quiet"]) == 0
    docs = {}
    for name, extra in (("default", []), ("asked", ["--map", "residual", "--smooth", "2", "--blend", "hann"])):
        assert main([str(run), str(synthetic_root), "--out", str(tmp_path / name), "--device", "cpu", *extra]) == 0
        docs[name] = json.loads((tmp_path / name / "locations.json").read_text())
    det = Detector.load(run, device="cpu")
    assert {k: docs["default"]["locations"]["settings"][k] for k in ("map", "smooth_sigma", "blend")} == \
        {"map": det.map_kind, "smooth_sigma": det.smooth_sigma, "blend": det.blend}
    assert {k: docs["asked"]["locations"]["settings"][k] for k in ("map", "smooth_sigma", "blend")} == \
        {"map": "residual", "smooth_sigma": 2.0, "blend": "hann"}
    asked = Detector.load(run, device="cpu", map_kind="residual", smooth_sigma=2.0, blend="hann")
    want = asked.predict_batched(load_test_set(synthetic_root, 64, require_masks=False).images)["scores"]
    assert docs["asked"]["scores"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    assert docs["asked"]["scores"] != pytest.approx(docs["default"]["scores"], rel=1e-3)


def test_each_row_names_its_image_file(tmp_path, monkeypatch):
    """A row said only "#37": which photograph that was took a look into locations.json. It now
    gives the file's name, shortened in the middle (its start and its extension kept) when long."""
    from matplotlib.axes import Axes

    images, recon, maps, scores = _fake_predictions(2, 32)
    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, *a, **k: (labels.append(text), real(self, text, *a, **k))[1])
    long = "line3_camera2_2026-12-01T08-15-42.123_part-000481.png"
    draw_grid(images, recon, maps, scores, ["c", "c"], tmp_path, per_class=2, names=["007.png", long])
    titles = [t for t in labels if "score" in t]
    assert any(t.startswith("#0 007.png\nscore ") for t in titles), titles
    title = next(t for t in titles if t.startswith("#1 "))
    shown = title.split("\n")[0][3:]
    assert len(shown) == 28 and shown.startswith("line3_camera") and shown.endswith("000481.png") and "\u2026" in shown
    with pytest.raises(ValueError, match="2 images but 1 names"):
        draw_grid(images, recon, maps, scores, ["c", "c"], tmp_path, names=["one"])
    # dollar signs are drawn as themselves: matplotlib read them as mathematics, and "x_$^$.png" failed
    # the figure after all the inference
    labels.clear()
    paths = draw_grid(images, recon, maps, scores, ["a$b$", "a$b$"], tmp_path / "math", per_class=2,
                      names=["x_$^$.png", "price$5$.png"])
    assert [p.exists() for p in paths.values()] == [True]
    assert {"#0 x_\\$^\\$.png", "#1 price\\$5\\$.png"} <= {t.split("\n")[0] for t in labels}, labels
