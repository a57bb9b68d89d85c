"""The HTML report: self-contained, the expected sections, rendered by headless Chromium."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast.calibration import ModelInfo
from defect_fast.report import report_from_data, write_report

ROOT = Path(__file__).resolve().parents[1]
S = 64


def make_set(n_good=6, n_bad=6, seed=0):
    """Textured images; defective ones carry a bright square (the mask)."""
    g = torch.Generator().manual_seed(seed)
    n = n_good + n_bad
    images = (100 + 30 * torch.rand(n, 1, S, S, generator=g)).repeat(1, 3, 1, 1).to(torch.uint8)
    masks = torch.zeros(n, S, S, dtype=torch.bool)
    for i in range(n_good, n):
        y, x = 8 + 5 * (i - n_good), 10 + 4 * (i - n_good)
        masks[i, y:y + 8, x:x + 8] = True
        images[i, :, y:y + 8, x:x + 8] = 230
    labels = torch.tensor([0] * n_good + [1] * n_bad)
    classes = ["good"] * n_good + ["spot"] * n_bad
    return images, masks, labels, classes


def stub_predict(images):
    x = images.float() / 127.5 - 1
    recon = torch.full_like(x, x.median().item())
    maps = (x - recon).abs().mean(dim=1)
    return {"maps": maps, "scores": maps.flatten(1).max(dim=1).values, "recon": recon}


def section_ids(text):
    return re.findall(r'<section id="([a-z]+)"', text)


def test_report_with_ground_truth(tmp_path):
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    scores = res["scores"].clone()
    scores[0] = 10.0  # a good image above the threshold: one false alarm
    scores[-1] = -1.0  # a defective one below it: one miss
    thr = 0.5
    info = ModelInfo(S, name="stub", version="v9", image_threshold=thr, pixel_threshold=4.2e-5,
                     extra={"far": 0.01, "threshold_image": "train/good/marked.png"})
    out = write_report(tmp_path / "r" / "report.html", names=[f"img{i}.png" for i in range(12)], images=images,
                       maps=res["maps"], scores=scores, recon=res["recon"], labels=labels, masks=masks,
                       classes=classes, meta=info)
    text = Path(out["path"]).read_text()
    assert section_ids(text) == ["summary", "metrics", "curves", "histogram", "gallery"] == out["sections"]
    at = out["metrics"]["at_threshold"]
    assert (at["false_alarms"], at["n_good"], at["misses"], at["n_defective"]) == (1, 6, 1, 6)
    assert at["false_alarm_rate"] == pytest.approx(1 / 6) and at["miss_rate"] == pytest.approx(1 / 6)
    assert 0 <= out["metrics"]["pixel_auroc"] <= 1 and "spot" in out["metrics"]["per_class"]
    assert text.count('class="card fa"') == 1 and text.count('class="card miss"') == 1
    assert text.count('alt="mask"') == 6 and text.count('alt="reconstruction"') == 12
    assert "asked 0.01" in text and "v9" in text
    assert "threshold is the score of</th><td>train/good/marked.png" in text.replace("\n", "")
    # thresholds shown in full: read back, they are the numbers (and flag the same images as --threshold)
    best = out["metrics"]["f1_optimal"]["threshold"]
    assert f"<th>F1-optimal image threshold</th><td>{best!r}</td>" in text and "<th>threshold in use</th><td>0.5</td>" in text
    assert "<th>image threshold</th><td>0.5</td>" in text and "<th>pixel threshold</th><td>4.2e-05</td>" in text  # not 0.0000
    # gallery sorted by score, highest first
    shown = [float(v) for v in re.findall(r"score ([-0-9.e+]+)", text)]
    assert shown == sorted(shown, reverse=True) and shown[0] == 10.0
    # self-contained: no external references
    assert not re.search(r'(src|href)="(?!data:)', text) and "http" not in text


def test_report_lists_the_thresholds_far_can_set(tmp_path):
    """With the run's held-back scores (ModelInfo.extra["held_back"]), the metrics section lists
    each threshold --far can set and its false alarms and misses on these images; without them
    it does not."""
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    held = [9.0, 0.8, 0.4, -1.0 / 3] + [-2.0] * 36  # n = 40: ranks up to floor(0.1 * 41) = 4
    info = ModelInfo(S, image_threshold=9.0, extra={"held_back": {"held_back_scores": held, "n_images": 40}})
    out = write_report(tmp_path / "a.html", names=[f"img{i}.png" for i in range(12)], images=images, maps=res["maps"],
                       scores=res["scores"], labels=labels, masks=masks, classes=classes, meta=info)
    points = out["metrics"]["operating_points"]
    assert [p["threshold"] for p in points] == held[:4]
    s, y = res["scores"].numpy(), labels.numpy()
    assert [p["misses"] for p in points] == [int(((s <= t) & (y == 1)).sum()) for t in held[:4]]
    text = Path(out["path"]).read_text()
    assert "Thresholds <code>--far</code> can set" in text and f"<td>{points[1]['far']:.4g}</td><td>2</td>" in text
    # each threshold in full, as --threshold takes it back (they were cut to 4 decimals: -0.3333)
    assert f"<td>4</td><td>{-1.0 / 3!r}</td>" in text
    plain = write_report(tmp_path / "b.html", names=[f"img{i}.png" for i in range(12)], images=images, maps=res["maps"],
                         scores=res["scores"], labels=labels, masks=masks, classes=classes, meta=ModelInfo(S, image_threshold=9.0))
    assert "operating_points" not in plain["metrics"] and "--far</code> can set" not in Path(plain["path"]).read_text()


def test_the_operating_point_lies_on_the_curves():
    """Above every score nothing is flagged: precision 1 where the precision-recall curve ends
    (it was drawn at precision 0, at the origin)."""
    from sklearn.metrics import precision_recall_curve

    from defect_fast.report import _operating_point

    s, y = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.05]), np.array([0, 0, 0, 1, 1, 1])
    assert _operating_point(s, y, 1.0) == (0.0, 0.0, 1.0)
    prec, rec, _ = precision_recall_curve(y, s)
    assert (rec[-1], prec[-1]) == (0.0, 1.0)
    assert _operating_point(s, y, 0.25) == (1 / 3, 2 / 3, 2 / 3)


def _plain_folder(tmp_path, n: int):
    """A folder of ``n`` defect-free images (part00.png, ...), no labels."""
    images, _, _, _ = make_set(n_good=n, n_bad=0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"part{i:02d}.png")
    return folder


def test_report_without_ground_truth_and_gallery_limit(tmp_path):
    folder = _plain_folder(tmp_path, 10)
    info = ModelInfo(S, name="stub", image_threshold=0.2)
    out = report_from_data(stub_predict, info, folder, tmp_path / "plain.html", max_gallery=4)
    text = Path(out["path"]).read_text()
    assert section_ids(text) == ["summary", "histogram", "gallery"]
    assert out["n_images"] == 10 and out["n_shown"] == 4 and text.count('class="card') == 4
    assert out["metrics"] == {}
    # the photos' own sizes come from the files: a caller cannot replace them
    with pytest.raises(TypeError, match="sizes"):
        report_from_data(stub_predict, info, folder, tmp_path / "other.html", sizes=[(1, 1)] * 10)
    assert not (tmp_path / "other.html").exists()


def test_report_from_mvtec_layout(tmp_path):
    images, masks, labels, classes = make_set(n_good=3, n_bad=3)
    root = tmp_path / "data"
    for i, (im, m, c) in enumerate(zip(images, masks, classes)):
        d = root / "test" / c
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
        if c != "good":
            g = root / "ground_truth" / c
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.numpy().astype(np.uint8) * 255).save(g / f"{i:03d}_mask.png")
    out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.5), root, tmp_path / "mv.html")
    assert out["sections"] == ["summary", "metrics", "curves", "histogram", "gallery"]
    assert out["metrics"]["image_auroc"] == pytest.approx(1.0)  # the squares are the brightest pixels


def _gallery_tiles(text):
    """[(alt, style width or None, decoded PNG size)] of every gallery image, in page order."""
    import base64
    import io

    gallery = text[text.index('<section id="gallery"'):]
    out = []
    for alt, width, data in re.findall(r'<img alt="(\w+)" title="\w+"(?: style="width:(\d+)px")? '
                                       r'src="data:image/png;base64,([^"]+)"', gallery):
        size = Image.open(io.BytesIO(base64.b64decode(data))).size
        out.append((alt, int(width) if width else None, size))
    return out


def test_gallery_tiles_keep_each_photo_s_proportions(tmp_path):
    """Photos of another shape than the model's square are shown at their own proportions,
    thumb px high (a tall tile and a wide one, within the 1:4 to 4:1 limits); without sizes the
    tiles stay square."""
    images, masks, labels, classes = make_set(n_good=3, n_bad=3)
    root = tmp_path / "data"
    shapes = [(32, 128), (200, 50), (64, 64), (400, 10), (100, 50), (50, 100)]  # (width, height)
    for i, (im, m, c) in enumerate(zip(images, masks, classes)):
        w, h = shapes[i]
        d = root / "test" / c
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).resize((w, h)).save(d / f"{i:03d}.png")
        if c != "good":
            g = root / "ground_truth" / c
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.numpy().astype(np.uint8) * 255).resize((w, h), Image.NEAREST).save(g / f"{i:03d}_mask.png")
    out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.5), root, tmp_path / "r.html", thumb=80)
    tiles = _gallery_tiles(Path(out["path"]).read_text())
    expected = {0: 20, 1: 320, 2: 80, 3: 320, 4: 160, 5: 40}  # 80 px high; 400:10 capped at 4:1
    assert tiles and {alt for alt, _, _ in tiles} >= {"input", "reconstruction", "map", "overlay", "mask"}
    cards = []
    for alt, width, size in tiles:
        if alt == "input":
            cards.append([])
        cards[-1].append((alt, width, size))
    assert len(cards) == 6
    for card in cards:
        shown = card[0][2][0]  # the input tile's width
        for alt, width, size in card:
            assert width == (None if shown == 80 else shown), (alt, card)  # every tile of a card as wide
            if alt in ("input", "reconstruction", "mask"):
                assert size == (shown, 80), (alt, size)
            else:  # the map and the overlay are the model's square, stretched by the page
                assert size == (S, S), (alt, size)
    assert sorted(card[0][2][0] for card in cards) == sorted(expected.values())
    # the square default of the API
    res = stub_predict(images)
    plain = write_report(tmp_path / "sq.html", names=[str(i) for i in range(6)], images=images, maps=res["maps"],
                         scores=res["scores"], thumb=80)
    assert {(width, size) for alt, width, size in _gallery_tiles(Path(plain["path"]).read_text())
            if alt == "input"} == {(None, (80, 80))}
    with pytest.raises(ValueError, match="6 images but 2 sizes"):
        write_report(tmp_path / "x.html", names=[str(i) for i in range(6)], images=images, maps=res["maps"],
                     scores=res["scores"], sizes=[(1, 1), (2, 2)])


def test_report_rejects_mismatched_inputs(tmp_path):
    images, masks, labels, classes = make_set(2, 2)
    res = stub_predict(images)
    with pytest.raises(ValueError, match="3 names but 4 images"):
        write_report(tmp_path / "x.html", names=["a", "b", "c"], images=images, maps=res["maps"], scores=res["scores"])


# --------------------------------------------------------------------------------------------
# Rendering in headless Chromium
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    """Path of a Chromium binary; scripts/install_chromium.sh installs Debian's when missing."""
    try:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                           timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")
    if r.returncode != 0 or not r.stdout.strip():
        reason = (r.stderr.strip().splitlines() or ["install_chromium.sh failed"])[-1]
        pytest.skip(f"headless Chromium unavailable: {reason}")
    return r.stdout.strip().splitlines()[-1]


