"""Command line: evaluate JSON, predict outputs, refusals and errors that name the file."""
import json

import pytest
import torch

from defect_fast.cli import main
from defect_fast.detect import Detector, image_scores


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", str(synthetic_root), "--out", str(run), "--image-size", "128", "--batch-size", "16",
                 "--max-steps", "2", "1", "--set", "memory_size=10", "--quiet"]) == 0
    return run


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "evaluate", "predict", "demo"):
        assert word in out


def test_evaluate_writes_the_documented_keys(tiny_run, synthetic_root, tmp_path, capsys):
    path = tmp_path / "m.json"
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(path)]) == 0
    metrics = json.loads(path.read_text())
    for key in ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"scratch", "spot"}
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert "pixel_auroc" in capsys.readouterr().out


def test_predict_outputs_and_refusals(tiny_run, synthetic_root, tmp_path, capsys):
    out = tmp_path / "pred"
    images = [str(synthetic_root / "test" / "scratch"), str(synthetic_root / "test" / "spot" / "000.png")]
    assert main(["predict", str(tiny_run), *images, "--out", str(out)]) == 0
    report = json.loads((out / "scores.json").read_text())
    n_scratch = len(list((synthetic_root / "test" / "scratch").glob("*.png")))
    assert len(report["images"]) == n_scratch + 1
    # 000.png exists in both classes: both maps are kept, under distinct names.
    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert len(maps) == n_scratch + 1 and "spot_000_map.png" in maps and "scratch_000_map.png" in maps
    assert all("defective" in e for e in report["images"])
    # Existing output is never overwritten silently.
    before = (out / "scores.json").read_text()
    assert main(["predict", str(tiny_run), *images, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "scores.json").read_text() == before
    assert main(["predict", str(tiny_run), *images, "--out", str(out), "--overwrite"]) == 0


def test_predict_bad_image_names_the_file(tiny_run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(tiny_run), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_file_damage_is_a_clear_error(tiny_run, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"garbage")
    assert main(["evaluate", str(fake), str(tmp_path)]) == 2
    assert "not a readable defect_fast checkpoint" in capsys.readouterr().err


def test_detector_maps_shapes_and_score_rule(tiny_run):
    det = Detector.load(tiny_run, device="cpu")
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    res = det.predict(images)
    assert res["maps"].shape == (2, 128, 128) and det.reconstruct(images).shape == (2, 3, 128, 128)
    assert (res["maps"] >= 0).all()
    # Score rule: mean of the top 0.1 % (16 of 16384 pixels here).
    m = torch.zeros(1, 128, 128)
    m.view(-1)[:16] = 2.0
    m.view(-1)[16] = 100.0
    assert image_scores(m).item() == pytest.approx((15 * 2.0 + 100.0) / 16)
    with pytest.raises(ValueError, match="tensor images must be"):
        det.predict(torch.zeros(1, 2, 64, 64, dtype=torch.uint8))


def test_smoothing_spreads_a_spike(tiny_run):
    det = Detector.load(tiny_run, device="cpu")
    smooth = Detector.load(tiny_run, device="cpu", smooth_sigma=2.0)
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    raw, blurred = det.predict(images)["maps"], smooth.predict(images)["maps"]
    # The detector's blur is the synthesis module's Gaussian blur, built once as matrices.
    from defect_fast.synthesis.gaaga import gaussian_blur
    torch.testing.assert_close(blurred, gaussian_blur(raw, 2.0), atol=1e-6, rtol=1e-5)
    assert blurred.max() < raw.max() and blurred.min() > raw.min()
    assert blurred.mean().item() == pytest.approx(raw.mean().item(), rel=0.05)
    with pytest.raises(ValueError, match="smooth_sigma"):
        Detector.load(tiny_run, device="cpu", smooth_sigma=-1)


def test_set_is_checked_against_the_model_config(synthetic_root, tmp_path, capsys):
    for bad, words in ((["--set", "bogus=1"], ("bogus", "memory_size", "fusion")),
                       (["--set", "memory_size=lots"], ("memory_size", "int"))):
        assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()


def test_map_choices_come_from_the_registry(capsys):
    from defect_fast.models import map_names

    with pytest.raises(SystemExit):
        main(["evaluate", "run", "data", "--map", "nonsense"])
    err = capsys.readouterr().err
    assert all(name in err for name in map_names()) and map_names() == ["msfr", "residual"]
