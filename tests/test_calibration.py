"""Thresholds from held-back images: known answers on synthetic scores."""
import math
import warnings

import numpy as np
import pytest
import torch

from defect_fast.calibration import (
    CalibrationError,
    CalibrationWarning,
    ModelInfo,
    calibrate,
    colour_scale,
    defect_regions,
    evaluate_thresholds,
    f1_optimal_threshold,
    image_threshold,
    min_images_for,
    operating_points,
    pixel_threshold,
    rates_at,
    scored_images,
    scores_named,
    short_names,
    split_holdback,
    stored_thresholds,
    threshold_at_far,
)


def test_min_images_for_rates():
    assert min_images_for(0.01) == 99
    assert min_images_for(0.05) == 19
    assert min_images_for(0.1) == 9
    assert min_images_for(0.3) == 3
    with pytest.raises(ValueError, match="far"):
        min_images_for(0.0)
    assert min_images_for(1e-300) > 10**299
    # below the smallest normal float 1/far overflows: refused, where it was an OverflowError
    with pytest.raises(ValueError, match="far must be at least 2.23e-308"):
        min_images_for(1e-320)


def test_a_rate_within_rounding_of_one_takes_the_smallest_score():
    """k = floor(far (n+1)) with its rounding allowance stays at most n: a far a hair below 1 was
    rank n+1, an IndexError in the image and the pixel threshold."""
    it = image_threshold(np.arange(4.0), 1 - 1e-10)
    assert (it.rank, it.threshold) == (4, 0.0)
    pt = pixel_threshold(np.arange(4.0).reshape(1, 2, 2), 1 - 1e-10)
    assert (pt.rank, pt.threshold) == (4, 0.0)


@pytest.mark.parametrize("n,far,k", [(99, 0.01, 1), (199, 0.01, 2), (250, 0.01, 2), (100, 0.05, 5), (19, 0.05, 1)])
def test_image_threshold_is_kth_largest(n, far, k):
    rng = np.random.default_rng(n)
    scores = rng.permutation(np.arange(1, n + 1, dtype=np.float64))  # 1..n, shuffled
    t = image_threshold(scores, far)
    assert t.rank == k
    assert t.threshold == n - k + 1  # k-th largest of 1..n
    assert t.far_expected == pytest.approx(k / (n + 1))
    assert t.far_expected <= far + 1e-12
    assert t.n_images == n and t.sufficient
    assert (scores > t.threshold).sum() == k - 1  # held-back images flagged by it


def test_image_threshold_expected_far_holds_on_fresh_images():
    # exchangeable scores: averaged over many calibrations, the FAR on new images is k/(n+1)
    rng = np.random.default_rng(0)
    n, far, trials = 99, 0.02, 4000
    cal = rng.normal(size=(trials, n))
    new = rng.normal(size=trials)
    k = 2
    thr = -np.sort(-cal, axis=1)[:, k - 1]
    assert image_threshold(cal[0], far).threshold == thr[0]
    rate = float((new > thr).mean())
    assert abs(rate - k / (n + 1)) < 0.008  # 3 sigma of a binomial(4000, 0.02)