def _chromium(binary, *args, timeout=120):
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_chromium(tmp_path, chromium):
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    out = write_report(tmp_path / "report.html", names=[f"img{i}.png" for i in range(12)], images=images,
                       maps=res["maps"], scores=res["scores"], recon=res["recon"], labels=labels, masks=masks,
                       classes=classes, meta=ModelInfo(S, name="stub", image_threshold=0.5))
    url = Path(out["path"]).resolve().as_uri()
    dom = _chromium(chromium, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert section_ids(dom.stdout) == ["summary", "metrics", "curves", "histogram", "gallery"]
    shot = tmp_path / "shot.png"
    r = _chromium(chromium, f"--screenshot={shot}", "--window-size=1100,1600", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert px.shape[:2] == (1600, 1100)
    assert px.std() > 15, f"screenshot looks blank (pixel std {px.std():.1f})"
    colourful = (px.max(axis=2) - px.min(axis=2)) > 60  # plot lines, bars, heat overlays
    assert colourful.mean() > 0.002, f"no coloured plots rendered ({colourful.mean():.4f} of pixels)"
    # the same check tells a blank page apart
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shot2 = tmp_path / "blank.png"
    _chromium(chromium, f"--screenshot={shot2}", "--window-size=1100,1600", blank.resolve().as_uri())
    assert np.asarray(Image.open(shot2).convert("RGB"), dtype=np.float64).std() < 1


def test_the_gallery_note_says_when_errors_are_left_out(tmp_path):
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    scores = torch.linspace(0, 1, 12)
    scores[:6] = torch.linspace(0.7, 0.9, 6)  # every good image flagged: 6 false alarms
    info = ModelInfo(S, image_threshold=0.5)
    common = dict(names=[f"img{i}.png" for i in range(12)], images=images, maps=res["maps"], scores=scores,
                  labels=labels, masks=masks, classes=classes, meta=info)
    text = Path(write_report(tmp_path / "a.html", max_gallery=3, **common)["path"]).read_text()
    assert "3 of the 6 false alarms and misses are shown" in text and "All false alarms" not in text
    text = Path(write_report(tmp_path / "b.html", max_gallery=8, **common)["path"]).read_text()
    assert "All false alarms and misses are shown" in text


def test_without_labels_the_gallery_claims_no_errors_and_marks_blank_frames(tmp_path):
    """A plain folder has no false alarms or misses: its note said "All false alarms and misses are
    shown" and showed their colours. A blank frame's card was tagged as any other, where predict
    marks it blank and watch sets it aside."""
    images, _, _, _ = make_set(n_good=10, n_bad=0)
    images[3] = 90  # one grey throughout
    res = stub_predict(images)
    info = ModelInfo(S, name="stub", image_threshold=0.2)
    common = dict(names=[f"img{i}.png" for i in range(10)], images=images, maps=res["maps"], scores=res["scores"],
                  meta=info)
    text = Path(write_report(tmp_path / "a.html", max_gallery=4, **common)["path"]).read_text()
    assert "false alarm" not in text and "misses" not in text and "purple" not in text
    assert "The rest are evenly sampled." in text and "Orange: flagged." in text
    text = Path(write_report(tmp_path / "b.html", max_gallery=10, **common)["path"]).read_text()
    assert text.count("blank frame, one colour throughout") == 1
    assert re.search(r"blank frame, one colour throughout<br>img3\.png", text)
    # neither passed nor flagged: the summary counted it as passed and its card said "pass"
    flagged = int((res["scores"] > 0.2).sum())
    assert not bool(res["scores"][3] > 0.2)  # it would have counted as passed
    assert re.search(rf"<th>flagged \(score &gt; threshold\)</th><td>{flagged}</td>", text)
    assert re.search(rf"<th>passed</th><td>{9 - flagged}</td>", text)
    assert re.search(r"<th>blank frames, not judged \(one colour throughout: a camera fault\)</th><td>1</td>", text)
    assert re.search(r'<span class="tag blank">not judged</span> score [^<]*· blank frame', text)
    assert text.count('class="tag blank"') == 1 and "Grey tag: a blank frame, not judged (watch sets" in text
    # labelled, good and above the threshold: "not judged" too, not "false alarm"
    images2, masks, labels, classes = make_set()
    images2[2] = 90
    res2 = stub_predict(images2)
    text = Path(write_report(tmp_path / "c.html", names=[f"i{i}.png" for i in range(12)], images=images2,
                             maps=res2["maps"], scores=res2["scores"], labels=labels, masks=masks, classes=classes,
                             meta=ModelInfo(S, name="stub", image_threshold=-1.0), max_gallery=12)["path"]).read_text()
    assert re.search(r'<span class="tag blank">not judged</span> score [^<]*\(good\) · blank frame[^<]*<br>i2\.png', text)
    # still among the gallery's false alarms, as the metrics count it (every image is flagged at -1)
    text = Path(write_report(tmp_path / "d.html", names=[f"i{i}.png" for i in range(12)], images=images2,
                             maps=res2["maps"], scores=res2["scores"], labels=labels, masks=masks, classes=classes,
                             meta=ModelInfo(S, name="stub", image_threshold=-1.0), max_gallery=4)["path"]).read_text()
    assert "4 of the 6 false alarms and misses are shown" in text and "(6 of 6 good)" in text


def test_the_per_class_rows_say_what_their_image_counts_hold(tmp_path):
    """A class's row counts its images and the good ones (6 spots and 6 good: 12), under a header
    that said "images"; the row of every class was labelled "all", as a class named so is."""
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    classes = ["good"] * 6 + ["all"] * 6
    out = write_report(tmp_path / "r.html", names=[f"i{i}" for i in range(12)],
                       images=images, maps=res["maps"], scores=res["scores"], labels=labels, masks=masks,
                       classes=classes, meta=ModelInfo(S, image_threshold=0.5))
    text = Path(out["path"]).read_text()
    assert "<th>images (with the good ones)</th>" in text
    assert re.search(r"<tr><td>every class</td>(<td>[^<]*</td>){4}<td>12</td></tr>", text)
    assert re.search(r"<tr><td>all</td>(<td>[^<]*</td>){4}<td>12</td></tr>", text)


def test_a_caption_s_score_stays_on_its_side_of_the_threshold(tmp_path):
    """Rounded to 5 digits, a score just under the threshold read above it on a "pass" card."""
    from defect_fast.report import _score_text

    assert _score_text(0.0535888, 0.05358887) == "0.0535888" and _score_text(0.05358884, 0.05358887) == "0.0535888"
    assert _score_text(0.053588869, 0.05358887) == "0.05358887"  # equal to it reads as not above it: a pass
    assert _score_text(0.12345678, 0.05) == "0.12346" and _score_text(0.12345678, None) == "0.12346"
    assert _score_text(0.05358890, 0.05358887) == "0.053589"  # flagged, and above it rounded: short
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    thr = float(res["scores"][0]) + 1e-7  # just above the first image's score: it passes
    text = Path(write_report(tmp_path / "r.html", names=[f"i{i}" for i in range(12)], images=images, maps=res["maps"],
                             scores=res["scores"], labels=labels, masks=masks, classes=classes,
                             meta=ModelInfo(S, image_threshold=thr))["path"]).read_text()
    shown = float(re.search(r'pass</span> score ([0-9.e+-]+) \(good\)<br>i0<', text).group(1))
    assert shown <= thr


def test_the_histogram_spreads_good_scores_that_defects_dwarf():
    """Equal bins from the lowest to the highest score put all 150 good images in one bin where
    defects scored 25 times higher (53 % of them flagged, unseen on the plot)."""
    from defect_fast.report import _histogram_bins

    rng = np.random.default_rng(0)
    good, bad = rng.uniform(0.04, 0.06, 150), rng.uniform(1.0, 1.5, 20)
    edges, log = _histogram_bins(np.concatenate([good, bad]))
    assert log and np.histogram(good, edges)[0].max() < 150 / 3  # over several bins
    assert np.histogram(np.concatenate([good, bad]), edges)[0].sum() == 170
    edges, log = _histogram_bins(np.concatenate([good, good * 3]))  # a span of 4.5: equal bins, as before
    assert not log and np.allclose(np.diff(edges), np.diff(edges)[0])
    assert not _histogram_bins(np.array([-1.0, 0.5, 40.0]))[1]  # z-scores, negative: equal bins


@pytest.mark.parametrize("kind", ["defective only", "good only"])
def test_a_set_of_one_kind_still_gets_the_metrics_it_supports(tmp_path, kind):
    """Only defective images: the pixel metrics and the miss rate (evaluate gives them); only good
    images: the false-alarm rate. The image-level curves need both kinds."""
    images, masks, labels, classes = make_set(n_good=0, n_bad=4) if kind == "defective only" else make_set(n_good=4, n_bad=0)
    res = stub_predict(images)
    info = ModelInfo(S, image_threshold=0.5, extra={"far": 0.01})
    out = write_report(tmp_path / "r.html", names=[f"i{i}.png" for i in range(4)], images=images, maps=res["maps"],
                       scores=res["scores"], labels=labels, masks=masks, classes=classes, meta=info)
    text = Path(out["path"]).read_text()
    assert out["sections"] == ["summary", "metrics", "histogram", "gallery"]
    if kind == "defective only":
        assert out["metrics"]["pixel_auroc"] > 0.9 and "miss rate at it" in text and "false-alarm rate at it" not in text
    else:
        assert "false-alarm rate at it" in text and "miss rate at it" not in text and "asked 0.01" in text


def test_the_rate_at_the_threshold_is_put_beside_the_one_its_images_lead_to_expect(tmp_path):
    """20 calibration images cannot give a 1 % threshold (the largest score is used: 1/21
    expected): the page said "asked 0.01" beside the rate on the test images, which reads as a
    failure; evaluate says what was asked and what was expected, and so does the page. The table
    of the thresholds --far can set names the images whose scores they are."""
    import warnings

    from defect_fast.calibration import calibrate

    images, masks, labels, classes = make_set(n_good=30, n_bad=6)
    res = stub_predict(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few images for the rate: said at calibration
        cal = calibrate(res["scores"][:20] * 0.9, res["maps"][:20], 0.01, images="calibration")
    info = ModelInfo.from_calibration(S, "m", "v", cal)
    info.extra.update(far=0.01, held_back=cal)  # as from_detector adds them
    out = write_report(tmp_path / "r.html", names=[f"i{i}.png" for i in range(36)], images=images, maps=res["maps"],
                       scores=res["scores"], labels=labels, masks=masks, classes=classes, meta=info)
    text = Path(out["path"]).read_text()
    assert "; asked 0.01, expected 0.0476 from 20 calibration images" in text
    assert len(out["metrics"]["operating_points"]) > 1 and "the k-th highest calibration score" in text
    assert "held-back" not in text


def test_names_that_are_not_utf8_small_tiles_what_is_missing_and_no_silent_replace(tmp_path):
    """A Latin-1 file name ("Prüf" as the file system gives it) ended the report after all its work
    with an internal error; maps and overlays were embedded at the model's size whatever the tile's
    (a 512-px run: 39 MB for 60 cards); what the data could not give was left out without a word;
    a file that appeared at --out while the images were predicted was replaced."""
    from defect_fast.safety import OutputRefused

    images, masks, labels, classes = make_set(n_good=3, n_bad=0)
    res = stub_predict(images)
    names = ["Pr\udcfcf.png", "b.png", "c.png"]
    out = write_report(tmp_path / "r.html", names=names, images=images, maps=res["maps"], scores=res["scores"],
                       labels=labels, masks=None, classes=classes, meta=ModelInfo(S, image_threshold=0.5), thumb=32)
    text = Path(out["path"]).read_text(encoding="utf-8")
    assert "Pr\\udcfcf.png" in text
    assert "not on this page" in text and "defect-free ones only" in text
    sizes = {(alt, size) for alt, _w, size in _gallery_tiles(text)}
    assert ("map", (32, 32)) in sizes and ("overlay", (32, 32)) in sizes  # the tile's size, not 64 x 64
    (tmp_path / "late.html").write_text("someone's")
    with pytest.raises(OutputRefused, match="appeared there"):
        write_report(tmp_path / "late.html", names=names, images=images, maps=res["maps"], scores=res["scores"],
                     replace=False)
    assert (tmp_path / "late.html").read_text() == "someone's"


def test_the_page_says_why_pixel_metrics_are_missing_or_n_a(tmp_path):
    """Masks with a set of defect-free images only left the pixel metrics off the page, and the
    masks of defective images that hold no defect pixel gave n/a cells, without a word on the page
    (the reason went to stderr only; the page is sent on its own)."""
    from defect_fast.metrics import MetricWarning

    images, masks, labels, classes = make_set(n_good=3, n_bad=0)
    res = stub_predict(images)
    common = dict(names=[f"i{i}.png" for i in range(3)], images=images, maps=res["maps"], scores=res["scores"])
    text = Path(write_report(tmp_path / "a.html", labels=labels, masks=masks, classes=classes, **common)["path"]).read_text()
    assert "pixel metrics: they need defective images, the test set has defect-free ones only" in text
    images, masks, labels, classes = make_set(n_good=3, n_bad=3)
    res = stub_predict(images)
    common = dict(names=[f"i{i}.png" for i in range(6)], images=images, maps=res["maps"], scores=res["scores"])
    with pytest.warns(MetricWarning, match="the masks have no defect pixel"):  # still said where it was
        out = write_report(tmp_path / "b.html", labels=labels, masks=torch.zeros_like(masks), classes=classes, **common)
    text = Path(out["path"]).read_text()
    assert "<td>n/a</td>" in text and "<th>aupro (FPR &le; 0.3)</th>" in text  # AUPRO's limit on the page
    assert "n/a: pixel AUROC is undefined: the masks have no defect pixel" in text
    assert "AUPRO (class spot) is undefined: the masks have no defect pixel" in text


def test_verdicts_compare_in_float64_as_predict_and_watch_do(tmp_path):
    """A threshold typed a few digits short of a float32 score flags that image in predict and
    watch (float(score) > threshold); the page compared in float32, which rounded the threshold
    onto the score and passed it, while its own rate table counted a false alarm."""
    images, _masks, labels, _classes = make_set(2, 2)
    score = np.float32(0.006132396869361401)
    thr = 0.00613239686  # below the score in float64, equal to it in float32
    assert float(score) > thr and not bool(np.array([score]) > thr)
    scores = torch.tensor([score, 0.001, 0.02, 0.003], dtype=torch.float32)
    out = write_report(tmp_path / "r.html", names=[f"img{i}.png" for i in range(4)], images=images,
                       maps=torch.rand(4, S, S), scores=scores, labels=labels, threshold=thr)
    text = re.sub(r"\s+", " ", re.sub("<[^>]+>", " ", Path(out["path"]).read_text()))
    assert out["metrics"]["at_threshold"]["false_alarms"] == 1
    assert re.search(r"flagged \(score &gt; threshold\) 2 passed 2\b", text), text[:2000]
    assert 'class="card fa"' in Path(out["path"]).read_text()


def test_a_score_equal_to_the_threshold_is_not_flagged_at_the_operating_point():
    """Images are flagged when their score is above the threshold (predict, watch and the gallery's
    verdicts): the point drawn on the curves counts the same."""
    from defect_fast.report import _operating_point

    s, y = np.array([0.5, 0.5, 0.2, 0.1]), np.array([1, 0, 1, 0])
    assert _operating_point(s, y, 0.5) == (0.0, 0.0, 1.0)
    assert _operating_point(s, y, 0.4) == (0.5, 0.5, 0.5)


def test_without_a_threshold_no_defective_image_is_called_a_miss(tmp_path):
    """With labels but no threshold there are no verdicts: no card is tagged, none is a miss."""
    images, masks, labels, classes = make_set(n_good=3, n_bad=3)
    pred = stub_predict(images)
    out = write_report(tmp_path / "r.html", names=[f"{i}.png" for i in range(6)], images=images, maps=pred["maps"],
                       scores=pred["scores"], labels=labels, masks=masks, classes=classes, max_gallery=6)
    text = Path(out["path"]).read_text()
    assert 'class="card "' in text and "card miss" not in text and "tag miss" not in text


def test_a_link_at_the_page_s_name_is_not_replaced_without_replace(tmp_path):
    """replace=False refuses a symbolic link there too, even a dangling one (the user's entry)."""
    from defect_fast.safety import OutputRefused

    images, _, _, _ = make_set(n_good=2, n_bad=0)
    pred = stub_predict(images)
    page = tmp_path / "r.html"
    page.symlink_to(tmp_path / "elsewhere.html")
    with pytest.raises(OutputRefused, match="a file appeared there"):
        write_report(page, names=["a.png", "b.png"], images=images, maps=pred["maps"], scores=pred["scores"],
                     replace=False)
    assert page.is_symlink() and not (tmp_path / "elsewhere.html").exists()


def test_a_map_brought_down_to_its_tile_keeps_a_one_pixel_defect_at_full_height():
    """The map is brought down to the tile by its maximum over each block: a thin defect stays visible."""
    from defect_fast.report import _at_tile_size

    m = torch.zeros(320, 320)
    m[101, 57] = 5.0
    small, img = _at_tile_size(m, torch.zeros(3, 320, 320, dtype=torch.uint8), 160, 160)
    assert small.shape == (160, 160) and img.shape == (3, 160, 160)
    assert float(small.max()) == 5.0 and float(small[50, 28]) == 5.0


def test_blank_frames_are_named_on_the_page(tmp_path):
    """The reader says it on stderr; the page, which outlives the terminal, says it in its notes."""
    folder = _plain_folder(tmp_path, 3)
    Image.fromarray(np.full((S, S, 3), 70, np.uint8)).save(folder / "shutter.png")
    with pytest.warns(UserWarning, match="one colour throughout"):
        out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.2), folder, tmp_path / "r.html")
    summary = Path(out["path"]).read_text().split("</table>")[0]
    assert "<th>notes</th>" in summary and "1 of the 4 images are blank frames" in summary and "shutter.png" in summary
    Path(folder / "shutter.png").unlink()
    out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.2), folder, tmp_path / "r2.html")
    assert "<th>notes</th>" not in Path(out["path"]).read_text()


def test_a_short_gallery_shows_both_kinds_of_error():
    """--max-gallery 5 with 6 false alarms and 8 misses showed the 5 highest-scoring false alarms
    and no miss: half of each kind now, the surest of each (one kind's room left to the other)."""
    from defect_fast.report import _gallery_selection

    scores = np.arange(20, dtype=float)[::-1]  # image i scores 19 - i
    order = np.argsort(-scores, kind="stable")
    fa, miss = np.zeros(20, bool), np.zeros(20, bool)
    fa[:6], miss[6:14] = True, True  # the false alarms score highest, the misses below them
    shown = _gallery_selection(order, fa, miss, 5).tolist()
    assert shown == [0, 1, 11, 12, 13]  # the 2 highest-scoring false alarms, the 3 lowest-scoring misses
    assert _gallery_selection(order, fa, np.zeros(20, bool), 5).tolist() == [0, 1, 2, 3, 4]  # no miss: all false alarms
    only_miss = _gallery_selection(order, np.zeros(20, bool), miss, 4).tolist()
    assert only_miss == [10, 11, 12, 13]


def _legend_strips(text):
    """The gallery's colour scale strips (map, overlay tint) as arrays, and its note's text."""
    import base64
    import io

    uris = re.findall(r'<img class="legend" alt="[^"]*" title="[^"]*" src="data:image/png;base64,([^"]*)"', text)
    strips = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]
    note = re.search(r'<img class="legend"[^>]*>(?:<img class="legend"[^>]*>)?<br>([^<]*)</p>', text)
    return strips, note.group(1) if note else None