def test_warnings_whose_text_names_counts_or_files_are_kept_in_no_registry(tmp_path):
    """The default warning filter keeps every distinct text in the calling module's registry for the
    life of the process: a service calibrating on a growing number of images, or loading model files
    of many names measured in another precision, grew it by every call."""
    import subprocess
    import sys

    script = (
        "import sys, pathlib, warnings, shutil, numpy as np\n"
        "warnings.simplefilter('default')\n"
        "from defect_fast.calibration import image_threshold\n"
        "from defect_fast.detect import Detector\n"
        "from defect_fast.models import build_model\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "for n in range(2, 32):\n"
        "    image_threshold(np.linspace(0, 1, n), 0.01)\n"
        "det = Detector(build_model('cmaae', memory_size=10), image_size=64, precision='float32')\n"
        "det.calibration = {'image_threshold': 0.5, 'precision': 'bfloat16', 'n_images': 3}\n"
        "det.save(d / 'm0.pt')\n"
        "for i in range(1, 20):\n"
        "    shutil.copy(d / 'm0.pt', d / f'm{i}.pt')\n"
        "for i in range(20):\n"
        "    Detector.load(d / f'm{i}.pt', device='cpu', precision='float32')\n"
        "grown = {name: len(m.__dict__.get('__warningregistry__', {})) for name, m in list(sys.modules.items())\n"
        "         if isinstance(getattr(m, '__dict__', None), dict)}\n"
        "print(max(grown.values()))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) <= 2, run.stdout  # a version stamp and another library's odd warning
    assert run.stderr.count("using the largest") == 30 and run.stderr.count("thresholds were measured in bfloat16") == 20


def test_too_few_images_says_so():
    scores = np.linspace(0, 1, 16)
    with pytest.raises(CalibrationError, match=r"far=0.01 needs at least 99 .* only 16 .* 1/17"):
        image_threshold(scores, 0.01, fallback=False)
    with pytest.raises(CalibrationError) as info:  # a count of 300 digits was printed whole
        image_threshold(scores, 1e-300, fallback=False)
    assert "needs at least about 1e+300 held-back" in str(info.value) and len(str(info.value)) < 250
    with pytest.warns(CalibrationWarning, match="using the largest"):
        t = image_threshold(scores, 0.01)
    assert not t.sufficient
    assert t.threshold == 1.0
    assert t.far_expected == pytest.approx(1 / 17)
    assert t.n_needed == 99 and t.n_images == 16


@pytest.mark.parametrize("n", [16, 120, 999])
def test_the_lowest_rate_a_refusal_names_is_one_the_images_allow(n):
    """1/17 = 0.0588235... was printed 0.05882, rounded down: given back, it was refused again."""
    import re

    with pytest.raises(CalibrationError) as info:
        image_threshold(np.linspace(0, 1, n), 1e-6, fallback=False)
    named = float(re.search(rf"1/{n + 1} = ([0-9.e-]+)", str(info.value)).group(1))
    assert image_threshold(np.linspace(0, 1, n), named, fallback=False).sufficient
    with pytest.raises(CalibrationError, match="no held-back"):
        image_threshold([], 0.01)


def test_far_upper_bound():
    t = image_threshold(np.arange(99.0), 0.01)
    # Beta(1, 99): P(F <= x) = 1 - (1 - x)^99 = 0.95
    assert t.far_upper95 == pytest.approx(1 - 0.05 ** (1 / 99), rel=1e-6)
    # and the note every command prints says it (a line engineer read "expected 1 %" alone)
    assert t.note.endswith("(95 % upper bound 0.0298)")
    with pytest.warns(CalibrationWarning, match=r"95 % upper bound of its rate 0\.0487"):
        image_threshold(np.arange(60.0), 0.01)  # too few for 1 %: the largest score, whose bound is Beta(1, 60)'s


def test_pixel_threshold_quantile():
    maps = torch.arange(10 * 10 * 10, dtype=torch.float32).reshape(10, 10, 10)  # values 0..999
    p = pixel_threshold(maps, 0.01)
    assert p.rank == 10 and p.threshold == 990.0
    assert int((maps > p.threshold).sum()) == 9
    assert p.n_pixels == 1000 and p.n_images == 10 and p.sufficient
    big = torch.randn(3, 200, 200)  # m = 120000 -> k = 120 (topk)
    p2 = pixel_threshold(big, 0.001)
    assert p2.rank == 120
    assert p2.threshold == float(big.flatten().sort(descending=True).values[119])
    p3 = pixel_threshold(big, 0.05)  # k = 6000, above topk's 4096: kthvalue
    assert p3.rank == 6000
    assert p3.threshold == float(big.flatten().sort(descending=True).values[5999])
    small = pixel_threshold(torch.ones(1, 2, 2) * torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.001)
    assert not small.sufficient and small.threshold == 4.0


def test_calibrate_dict_and_stored_thresholds():
    scores = np.arange(1, 200, dtype=np.float64)  # n = 199
    maps = torch.zeros(4, 8, 8)
    maps[0, 0, 0] = 5.0
    cal = calibrate(scores, maps, far=0.01, pixel_far=0.01)
    assert cal["image_threshold"] == 198.0 and cal["rank"] == 2 and cal["n_images"] == 199
    assert cal["pixel_threshold"] == 0.0  # 2nd largest of 256 pixels
    assert cal["score_max"] == 199.0
    assert stored_thresholds(cal)[:2] == (198.0, 0.0)
    old = {"score_max": 3.0, "pixel_q999": 0.5}
    t, p, note = stored_thresholds(old)
    assert (t, p) == (3.0, 0.5) and "older model file" in note
    assert stored_thresholds(None)[0] is None
    info = ModelInfo.from_calibration(64, "ae-l2", "abc", cal, threshold=7.5)
    assert info.image_threshold == 7.5 and info.pixel_threshold == 0.0
    # the image whose score the stored threshold is goes with the stored threshold only
    named = {**cal, "threshold_image": "good/017.png"}
    assert ModelInfo.from_calibration(64, "ae-l2", "abc", named).extra["threshold_image"] == "good/017.png"
    assert "threshold_image" not in ModelInfo.from_calibration(64, "ae-l2", "abc", named, threshold=7.5).extra
    assert ModelInfo(64, pixel_threshold=0.25).scale() == 0.5 and ModelInfo(64).scale() == 0.0


def test_calibrate_takes_numpy_and_torch_numbers_and_stores_plain_ones(tmp_path):
    """Rates as numpy scalars are stored as Python floats (a numpy scalar in a model file makes
    it unloadable with weights_only=True); bfloat16 scores are read; a bool is no rate."""
    scores = torch.arange(1, 200, dtype=torch.bfloat16)
    cal = calibrate(scores, far=np.float64(0.05), pixel_far=np.float32(0.25))
    assert type(cal["far"]) is float and cal["far"] == 0.05 and type(cal["pixel_far"]) is float
    assert cal["n_images"] == 199 and cal["image_threshold"] == float(torch.sort(scores).values[-10])
    torch.save({"calibration": cal}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["calibration"]["far"] == 0.05
    assert f1_optimal_threshold(scores[:4], torch.tensor([0, 0, 1, 1], dtype=torch.bfloat16))["f1"] == 1.0
    for bad in (True, "0.1", 1.5):
        with pytest.raises(ValueError, match="far must be a number in"):
            calibrate(scores, far=bad)


def test_calibrate_names_the_image_whose_score_is_the_threshold():
    scores = [0.5, 7.6, 4.9, 7.6, 1.0, 3.3]  # n = 6: the largest score (a tie: the first of the two)
    names = [f"img{i}.png" for i in range(6)]
    warnings.simplefilter("ignore", CalibrationWarning)  # too few for 1 %: said and tested elsewhere
    cal = calibrate(scores, far=0.01, names=names)
    assert cal["image_threshold"] == 7.6 and cal["threshold_image"] == "img1.png"
    assert cal["highest_scores"] == [["img1.png", 7.6], ["img3.png", 7.6], ["img2.png", 4.9], ["img5.png", 3.3],
                                     ["img4.png", 1.0]]
    many = np.arange(199, 0, -1, dtype=np.float64)  # n = 199, far 0.01: the 2nd largest
    cal = calibrate(many, far=0.01, names=[f"n{i}" for i in range(199)])
    assert cal["image_threshold"] == 198.0 and cal["threshold_image"] == "n1"
    assert "threshold_image" not in calibrate(scores, far=0.01)
    with pytest.raises(ValueError, match="6 held-back scores but 5 names"):
        calibrate(scores, far=0.01, names=names[:5])
    labels = np.array([0, 1])
    th = evaluate_thresholds(np.array([1.0, 9.0]), labels, calibrate(scores, far=0.01, names=names))
    assert th["threshold_image"] == "img1.png"
    assert evaluate_thresholds(np.array([1.0, 9.0]), labels, calibrate(scores, far=0.01, names=names),
                               threshold=2.0)["threshold_image"] is None  # not the stored threshold


def _brute_f1(scores, labels):
    best = (-1.0, None)
    for t in sorted(set(scores) | {min(scores) - 1}, reverse=True):
        flag = scores > t
        tp = int((flag & labels).sum())
        fp = int((flag & ~labels).sum())
        f1 = 2 * tp / (2 * tp + fp + int((~flag & labels).sum()))
        if f1 > best[0] + 1e-15:
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.normal(size=40) + 1.2 * labels, 1)  # rounding makes ties
    res = f1_optimal_threshold(scores, labels.astype(int))
    f1, _ = _brute_f1(scores, labels)
    assert res["f1"] == pytest.approx(f1)
    flag = scores > res["threshold"]
    tp = int((flag & labels).sum())
    assert res["recall"] == pytest.approx(tp / labels.sum())
    assert res["precision"] == pytest.approx(tp / flag.sum())
    assert 2 * tp / (flag.sum() + labels.sum()) == pytest.approx(f1)


def test_f1_known_answer_and_flag_all():
    res = f1_optimal_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert res["f1"] == 1.0 and 0.2 <= res["threshold"] < 0.8
    all_bad = f1_optimal_threshold([0.5, 0.3], [1, 1])
    assert all_bad["f1"] == 1.0 and all_bad["threshold"] < 0.3
    # flagging every image still does when the scores are compared in float32 (a torch tensor):
    # a float64 step below the smallest score rounded back onto it
    scores = torch.tensor([0.7, 0.3, 0.5], dtype=torch.float32)
    every = f1_optimal_threshold(scores, [1, 1, 1])
    assert bool((scores > every["threshold"]).all()) and every["f1"] == 1.0
    assert (scores.double() > every["threshold"]).all()
    assert math.isnan(f1_optimal_threshold([0.5, 0.3], [0, 0])["f1"])


def test_rates_at():
    r = rates_at([0.1, 0.5, 0.6, 0.2, 0.9, 0.4], [0, 0, 0, 1, 1, 1], 0.45)
    assert r["false_alarms"] == 2 and r["false_alarm_rate"] == pytest.approx(2 / 3)
    assert r["misses"] == 2 and r["miss_rate"] == pytest.approx(2 / 3)
    # equal to the threshold passes
    assert rates_at([0.45], [0], 0.45)["false_alarms"] == 0
    assert math.isnan(rates_at([0.1], [0], 0.5)["miss_rate"])
    with pytest.raises(ValueError, match="labels"):
        rates_at([0.1, 0.2], [0, 2], 0.5)


def test_defect_regions():
    m = torch.zeros(10, 12)
    m[1:3, 2:5] = 2.0  # 6 px, peak 2
    m[7, 9] = 5.0  # 1 px
    m[8, 10] = 4.0  # diagonal neighbour: same region
    regs = defect_regions(m, 1.0)
    assert len(regs) == 2
    assert regs[0] == {"x0": 9, "y0": 7, "x1": 10, "y1": 8, "area": 2, "peak": 5.0, "mean": 4.5}
    assert regs[1]["area"] == 6 and (regs[1]["x0"], regs[1]["x1"], regs[1]["y0"], regs[1]["y1"]) == (2, 4, 1, 2)
    assert len(defect_regions(m, 1.0, min_area=3)) == 1
    assert defect_regions(m, 10.0) == []


def test_split_holdback_deterministic():
    items = [f"img_{i:03d}.png" for i in range(50)]
    train, held = split_holdback(items, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert set(train) | set(held) == set(items) and not set(train) & set(held)
    train2, held2 = split_holdback(list(reversed(items)), 0.1, seed=3)
    assert set(held2) == set(held)  # input order does not matter
    assert held != split_holdback(items, 0.1, seed=4)[1]
    assert len(split_holdback(items[:10], 0.1, min_count=4)[1]) == 4  # at least min_count
    assert split_holdback(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="cannot hold back"):
        split_holdback(items[:4], 0.1, min_count=4)
    with pytest.raises(ValueError, match="duplicates"):
        split_holdback(["a", "a", "b"], 0.5, min_count=1)


def test_no_warning_when_enough():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_threshold(np.arange(100.0), 0.01)


def test_evaluate_thresholds_reports_far_next_to_the_asked_rate():
    held = np.arange(1, 100, dtype=np.float64)  # n = 99 -> threshold 99 at far 0.01
    cal = calibrate(held, far=0.01)
    scores = np.array([50.0, 99.5, 120.0, 98.0, 130.0, 140.0, 10.0])
    labels = np.array([0, 1, 0, 0, 1, 1, 1])
    ev = evaluate_thresholds(scores, labels, cal)
    assert ev["far_asked"] == 0.01 and ev["n_calibration_images"] == 99
    assert ev["at_threshold"]["threshold"] == 99.0
    assert ev["at_threshold"]["false_alarms"] == 1 and ev["at_threshold"]["false_alarm_rate"] == pytest.approx(1 / 3)
    assert ev["at_threshold"]["misses"] == 1
    assert ev["f1_optimal"]["f1"] == pytest.approx(2 * 3 / (4 + 4))
    given = evaluate_thresholds(scores, labels, cal, threshold=200.0)
    assert given["at_threshold"]["miss_rate"] == 1.0
    # a threshold given by hand was asked no rate: the stored threshold's are not put beside it
    assert given["far_asked"] is None and given["far_expected"] is None
    assert given["threshold_source"] == "given on the command line"
    assert evaluate_thresholds(scores, labels, None)["at_threshold"] is None


def test_model_info_from_detector_reads_the_model_file(tmp_path):
    import hashlib
    from types import SimpleNamespace

    path = tmp_path / "model.pt"
    path.write_bytes(b"weights of some model")
    cal = calibrate(torch.arange(99, dtype=torch.float32), far=0.01)
    det = SimpleNamespace(image_size=128, map_kind="msfr", calibration=cal, model=SimpleNamespace(name="cmaae"))
    info = ModelInfo.from_detector(det, path)
    assert info.version == hashlib.sha256(b"weights of some model").hexdigest()[:12]
    assert (info.name, info.image_size, info.image_threshold) == ("cmaae", 128, 98.0)
    assert info.extra["far"] == 0.01 and info.extra["map"] == "msfr" and "held-back" in info.extra["threshold_source"]
    given = ModelInfo.from_detector(det, path, threshold=3.0)
    assert given.image_threshold == 3.0 and given.extra.get("far") is None  # no rate was asked of a given threshold
    # a run whose thresholds came from its training images (--holdback 0): report's --far table
    # reads "source" to list no rate (the held-back keys without it listed rates from training scores)
    cal0 = {**calibrate(torch.rand(40, generator=torch.Generator().manual_seed(0)), far=0.05),
            "source": "training images"}
    info0 = ModelInfo.from_detector(SimpleNamespace(**{**vars(det), "calibration": cal0}), path)
    assert operating_points(np.random.rand(20), np.r_[np.zeros(10), np.ones(10)], info0.extra["held_back"]) == []
    assert operating_points(np.random.rand(20), np.r_[np.zeros(10), np.ones(10)], {**cal0, "source": "held-back"})
    old = SimpleNamespace(**{**vars(det), "calibration": {"score_max": 2.0, "pixel_q999": 0.5}})
    info = ModelInfo.from_detector(old, path)
    assert (info.image_threshold, info.pixel_threshold) == (2.0, 0.5) and "older model file" in info.extra["threshold_source"]


def test_a_threshold_for_another_rate_is_set_after_training_from_the_stored_scores():
    """Every held-back score is stored, highest first; --far picks the k-th largest by the same
    rule as at training, names its image when it is among the named ones, and refuses a rate the
    images cannot give."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1, 60)
    names = [f"good/{i:03d}.png" for i in range(60)]
    warnings.simplefilter("ignore", CalibrationWarning)  # 60 images are too few for 1 %: the fallback
    cal = calibrate(scores, far=0.01, names=names)
    desc = np.sort(scores)[::-1]
    assert cal["held_back_scores"] == pytest.approx(desc.tolist()) and cal["image_threshold"] == desc[0]
    it, name = threshold_at_far(cal, 0.05)  # k = floor(0.05 * 61) = 3
    assert (it.threshold, it.rank, it.far_expected) == (desc[2], 3, pytest.approx(3 / 61))
    assert name == names[int(np.argsort(-scores)[2])] and "far 0.05" in it.note
    assert threshold_at_far(cal, 0.1)[0].threshold == desc[5]  # the 6th: beyond the named five
    assert threshold_at_far(cal, 0.1)[1] is None
    with pytest.raises(CalibrationError, match=r"far=0.01 needs at least 99 .* only 60"):
        threshold_at_far(cal, 0.01)
    assert stored_thresholds(cal, far=0.05)[0] == desc[2]
    info = ModelInfo.from_calibration(64, "ae-l2", "abc", cal, far=0.05)
    assert info.image_threshold == desc[2] and info.extra["far"] == 0.05 and info.extra["threshold_image"] == name
    with pytest.raises(ValueError, match="not both"):
        ModelInfo.from_calibration(64, "ae-l2", "abc", cal, threshold=1.0, far=0.05)
    labels = np.r_[np.zeros(30), np.ones(30)].astype(int)
    test = np.r_[rng.normal(0, 1, 30), rng.normal(3, 1, 30)]
    ev = evaluate_thresholds(test, labels, cal, far=0.05)
    assert ev["at_threshold"] == rates_at(test, labels, desc[2])
    assert (ev["far_asked"], ev["far_expected"], ev["threshold_image"]) == (0.05, pytest.approx(3 / 61), name)
    # what the images of those scores are, as the note says them: training's held back, calibrate's given
    assert ev["threshold_images"] == info.extra["threshold_images"] == "held-back"
    given = {**cal, "images": "calibration"}
    assert evaluate_thresholds(test, labels, given, far=0.05)["threshold_images"] == "calibration"
    assert ModelInfo.from_calibration(64, "ae-l2", "abc", given, far=0.05).extra["threshold_images"] == "calibration"
    assert scored_images({"calibrated_from": "run"}) == "calibration" and scored_images(None) == "held-back"
    # a run that held none back (--holdback 0) set them on training images: evaluate said "held-back"
    trained = {**cal, "source": "training images"}
    assert evaluate_thresholds(test, labels, trained)["threshold_images"] == "training"


def test_older_model_files_give_the_rates_their_named_scores_reach():
    """A file written before every score was stored keeps the five highest: rates whose rank is
    among them work, others are refused with what the file allows; thresholds set aside (other
    inference settings) give none."""
    highest = [["a.png", 9.0], ["b.png", 8.0], ["c.png", 7.0], ["d.png", 6.0], ["e.png", 5.0]]
    old = {"image_threshold": 9.0, "n_images": 60, "highest_scores": highest, "threshold_image": "a.png"}
    it, name = threshold_at_far(old, 0.05)
    assert (it.threshold, it.rank, name) == (7.0, 3, "c.png")
    with pytest.raises(CalibrationError, match=r"6th largest of 60 .* 5 highest only, enough for rates below 0.09836"):
        threshold_at_far(old, 0.1)
    with pytest.raises(CalibrationError, match="stores no held-back scores"):
        threshold_at_far({"score_max": 3.0}, 0.05)
    with pytest.raises(CalibrationError, match="were set on other settings"):
        threshold_at_far({"inapplicable": "set on other settings"}, 0.05)


def test_a_run_that_held_back_nothing_sets_no_threshold_for_a_rate():
    """--holdback 0 keeps its training images' scores where held-back scores go, labelled as such:
    --far took them for held-back scores and presented an optimistic threshold as a calibrated rate."""
    warnings.simplefilter("ignore", CalibrationWarning)
    cal = calibrate(np.linspace(0, 1, 16), far=0.01)
    assert threshold_at_far(cal, 0.2)[0].rank == 3  # from held-back images: the 3rd largest of 16
    cal["source"] = "training images"  # what train writes when nothing was held back
    with pytest.raises(CalibrationError, match="held back no images.*defect-fast calibrate"):
        threshold_at_far(cal, 0.2)
    labels = np.r_[np.zeros(5), np.ones(5)].astype(int)
    assert operating_points(np.linspace(0, 2, 10), labels, cal) == []


def test_operating_points_list_what_each_far_would_give():
    """One row per held-back rank up to an expected rate of 0.1: the --far printed picks that
    rank, and its rates are those at the rank's score; older files list their named scores."""
    from defect_fast.cli import _print_thresholds

    rng = np.random.default_rng(1)
    warnings.simplefilter("ignore", CalibrationWarning)
    cal = calibrate(rng.normal(0, 1, 60), far=0.01)
    labels = np.r_[np.zeros(50), np.ones(50)].astype(int)
    test = np.r_[rng.normal(0, 1, 50), rng.normal(2, 1, 50)]
    points = operating_points(test, labels, cal)
    assert [p["rank"] for p in points] == [1, 2, 3, 4, 5, 6]  # 6 / 61 <= 0.1 < 7 / 61
    for p in points:
        assert threshold_at_far(cal, p["far"])[0].rank == p["rank"] and p["far"] >= p["far_expected"]
        assert p["threshold"] == cal["held_back_scores"][p["rank"] - 1]
        assert p["misses"] == rates_at(test, labels, p["threshold"])["misses"]
    assert [p["misses"] for p in points] == sorted((p["misses"] for p in points), reverse=True)  # lower ones miss fewer
    ev = evaluate_thresholds(test, labels, cal)
    assert ev["operating_points"] == points
    import io
    buf = io.StringIO()
    _print_thresholds(ev, buf)
    lines = buf.getvalue().splitlines()
    row = lines[lines.index(next(x for x in lines if x.startswith("thresholds --far can set"))) + 2].split()
    assert row[:2] == [f"{points[0]['far']:.4g}", "1"] and row[3] == f"{points[0]['false_alarms']}/50"
    old = {"n_images": 60, "highest_scores": [["a", 3.0], ["b", 2.0], ["c", 1.0]]}
    assert [p["threshold"] for p in operating_points(test, labels, old)] == [3.0, 2.0, 1.0]
    assert operating_points(test, labels, {"inapplicable": "x"}) == [] and operating_points(test, labels, None) == []


def test_colour_scale_is_the_999th_percentile_exact_for_small_sets_and_estimated_for_large_ones():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(3, 40, 50, generator=g, dtype=torch.float64).to(torch.bfloat16)
    assert colour_scale(small) == pytest.approx(float(np.quantile(small.float().numpy(), 0.999)), rel=0, abs=1e-7)
    # more values than torch.quantile takes (2**24): a sample of them, close to the percentile
    big = torch.arange(17_000_000, dtype=torch.float32).view(17, 1000, 1000) / 17_000_000
    assert colour_scale(big) == pytest.approx(0.999, abs=1e-3)


def test_a_run_with_few_held_back_images_still_lists_its_one_operating_point():
    """With 5 held-back scores no rank reaches the table's rates (floor(0.1 x 6) = 0); rank 1, the
    threshold such a run stores, is still listed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibrate(np.arange(5.0), far=0.01)
    points = operating_points(np.array([0.0, 5.0]), np.array([0, 1]), cal)
    assert [(p["rank"], p["threshold"]) for p in points] == [(1, 4.0)]


def test_score_std_is_the_sample_standard_deviation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibrate([0.0, 2.0], far=0.5)
    assert cal["score_std"] == pytest.approx(math.sqrt(2.0))


def test_an_older_model_file_reaches_the_rate_of_its_lowest_named_score():
    """The five highest scores an older file keeps serve every rank up to the fifth: the rate
    whose rank is exactly 5 is set from the fifth score, naming its image."""
    highest = [["a.png", 9.0], ["b.png", 8.0], ["c.png", 7.0], ["d.png", 6.0], ["e.png", 5.0]]
    old = {"image_threshold": 9.0, "n_images": 99, "highest_scores": highest, "threshold_image": "a.png"}
    it, name = threshold_at_far(old, 0.05)  # k = floor(0.05 * 100) = 5
    assert (it.threshold, it.rank, name) == (5.0, 5, "e.png")
    assert it.far_expected == pytest.approx(0.05)


def test_the_note_names_the_images_its_scores_are_of():
    """A run's thresholds rest on its held-back images; a calibrate output's on the images it was
    given, which its notes called held-back too."""
    scores = [float(v) for v in range(1, 100)]
    run = calibrate(scores, far=0.05)
    assert "largest of 99 held-back scores" in run["note"]
    given = calibrate(scores, far=0.05, images="calibration")
    assert "largest of 99 calibration scores" in given["note"]
    assert "of 99 held-back scores" in threshold_at_far(run, 0.02)[0].note
    assert "of 99 calibration scores" in threshold_at_far(given, 0.02)[0].note  # Detector.calibrate's, saved
    older = {k: v for k, v in given.items() if k != "images"}  # a calibrate output from before the record
    assert "of 99 calibration scores" in threshold_at_far({**older, "calibrated_from": {"run": "r"}}, 0.02)[0].note
    assert "of 99 held-back scores" in threshold_at_far(older, 0.02)[0].note
    with pytest.warns(CalibrationWarning, match="needs at least 99 calibration defect-free images"):
        image_threshold(scores[:5], 0.01, images="calibration")
    with pytest.raises(ValueError, match="calibration scores contain NaN"):
        calibrate(scores[:4] + [float("nan")], images="calibration")
    with pytest.raises(ValueError, match="held-back scores contain NaN"):
        calibrate(scores[:4] + [float("nan")])


def test_highest_scores_name_images_by_as_much_of_their_path_as_tells_them_apart():
    """calibrate's line of highest scores printed "007.png" twice (one of test/good, one of train/good)."""
    names = ["/d/test/good/007.png", "/d/train/good/007.png", "/d/train/good/008.png", "/d/x.png"]
    assert short_names(names) == ["test/good/007.png", "train/good/007.png", "008.png", "x.png"]
    assert short_names(["/a/b.png", "/a/b.png"]) == ["/a/b.png", "/a/b.png"] and short_names([]) == []
    assert scores_named(list(zip(names, [0.5, 0.25, 1 / 3, 2.0]))) == \
        "0.5 (test/good/007.png), 0.25 (train/good/007.png), 0.3333 (008.png), 2 (x.png)"