def test_the_gallery_shows_the_maps_colour_scale_with_the_pixel_threshold(tmp_path):
    """The maps and overlays had no legend: a reader could not tell what value a grey or a tint
    stands for, nor where the pixel threshold lies. The page draws both scales, from 0 to the value
    drawn white, with a black tick at the pixel threshold; without a stored scale it says the maps'
    own maximum is used."""
    images, masks, labels, classes = make_set()
    res = stub_predict(images)
    common = dict(names=[f"i{i}" for i in range(12)], images=images, maps=res["maps"], scores=res["scores"])
    info = ModelInfo(S, image_threshold=0.3, pixel_threshold=0.05)  # white at 2 x the pixel threshold
    text = Path(write_report(tmp_path / "a.html", meta=info, **common)["path"]).read_text()
    (grey, tint), note = _legend_strips(text)
    assert grey.shape == tint.shape == (12, 256, 3)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[0, -1].tolist() == [255, 255, 255]
    tick = round(0.5 * 255)  # the threshold halfway along: a black and a white column, seen on any colour
    for strip in (grey, tint):
        assert (strip[:, tick] == 0).all() and (strip[:, tick + 1] == 255).all()
    assert (grey[:, tick - 1] > 0).all() and (grey[:, tick + 2] < 255).all()
    assert tint[0, 0].tolist() == [128, 128, 128]  # no tint at 0: the photo (mid-grey here) as it is
    assert note.startswith("Map (grey) and overlay tint") and "0.1 and above at the right" in note
    assert "the tick is the pixel threshold, 0.05" in note
    # a stored scale below the pixel threshold: no tick off the strip, said in words
    low = ModelInfo(S, image_threshold=0.3, pixel_threshold=0.05, map_scale=0.02)
    (grey, tint), note = _legend_strips(Path(write_report(tmp_path / "b.html", meta=low, **common)["path"]).read_text())
    assert "tick" not in note and "0.02 and above" in note and not (grey[:, 1:] == 0).all(-1).any()
    assert "the pixel threshold, 0.05, lies above the scale's top" in note
    # no model information (or a scale that is no positive number): each page's maps' own maximum
    for name, meta in (("c.html", None), ("d.html", ModelInfo(S, image_threshold=0.3, map_scale=float("nan")))):
        (grey, _tint), note = _legend_strips(Path(write_report(tmp_path / name, meta=meta, **common)["path"]).read_text())
        assert f"{float(res['maps'].max()):.4g} at the right (the highest value of every image's map" in note, name
        assert "tick" not in note
    # maps with no positive value: drawn black, and the legend says so (not a scale no map is drawn on)
    out = write_report(tmp_path / "e.html", **{**common, "maps": -res["maps"] - 0.01})
    (grey, _tint), note = _legend_strips(Path(out["path"]).read_text())
    assert "1 at the right (no positive scale is stored and no map exceeds 0: every map is black)" in note


def test_the_page_never_replaces_a_file_written_at_out_during_its_write(tmp_path, monkeypatch):
    """Checked after the work, then renamed over the name: a file another process wrote there
    during the write (a slow disk's fsync) was replaced without --overwrite."""
    import os

    from defect_fast.safety import OutputRefused

    images, _masks, _labels, _classes = make_set(n_good=3, n_bad=0)
    res = stub_predict(images)
    page = tmp_path / "r.html"
    real = os.fsync

    def fsync(fd):
        if not page.exists():
            page.write_text("theirs")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputRefused, match="a file appeared there while the report was made; not replacing it"):
        write_report(page, names=["a", "b", "c"], images=images, maps=res["maps"], scores=res["scores"], replace=False)
    assert page.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_what_the_readers_say_of_the_data_is_on_the_page_too(tmp_path):
    """A test set without good/ (every image taken as defective) or files the reader skipped
    changes what the figures count: said on stderr only, the shared page showed the good images
    as misses with no word why. Blank frames keep their own note, not a second one."""
    import warnings

    from defect_fast.data import DataWarning

    images, _masks, _labels, _classes = make_set(n_good=3, n_bad=0)
    root = tmp_path / "data"
    (root / "test" / "OK").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / "test" / "OK" / f"{i}.png")
    Image.fromarray(np.full((S, S, 3), 70, np.uint8)).save(root / "test" / "OK" / "shutter.png")
    (root / "test" / "loose.png").write_bytes((root / "test" / "OK" / "0.png").read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.5), root, tmp_path / "r.html")
    said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("taken as defective" in m for m in said) and any("loose.png" in m for m in said), said
    summary = Path(out["path"]).read_text().split("</table>")[0]
    notes = summary.split("<th>notes</th>")[1]
    assert "taken as defective" in notes and "loose.png" in notes
    assert "1 of the 4 images are blank frames" in notes and notes.count("shutter.png") == 1  # once, not twice


def test_without_masks_the_page_gives_evaluate_s_per_class_image_auroc(tmp_path):
    """A test set without ground_truth/ had one image AUROC cell where evaluate gives a row per class."""
    images, _masks, labels, classes = make_set(n_good=4, n_bad=4)
    classes = classes[:4] + ["spot", "spot", "scratch", "scratch"]
    root = tmp_path / "data"
    for i, (im, c) in enumerate(zip(images, classes)):
        (root / "test" / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / "test" / c / f"{i:03d}.png")
    out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.5), root, tmp_path / "r.html")
    from defect_fast.evaluate import image_level_metrics

    s = stub_predict(images)["scores"]
    expected = image_level_metrics(s, labels, classes)
    assert sorted(out["metrics"]["per_class"]) == ["scratch", "spot"]
    for c in ("scratch", "spot"):
        assert out["metrics"]["per_class"][c]["image_auroc"] == pytest.approx(expected["per_class"][c]["image_auroc"])
    text = Path(out["path"]).read_text()
    assert "<tr><td>scratch</td><td>n/a</td>" in text and "<tr><td>spot</td><td>n/a</td>" in text


def test_the_thresholds_far_can_set_are_listed_for_good_images_only(tmp_path):
    """A set of defect-free line images is where a false-alarm rate is chosen; the table needed
    defective images too (evaluate lists it)."""
    images, masks, labels, classes = make_set(n_good=6, n_bad=0)
    res = stub_predict(images)
    held = [9.0, 0.8, 0.4, -1.0 / 3] + [-2.0] * 36
    info = ModelInfo(S, image_threshold=9.0, extra={"held_back": {"held_back_scores": held, "n_images": 40}})
    out = write_report(tmp_path / "a.html", names=[f"img{i}.png" for i in range(6)], images=images, maps=res["maps"],
                       scores=res["scores"], labels=labels, masks=masks, classes=classes, meta=info)
    points = out["metrics"]["operating_points"]
    s = res["scores"].numpy()
    assert [p["false_alarms"] for p in points] == [int((s > t).sum()) for t in held[:4]]
    assert "Thresholds <code>--far</code> can set" in Path(out["path"]).read_text()


def test_a_threshold_a_log_axis_cannot_show_keeps_the_axis_linear():
    """Scores spanning 100x drew on a log axis, where a threshold of 0 or below has no place:
    the legend named it and no line was drawn."""
    from defect_fast.report import _histogram_bins

    scores = np.geomspace(0.01, 1.0, 30)
    assert _histogram_bins(scores)[1] and _histogram_bins(scores, 0.005)[1]
    assert not _histogram_bins(scores, 0.0)[1] and not _histogram_bins(scores, -0.5)[1]


def test_a_black_16_bit_frame_is_named_once_on_the_page(tmp_path):
    """The reader's word on black 16-bit frames came into the notes beside the page's own note on
    blank frames, naming the same file twice."""
    import warnings

    folder = _plain_folder(tmp_path, 3)
    Image.fromarray(np.zeros((S, S), np.uint16)).save(folder / "black16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = report_from_data(stub_predict, ModelInfo(S, image_threshold=0.2), folder, tmp_path / "r.html")
    notes = Path(out["path"]).read_text().split("</table>")[0].split("<th>notes</th>")[1]
    assert "blank frames" in notes and notes.count("black16.png") == 1, notes
