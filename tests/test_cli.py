"""Command line: evaluate JSON, predict outputs, refusals and errors that name the file."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import defect_fast
from defect_fast.cli import main
from defect_fast.detect import Detector, image_scores


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", str(synthetic_root), "--out", str(run), "--image-size", "128", "--batch-size", "16",
                 "--max-steps", "2", "1", "--set", "memory_size=10", "--quiet"]) == 0
    return run


def test_the_package_s_ops_are_reached_after_a_plain_import():
    """The README writes `defect_fast.ops.backend()`; after `import defect_fast` alone it was an AttributeError."""
    import subprocess
    import sys

    code = "import defect_fast; print(defect_fast.ops.backend('cpu')); defect_fast.no_such_thing"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() in ("cpu", "reference"), proc.stderr
    assert "has no attribute 'no_such_thing'" in proc.stderr


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "evaluate", "predict", "demo"):
        assert word in out
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # it was refused: "the following arguments are required: COMMAND"
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"defect-fast {defect_fast.__version__}\n"


def test_threads_sets_the_commands_cpu_threads_in_any_position(capsys):
    """A line PC shares its cores with the camera software: the count was only $OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    for argv in (["--threads", str(want), "info"], ["info", f"--threads={want}"]):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["cpu_threads"] == want
        assert torch.get_num_threads() == before  # given back to a caller of main() in its process
    for bad, said in ((["info", "--threads", "0"], "argument --threads: must be a whole number >= 1, got '0'"),
                      (["--thread", "1", "info"], "invalid choice: '1'"),  # (was taken for --threads, and unread)
                      (["info", "--threads"], "argument --threads: expected one argument")):
        assert main(bad) == 2
        assert said in capsys.readouterr().err


def test_evaluate_writes_the_documented_keys(tiny_run, synthetic_root, tmp_path, capsys):
    path = tmp_path / "m.json"
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(path)]) == 0
    metrics = json.loads(path.read_text())
    for key in ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"scratch", "spot"}
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert "pixel_auroc" in capsys.readouterr().out
    assert metrics["blank_images"] == []
    # a blank frame among the test images: scored and counted, and named (the JSON did not say which)
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(data / "test" / "good" / "covered.png")
    assert main(["evaluate", str(tiny_run), str(data), "--json", str(tmp_path / "b.json")]) == 0
    metrics = json.loads((tmp_path / "b.json").read_text())
    assert metrics["blank_images"] == [str(data / "test" / "good" / "covered.png")]


def test_evaluate_json_dash_writes_the_metrics_to_standard_output(tiny_run, synthetic_root, tmp_path, capsys,
                                                                   monkeypatch):
    """--json - wrote a file named "-" in the current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)  # standard output is the JSON alone; the table went to standard error
    assert metrics == json.loads((tmp_path / "m.json").read_text()) | {"inference_ms_per_image": metrics["inference_ms_per_image"]}
    assert "pixel_auroc" in err and "ms/image" in err
    assert not (tmp_path / "-").exists()


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
    # the stored (held-back) threshold decides, unless --threshold overrides it
    stored = Detector.load(tiny_run, device="cpu").calibration["image_threshold"]
    assert report["threshold"] == stored
    assert [e["defective"] for e in report["images"]] == [e["score"] > stored for e in report["images"]]
    # Existing output is never overwritten silently.
    before = (out / "scores.json").read_text()
    assert main(["predict", str(tiny_run), *images, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "scores.json").read_text() == before
    assert main(["predict", str(tiny_run), *images, "--out", str(out), "--overwrite"]) == 0


def test_predict_overwrite_never_removes_a_run(tiny_run, synthetic_root, tmp_path, capsys):
    """--overwrite replaces earlier predict output only: a run folder (another command's output,
    all of it written by defect-fast) is refused and keeps its model."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    image = str(synthetic_root / "test" / "spot" / "000.png")
    before = sorted(p.name for p in run.iterdir())
    assert main(["predict", str(tiny_run), image, "--out", str(run), "--overwrite"]) == 2
    assert "output of 'defect-fast train'" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert main(["predict", str(run), image, "--out", str(tmp_path / "p")]) == 0  # still a working run


@pytest.mark.parametrize("argv", [
    ["--image-size", "100"],                      # the default stride (the patch) does not tile 100 px
    ["--image-size", "128", "--stride", "48"],
    ["--image-size", "128", "--infer-stride", "48"],
    ["--image-size", "128", "--set", "memory_size=0"],
    ["--image-size", "128", "--set", "renorm_p=0"],
    ["--image-size", "128", "--set", "rec_weight=-1"],
    ["--image-size", "128", "--smooth", "1e308"],
    ["--image-size", "128", "--map", "perceptual"],  # no AlexNet weights anywhere (see below)
])
def test_train_overwrite_refuses_a_bad_setting_before_removing_the_old_run(tiny_run, synthetic_root, tmp_path, capsys,
                                                                            monkeypatch, argv):
    """Every setting is checked before the old run is cleared and before any training: one line,
    exit status 2, the earlier run intact."""
    import shutil

    monkeypatch.delenv("DEFECT_FAST_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-hub"))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", str(synthetic_root), "--out", str(run), "--overwrite", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defect-fast: error: ") and "\n" not in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    if "perceptual" in argv:  # what needs the weights, then where to put them: said once
        assert "--map perceptual needs ImageNet AlexNet weights: set $DEFECT_FAST_ALEXNET_WEIGHTS=PATH" in err
        assert "trunk weights are needed" not in err


def test_a_test_split_without_masks_gives_image_level_results(tiny_run, synthetic_root, tmp_path, capsys):
    """Images sorted into test/<class>/ with no ground_truth/ folder (a line's labelled images):
    evaluate and report give the image-level results, the same as with masks."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(synthetic_root / "test", bare / "test")
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(full)]) == 0
    assert main(["evaluate", str(tiny_run), str(bare), "--json", str(part)]) == 0
    assert "image-level results only" in capsys.readouterr().out
    want, got = json.loads(full.read_text()), json.loads(part.read_text())
    assert got["image_auroc"] == want["image_auroc"] and got["pixel_auroc"] is None and got["aupro"] is None
    assert {c: m["image_auroc"] for c, m in got["per_class"].items()} == \
        {c: m["image_auroc"] for c, m in want["per_class"].items()}
    assert got["thresholds"] == want["thresholds"]
    assert main(["report", str(tiny_run), str(bare), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()  # evaluate's image AUROC, overall and per class
    assert "<th>image_auroc</th>" in page and all(f"<tr><td>{c}</td>" in page for c in got["per_class"])
    capsys.readouterr()
    one = next((bare / "test" / "good").iterdir())  # an image given for the folder: said so, not "no such folder"
    assert main(["report", str(tiny_run), str(one), "--out", str(tmp_path / "r1.html")]) == 2
    assert f"{one}: not a folder" in capsys.readouterr().err
    # without matplotlib (an install with --no-deps): one line, before any image is predicted
    import sys

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)
        mp.setattr(Detector, "predict_batched", lambda *a, **k: pytest.fail("predicted without matplotlib"))
        assert main(["report", str(tiny_run), str(bare), "--out", str(tmp_path / "r2.html")]) == 2
    assert "error: the Python package matplotlib is missing" in capsys.readouterr().err
    assert not (tmp_path / "r2.html").exists()
    (bare / "ground_truth").mkdir()  # a ground_truth/ folder that is there must be complete
    assert main(["evaluate", str(tiny_run), str(bare)]) == 2
    assert f"{bare / 'ground_truth' / 'scratch'}: no such folder; the ground-truth masks of" in capsys.readouterr().err


def test_predict_writes_maps_at_each_photo_s_own_size(tiny_run, tmp_path):
    from PIL import Image

    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 96, 3)) * 255).astype(np.uint8)).save(wide)
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), str(wide), "--out", str(out)]) == 0
    entry = json.loads((out / "scores.json").read_text())["images"][0]
    assert entry["size"] == [96, 40] and entry["map"] == "maps/wide_map.png" and entry["overlay"] == "overlays/wide_overlay.png"
    assert Image.open(out / entry["map"]).size == (96, 40) and Image.open(out / entry["overlay"]).size == (96, 40)
    det = Detector.load(tiny_run, device="cpu")
    want = det.predict(wide)["maps"][0]  # the API's map of the same photo, at its size
    assert want.shape == (40, 96)


def test_predict_marks_blank_frames(tiny_run, tmp_path, capsys):
    """A frame of one colour is a camera fault: marked in scores.json and said, and flagged whatever
    its score (watch rejects it): a grey frame's low score had passed it."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "blank.png")
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / "part.png")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out)]) == 0
    said = capsys.readouterr()
    entries = {Path(e["image"]).name: e for e in json.loads((out / "scores.json").read_text())["images"]}
    assert entries["blank.png"]["blank"] is True and "blank" not in entries["part.png"]
    threshold = json.loads((out / "scores.json").read_text())["threshold"]
    assert entries["blank.png"]["score"] <= threshold  # a low score
    assert f"flagged at threshold {threshold!r}" in said.out  # in full: given as --threshold, the same images
    assert entries["blank.png"]["defective"] is True and "1 blank frame(s)" in said.out and "flagged whatever" in said.out
    assert "1 of 2 images are of one colour throughout" in said.err


def test_predict_takes_an_image_whose_name_is_as_long_as_a_file_name_may_be(tiny_run, tmp_path):
    """A legal 250-byte image name made map and overlay names the file system refuses ("File name
    too long"): their stems are shortened, unique, and scores.json names them."""
    from PIL import Image

    pixels = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    long = [folder / ("part-" + c * 241 + ".png") for c in "ab"]  # 250 bytes each, alike in their first 205
    for p in long:
        Image.fromarray(pixels).save(p)
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out)]) == 0
    entries = json.loads((out / "scores.json").read_text())["images"]
    maps = [e["map"] for e in entries]
    assert len(set(maps)) == 2 and all((out / m).is_file() and len(Path(m).name.encode()) <= 255 for m in maps)


def test_a_run_being_trained_is_named_so_not_told_to_resume(synthetic_root, tmp_path, capsys):
    """predict, evaluate, export ... on a run while its training wrote it said "training did not
    finish; resume the training first", and that resume was refused (the run in use): the command
    now says who writes the folder and to wait."""
    import os

    from defect_fast.safety import OutputFolder

    run = tmp_path / "run"
    training = OutputFolder.create(run, command="train", lock=True)  # the training, holding its run folder
    training.write_bytes("checkpoint.pt", b"")
    assert main(["evaluate", str(run), str(synthetic_root)]) == 2
    assert (f"{run}: no model.pt yet: PID {os.getpid()} is writing this folder (a training, or a calibrate "
            "--out); wait for it to finish") in capsys.readouterr().err
    training.release()
    assert main(["evaluate", str(run), str(synthetic_root)]) == 2  # stopped: the advice to resume stands
    assert f"{run}: no model.pt (training did not finish; resume the training first)" in capsys.readouterr().err
    # another command's folder at work (a watch's, a predict's) gets no model.pt: not said to be one coming
    watching = OutputFolder.create(tmp_path / "w", command="watch", lock=True)
    assert main(["evaluate", str(tmp_path / "w"), str(synthetic_root)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'w'}: no model.pt" in err and "is writing" not in err
    watching.release()


def test_a_folder_that_holds_runs_names_them(tiny_run, synthetic_root, tmp_path, capsys):
    """`evaluate DEMO DATA` on a demo's top folder said only "no model.pt"."""
    import shutil

    top = tmp_path / "demo"
    shutil.copytree(tiny_run, top / "run")
    assert main(["evaluate", str(top), str(synthetic_root)]) == 2
    assert f"{top}: no model.pt (runs inside it: {top / 'run'})" in capsys.readouterr().err
    odd = tmp_path / "bad" / "model.pt"  # a folder named like a model file
    odd.mkdir(parents=True)
    for argv in (["calibrate", str(odd), "--with-held-back", "--out", str(tmp_path / "c")],
                 ["audit", str(odd), "--out", str(tmp_path / "a")]):
        assert main(argv) == 2
        assert f"{odd}: is a folder, not a model file" in capsys.readouterr().err


def test_an_empty_output_name_is_refused(tiny_run, synthetic_root, capsys):
    """An empty --json wrote nothing and exited 0; an empty --out named the current folder."""
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", ""]) == 2
    assert "--json: must name a file or folder" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(synthetic_root / "test" / "spot"), "--out", ""]) == 2
    assert "--out: must name a file or folder" in capsys.readouterr().err


def test_demo_refuses_a_bad_setting_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--image-size", "100"]) == 2
    assert "--image-size 100" in capsys.readouterr().err and not out.exists()


def test_inference_settings_the_model_cannot_take_are_one_line_errors(tiny_run, synthetic_root, tmp_path, capsys):
    image = str(synthetic_root / "test" / "spot" / "000.png")
    for argv in (["predict", str(tiny_run), image, "--out", str(tmp_path / "p"), "--smooth", "1e7"],
                 ["evaluate", str(tiny_run), str(synthetic_root), "--stride", "48"],
                 ["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--stride", "100"],
                 ["diagnose", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "d"), "--stride", "48"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"defect-fast: error: {tiny_run}: ") and "\n" not in err, (argv, err)
        if "48" in argv:  # the image size is the model file's: no command here could take one
            assert "a stride dividing 64" in err and "image size of" not in err, err
    assert not any(tmp_path.iterdir())


def test_other_inference_settings_than_the_run_s_use_no_stored_threshold(tiny_run, synthetic_root, tmp_path, capsys):
    """The stored thresholds were calibrated on the run's maps: with another smoothing, stride, blend
    or map they would be wrong, so none is used and the output says why."""
    from defect_fast.calibration import stored_thresholds

    image_t, pixel_t, _ = stored_thresholds(Detector.load(tiny_run, device="cpu").calibration)
    assert image_t is not None and pixel_t is not None
    same = Detector.load(tiny_run, device="cpu", smooth_sigma=0.0, stride=64, blend="none")  # the run's own, spelled out
    assert stored_thresholds(same.calibration)[0] == image_t
    # a window on tiles blends nothing: the maps are the run's, to rounding, and so are its thresholds
    assert stored_thresholds(Detector.load(tiny_run, device="cpu", blend="hann").calibration)[0] == image_t
    for kw, said in ((dict(smooth_sigma=3.0), "smooth 0.0 -> 3.0"), (dict(stride=32), "stride 64 -> 32"),
                     (dict(stride=32, blend="hann"), "blend none -> hann"), (dict(map_kind="residual"), "map msfr -> residual")):
        det = Detector.load(tiny_run, device="cpu", **kw)
        got = stored_thresholds(det.calibration)
        assert got[:2] == (None, None) and said in got[2], (kw, got)
        assert not {"threshold_image", "highest_scores"} & set(det.calibration)  # they named what set those
        assert det.predict(torch.zeros(3, 128, 128, dtype=torch.uint8))["regions"] == [[]]  # no stale pixel threshold
    image = str(synthetic_root / "test" / "spot" / "000.png")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), image, "--out", str(out), "--smooth", "3"]) == 0
    report = json.loads((out / "scores.json").read_text())
    assert report["threshold"] is None and "defective" not in report["images"][0]
    assert "smooth 0.0 -> 3.0" in report["threshold_source"]
    assert "--threshold" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), image, "--out", str(tmp_path / "q"), "--smooth", "3", "--threshold", "0"]) == 0
    assert "defective" in json.loads((tmp_path / "q" / "scores.json").read_text())["images"][0]
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--smooth", "3"]) == 0
    assert "smooth 0.0 -> 3.0" in capsys.readouterr().out


def test_predict_bad_image_names_the_file(tiny_run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(tiny_run), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_holds_a_part_of_a_large_set_at_a_time_and_writes_what_it_would_whole(tiny_run, tmp_path, capsys,
                                                                                     monkeypatch):
    """predict held every image and map of its inputs at once (18 GB for 10,000 512-px images): it
    now reads, scores and writes a part at a time, after checking every file, with the same
    outputs; a bad file in the last part is still named before any output, and a NaN score in a
    later part leaves none."""
    import defect_fast.cli as cli
    import defect_fast.data.io as io
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray((rng.random((48 + 8 * i, 64, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(folder / "p5.png")  # a blank frame, in the last part
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "whole")]) == 0
    read = []
    real_read = io.read_images
    monkeypatch.setattr(io, "read_images", lambda paths, *a, **k: read.append(len(paths)) or real_read(paths, *a, **k))
    monkeypatch.setattr(cli, "PREDICT_PART", 2)
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "parts")]) == 0
    assert read == [2, 2, 2]  # no more than a part held at once
    whole, parts = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("whole", "parts"))
    assert parts == whole and whole["images"][5]["blank"] is True
    assert "1 of 6 images are of one colour throughout" in capsys.readouterr().err  # said once, for the whole set
    for e in whole["images"]:
        for key in ("map", "overlay"):
            assert (tmp_path / "parts" / e[key]).read_bytes() == (tmp_path / "whole" / e[key]).read_bytes()

    real_check = io.check_images

    def changed_after_the_check(paths, *a, **k):  # a photo rewritten at another size once checked
        real_check(paths, *a, **k)
        Image.fromarray((rng.random((30, 50, 3)) * 255).astype(np.uint8)).save(folder / "p3.png")

    monkeypatch.setattr(io, "check_images", changed_after_the_check)
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "changed")]) == 0
    entry = json.loads((tmp_path / "changed" / "scores.json").read_text())["images"][3]
    assert entry["size"] == [50, 30] and Image.open(tmp_path / "changed" / entry["map"]).size == (50, 30)
    monkeypatch.setattr(io, "check_images", real_check)

    (folder / "p4.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")  # in the third part
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "bad")]) == 2
    assert str(folder / "p4.png") in capsys.readouterr().err and not (tmp_path / "bad").exists()
    (folder / "p4.png").unlink()

    real_predict = Detector.predict_batched
    calls = []

    def nan_in_the_second_part(self, images, *a, **k):
        res = real_predict(self, images, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            res["scores"][0] = float("nan")
        return res

    monkeypatch.setattr(Detector, "predict_batched", nan_in_the_second_part)
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "nan")]) == 2
    assert f"the first: {folder / 'p2.png'}" in capsys.readouterr().err
    assert not any((tmp_path / "nan").rglob("*.png")) and not (tmp_path / "nan" / "scores.json").exists()


def test_a_very_large_image_is_warned_of_by_its_name(tiny_run, tmp_path, capsys, monkeypatch):
    """PIL's warning of an image over its pixel limit names no file: in a folder of many, which?"""
    from PIL import Image

    big = tmp_path / "big one.png"
    Image.new("RGB", (150, 150), (90, 90, 90)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 22,500 pixels: over it, under twice it
    assert main(["predict", str(tiny_run), str(big), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "warning" in ln and "pixels" in ln]
    assert warned == [f"defect-fast: warning: {big}: 150x150 pixels, over PIL's 20000 (twice that is refused); "
                      "decoding it takes much memory"], err


def test_model_file_damage_is_a_clear_error(tiny_run, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"garbage")
    assert main(["evaluate", str(fake), str(tmp_path)]) == 2
    assert "not a defect_fast model or checkpoint file" in capsys.readouterr().err
    # a torch file whose pickle holds other objects: refused without torch's advice to load it unsafely
    torch.save({"model_name": "cmaae", "extra": __import__("pathlib").PurePosixPath("x")}, fake)
    assert main(["evaluate", str(fake), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "other than tensors and plain data" in err and "weights_only" not in err and "\n" not in err.strip()


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
                       (["--set", "memory_size=lots"], ("memory_size", "int")),
                       (["--set", "memory_size"], ("error: --set: expects key=value, got 'memory_size'",)),
                       (["--lr", "1e30"], ("--lr", "must be at most 1 (Adam's step size",))):
        assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()


def test_options_the_model_as_built_does_not_use_are_refused(synthetic_root, tmp_path, capsys):
    """--set memory_size for a plain AE or --anomaly-source for a one-stage model changed nothing,
    without a word: the user believed the memory or the photos were in the run."""
    for bad, words in ((["--model", "ae-l2", "--set", "memory_size=10", "--set", "rec_weight=2"],
                        ("--set memory_size: model ae-l2", "(fusion=none, stages: normal)")),
                       (["--model", "memae", "--set", "gate_target=encoder"], ("--set gate_target: model memae",)),
                       (["--model", "ae-l2", "--set", "memory-size=10"], ("--set memory_size: model ae-l2",)),
                       (["--set", "two_stage=false", "--set", "synthesis=perlin"], ("--set synthesis: model cmaae",)),
                       (["--model", "ae-ssim", "--anomaly-source", str(synthetic_root)],
                        ("--anomaly-source: model ae-ssim trains no stage on synthetic anomalies",)),
                       # AW-SSIM's options where its loss has no AW-SSIM, no combined term or no LPIPS
                       (["--model", "awae", "--set", "loss_mode=ssim_l1", "--set", "sigma0=-1"],
                        ("--set sigma0: model awae", "(loss_mode=ssim_l1, stages: normal)")),
                       (["--model", "awae", "--set", "loss_mode=ssim_l1", "--set", "ssim_weights=nonsense",
                         "--set", "lpips_weights=/nonexistent"], ("--set ssim_weights, lpips_weights: model awae",)),
                       (["--model", "awae", "--set", "loss_mode=awssim_only", "--set", "stage2_ssim_weight=0.3"],
                        ("--set stage2_ssim_weight: model awae",)),
                       (["--model", "awae", "--set", "two_stage=false", "--set", "synthesis=perlin"],
                        ("--set synthesis: model awae",))):
        assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()
    from defect_fast.models import build_model

    assert build_model("cmaae").unused_options(["memory_size", "synthesis", "gate_target"]) == []
    assert build_model("memae").unused_options(["memory_size", "entropy_weight", "gate_activation"]) == ["gate_activation"]
    every = ["ssim_weights", "sigma0", "sigma_end", "sigma_k", "sigma_step", "stage2_ssim_weight", "lpips_weights",
             "synthesis"]
    assert build_model("awae").unused_options(every) == []  # the paper's two stages use them all
    assert build_model("awae", loss_mode="lpips_ssim").unused_options(every) == every[:5] + ["synthesis"]
    assert build_model("awae", sigma_k=0.1).unused_options(every) == ["sigma_end"]  # k given: no end derives it


def test_map_choices_come_from_the_registry(capsys):
    from defect_fast.models import map_names

    assert main(["evaluate", "run", "data", "--map", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--map" in err
    assert all(name in err for name in map_names()) and map_names() == ["msfr", "perceptual", "residual", "ssim"]


def test_evaluate_names_the_images_a_broken_model_gives_nan_maps(tiny_run, synthetic_root, tmp_path, capsys, monkeypatch):
    """NaN maps (diverged weights, an overflowing precision) reached the metrics, whose ValueError
    was an internal error with a traceback."""
    real = Detector.predict_batched

    def broken(self, images, *args, **kwargs):
        res = real(self, images, *args, **kwargs)
        res["maps"][3, 0, 0] = float("nan")
        return res

    monkeypatch.setattr(Detector, "predict_batched", broken)
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite maps or scores for 1 of 24 test images (the first: " in err and "\n" not in err
    assert not (tmp_path / "m.json").exists()
    # predict likewise, before any output: the image would have been written as not defective
    one = sorted((synthetic_root / "test" / "good").glob("*.png"))[:4]
    assert main(["predict", str(tiny_run), *map(str, one), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"NaN or infinite maps or scores for 1 of 4 images (the first: {one[3]}" in err and "\n" not in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["calibrate", "report", "audit"])
def test_commands_that_set_or_show_thresholds_name_the_images_a_broken_model_gives_nan(
        tiny_run, synthetic_root, tmp_path, capsys, monkeypatch, command):
    """calibrate and audit set thresholds from such maps, report draws their scores: each was an
    internal error with a traceback (the calibration's ValueError) or would have drawn a pass."""
    real = Detector._predict_batched  # what every scoring path of the Detector goes through

    def broken(self, images, *args, **kwargs):
        res = real(self, images, *args, **kwargs)
        res["scores"][-1] = float("nan")
        return res

    monkeypatch.setattr(Detector, "_predict_batched", broken)
    out = tmp_path / ("r.html" if command == "report" else "out")
    args = {"calibrate": [str(tiny_run), str(synthetic_root / "test" / "good")],
            "report": [str(tiny_run), str(synthetic_root)], "audit": [str(tiny_run)]}[command]
    assert main([command, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the model gives NaN or infinite maps or scores for " in err, err
    assert err.startswith(f"defect-fast: error: {tiny_run}"), err  # names the run and (the first) image
    assert "(the first: " + str(synthetic_root) in err, err
    assert not out.exists()


def _appears_during_the_write(monkeypatch, path: Path, text: str = "theirs") -> None:
    """Another process writes ``path`` while a file is written (at its fsync, after every check)."""
    import os

    real = os.fsync

    def fsync(fd):
        if not path.exists():
            path.write_text(text)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_evaluate_json_never_replaces_a_file_written_there_during_its_write(tiny_run, synthetic_root, tmp_path,
                                                                            capsys, monkeypatch):
    """The name was checked, then the metrics renamed over it: another evaluate's metrics written
    there meanwhile were replaced without --overwrite, both saying they wrote them."""
    import os

    path = tmp_path / "m.json"
    _appears_during_the_write(monkeypatch, path)
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--json {path}: a file appeared there while the test set was evaluated; not replacing it" in err
    assert path.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    # a predict that reserves the name during the write: refused, named as the option, with --overwrite too
    from defect_fast.safety import OutputFolder

    predict = OutputFolder.create(tmp_path / "P", command="predict", lock=True)
    monkeypatch.undo()
    real = os.fsync

    reserved = []

    def reserving(fd):  # at the metrics' write, after every check
        if not reserved:
            reserved.append(True)
            predict.reserve(["m.json"])
        real(fd)

    monkeypatch.setattr(os, "fsync", reserving)
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(predict.path / "m.json"),
                 "--overwrite"]) == 2
    assert f"--json {predict.path / 'm.json'}: is part of the output of 'defect-fast predict'" in capsys.readouterr().err
    predict.release()


def test_evaluate_reports_pass_fail_rates_and_never_replaces_json(tiny_run, synthetic_root, tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text("mine")
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and path.read_text() == "mine"
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--json", str(path), "--overwrite"]) == 0
    th = json.loads(path.read_text())["thresholds"]
    out = capsys.readouterr().out
    assert "F1-optimal image threshold" in out and "false-alarm rate" in out
    stored = Detector.load(tiny_run, device="cpu").calibration
    at = th["at_threshold"]
    assert at["threshold"] == stored["image_threshold"] and th["far_asked"] == 0.01
    assert th["threshold_image"] == stored["threshold_image"] and Path(stored["threshold_image"]).is_file()
    # training's thresholds are set by its held-back images (calibrate's by the images it is given)
    assert f"the threshold is the score of held-back image {stored['threshold_image']}\n" in out
    assert th["threshold_images"] == "held-back" and f" from {th['n_calibration_images']} held-back images)" in out
    assert at["n_good"] + at["n_defective"] == 24 and 0 <= at["false_alarm_rate"] <= 1
    # the thresholds printed read back as the same numbers: given as --threshold, they flag the same images
    line = next(ln for ln in out.splitlines() if ln.startswith("F1-optimal image threshold "))
    assert float(line.split()[3].rstrip(":")) == th["f1_optimal"]["threshold"]
    assert f"at that threshold {at['threshold']!r}: " in out
    # ... and evaluate takes one, as its messages for a run without a usable stored threshold ask
    best = th["f1_optimal"]["threshold"]
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--threshold", repr(best), "--json", str(path),
                 "--overwrite"]) == 0
    given = json.loads(path.read_text())["thresholds"]
    assert given["at_threshold"]["threshold"] == best and given["threshold_source"] == "given on the command line"
    assert given["far_asked"] is None
    printed = capsys.readouterr().out
    assert f"at that threshold {best!r}: false-alarm rate" in printed and "n/a" not in printed  # no rate was asked of it
    f1, at = given["f1_optimal"], given["at_threshold"]
    tp = at["n_defective"] - at["misses"]
    assert 2 * tp / (2 * tp + at["false_alarms"] + at["misses"]) == pytest.approx(f1["f1"])  # the optimum's images
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--threshold", "1", "--far", "0.1"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert 0 <= th["f1_optimal"]["f1"] <= 1


def test_predict_threshold_override_and_strict_json(tiny_run, synthetic_root, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_run), str(synthetic_root / "test" / "good"), "--out", str(out),
                 "--threshold", "-1"]) == 0
    report = json.loads((out / "scores.json").read_text())
    assert report["threshold"] == -1.0 and all(e["defective"] for e in report["images"])
    assert main(["predict", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "p2"), "--threshold", "nan"]) == 2
    assert "--threshold" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_far_sets_the_threshold_from_the_held_back_scores(tiny_run, synthetic_root, tmp_path, capsys):
    """predict and evaluate --far: the k-th largest stored held-back score judges; a rate the run's
    held-back images cannot give is one line naming the option and the run, before any output;
    --far and --threshold exclude each other."""
    cal = Detector.load(tiny_run, device="cpu").calibration
    n = cal["n_images"]
    far = 2 / (n + 1)  # the 2nd largest
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_run), str(synthetic_root / "test" / "good"), "--out", str(out), "--far", f"{far:.6f}"]) == 0
    report = json.loads((out / "scores.json").read_text())
    assert report["threshold"] == cal["held_back_scores"][1] and "far" in report["threshold_source"]
    assert report["threshold_image"] == cal["highest_scores"][1][0]  # named, as evaluate, report and watch name it
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "far.ts"),
                 "--far", f"{far:.6f}"]) == 0
    meta = json.loads((tmp_path / "far.ts.json").read_text())
    assert meta["thresholds"]["score"] == cal["held_back_scores"][1] and meta["threshold_image"] == report["threshold_image"]
    assert [e["defective"] for e in report["images"]] == [e["score"] > cal["held_back_scores"][1] for e in report["images"]]
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--far", f"{far:.6f}"]) == 0
    assert f"threshold: set after training for far {far:g}" in capsys.readouterr().out
    too_low = 0.5 / (n + 1)
    assert main(["predict", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "p2"), "--far", f"{too_low:.6f}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("defect-fast: error: --far") and str(tiny_run) in err and "needs at least" in err
    assert not (tmp_path / "p2").exists()
    assert main(["evaluate", str(tiny_run), str(synthetic_root), "--far", f"{too_low:.6f}"]) == 2
    assert "--far" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "p3"), "--far", "0.3",
                 "--threshold", "1"]) == 2
    assert "not allowed with" in capsys.readouterr().err and not (tmp_path / "p3").exists()
    # report and watch: the same threshold, the same refusal before anything is written
    assert main(["report", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "r.html"), "--far", f"{far:.6f}"]) == 0
    assert f"threshold {cal['held_back_scores'][1]:.6g} (set after training for far" in capsys.readouterr().out
    for argv in (["report", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "r2.html")],
                 ["watch", str(tiny_run), str(synthetic_root / "test" / "good"), "--out", str(tmp_path / "w"), "--once"]):
        assert main([*argv, "--far", f"{too_low:.6f}"]) == 2
        assert capsys.readouterr().err.startswith("defect-fast: error: --far")
    assert not (tmp_path / "r2.html").exists() and not (tmp_path / "w").exists()
    assert main(["watch", str(tiny_run), str(synthetic_root / "test" / "good"), "--out", str(tmp_path / "w2"), "--once",
                 "--far", f"{far:.6f}", "--device", "cpu"]) == 0
    assert f"(the score of held-back image {cal['highest_scores'][1][0]})" in capsys.readouterr().out
    status = json.loads((tmp_path / "w2" / "status.json").read_text())
    assert status["threshold"] == cal["held_back_scores"][1] and status["threshold_source"].startswith("set after training")


def test_damaged_old_and_foreign_model_files(tiny_run, synthetic_root, tmp_path, capsys):
    state = torch.load(tiny_run / "model.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in state["model_state"].items() if v.is_floating_point() and v.numel() > 100)
    damaged = dict(state, model_state=dict(state["model_state"]))
    damaged["model_state"][key] = damaged["model_state"][key].clone()
    damaged["model_state"][key].view(-1)[7] += 1.0
    torch.save(damaged, tmp_path / "damaged.pt")
    old = {k: v for k, v in state.items() if k != "tensor_digest"}
    torch.save(old, tmp_path / "old.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    for name, words in (("damaged.pt", "digest mismatch"), ("old.pt", "no tensor digest"), ("foreign.pt", "missing")):
        assert main(["evaluate", str(tmp_path / name), str(synthetic_root)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and words in err and "Traceback" not in err, err


def test_run_lock_refuses_a_second_process(tiny_run, synthetic_root, capsys, tmp_path):
    import shutil

    from defect_fast.safety import RunLock

    run = tmp_path / "run"  # an unfinished run: its checkpoint, no model file (a finished one resumes no more)
    shutil.copytree(tiny_run, run)
    (run / "model.pt").rename(run / "checkpoint.pt")
    with RunLock(run):
        assert main(["train", str(synthetic_root), "--out", str(run), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {os.getpid()}" in err and len(err.strip().splitlines()) == 1
        # --threads is no setting of the run: a resume takes it (it had been refused, "drop --threads")
        assert main(["train", str(synthetic_root), "--out", str(run), "--resume", "--quiet", "--threads", "1"]) == 2
        assert f"in use by PID {os.getpid()}" in capsys.readouterr().err


def test_numbers_and_devices_are_checked_while_parsing(synthetic_root, tmp_path, capsys):
    for bad, word in ((["--epochs", "0"], "--epochs"), (["--batch-size", "-4"], "--batch-size"),
                      (["--lr", "nan"], "--lr"), (["--device", "gpu"], "gpu"), (["--far", "1"], "--far"),
                      (["--far", "1e-320"], "--far: must be at least"), (["--holdback", "-0.1"], "--holdback")):
        assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "norun"), str(tmp_path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("defect-fast: error: ")


def test_predict_output_names_never_clash():
    from pathlib import Path

    from defect_fast.safety import output_stems as _output_stems

    paths = [Path("x/a.png"), Path("x/a.jpg"), Path("x/x_a_2.png"), Path("y/B.png"), Path("z/b.png")]
    stems = _output_stems(paths)
    assert len({s.lower() for s in stems}) == len(paths)
    # x_a_2.png keeps its own name: a number given to a clash is never another image's name
    assert stems[:3] == ["x_a", "x_a_3", "x_a_2"] and stems[3] == "B"
    assert _output_stems([Path("c/X.png"), Path("c/x.png"), Path("c/x_2.png")]) == ["X", "x_3", "x_2"]
    # a name made from a folder never takes the name an image has: a_x.png keeps "a_x"
    assert _output_stems([Path("a/x.png"), Path("b/x.png"), Path("c/a_x.png")]) == ["a_x_2", "b_x", "a_x"]
    # nor a name another clash has: x_2 is one of the second pair's
    assert _output_stems([Path("a/x.png"), Path("b/X.png"), Path("c/x_2.png"), Path("d/X_2.png")]) == [
        "x", "X_3", "x_2", "X_2_2"]
    long = [Path("d/" + "é" * 130 + c + ".png") for c in "xy"]  # 261 bytes each, alike in their first 260
    stems = _output_stems(long)
    assert len(set(stems)) == 2 and all(len(s.encode()) <= 200 for s in stems)


DEMO = ["--image-size", "64", "--epochs", "1", "--quiet"]


def test_demo_overwrite_keeps_the_files_it_did_not_write(tmp_path, capsys):
    """A user's files in a demo folder survive --overwrite (the demo once recorded the whole folder
    on a failure and removed it all); files inside what the demo writes make it refuse, in one line."""
    out = tmp_path / "demo"
    assert main(["demo", str(out), *DEMO]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "data" / "notes.txt").write_text("mine too")
    for _ in range(2):  # and again: the second demo did not take them for its own
        assert main(["demo", str(out), *DEMO, "--overwrite"]) == 0
        assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "notes.txt").read_text() == "mine too"
        assert (out / "run" / "model.pt").is_file()
    (out / "data" / "train" / "good" / "keep.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["demo", str(out), *DEMO, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defect-fast: error: output folder") and "data/train/good holds files" in err and "\n" not in err
    assert "(keep.png)" in err
    assert (out / "data" / "train" / "good" / "keep.png").read_bytes() == b"mine" and (out / "notes.txt").is_file()
    # refused before the earlier demo was cleared: its run, data and metrics are all still there
    assert (out / "run" / "model.pt").is_file() and (out / "metrics.json").is_file()
    assert len(list((out / "data" / "train" / "good").glob("*.png"))) > 1
    # an empty folder of the user's survives a clear as well: refused before it too
    (out / "data" / "train" / "good" / "keep.png").unlink()
    (out / "maps" / "mine").mkdir()
    assert main(["demo", str(out), *DEMO, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out / 'maps'} holds files defect-fast did not write (mine/)" in err and "\n" not in err
    assert (out / "run" / "model.pt").is_file() and (out / "maps" / "mine").is_dir()


def test_a_demo_that_fails_removes_only_its_own_files(tmp_path, monkeypatch, capsys):
    import defect_fast.train as train_mod
    from defect_fast.safety import UserError

    out = tmp_path / "demo"
    assert main(["demo", str(out), *DEMO]) == 0
    (out / "notes.txt").write_text("mine")

    def failing(cfg, run, **kw):
        raise UserError("no room on the device")

    monkeypatch.setattr(train_mod, "train", failing)
    assert main(["demo", str(out), *DEMO, "--overwrite"]) == 2
    assert "no room on the device" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "data").exists() and not (out / "run").exists()


def test_an_interrupted_demo_keeps_its_training_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo's training said "progress saved, continue with --resume" and then removed
    the folder; the run and its data now stay, and the resume the message names works."""
    import defect_fast.train as train_mod
    from defect_fast.safety import UserError

    real = train_mod.train

    def short(cfg, run, **kw):
        cfg.max_steps = [1] * len(cfg.epochs)
        return real(cfg, run, **kw)

    def interrupted(*args, **kw):  # stopped after training, before the model file: only the checkpoint is left
        raise UserError("interrupted at step 1; progress saved, continue with --resume")

    monkeypatch.setattr(train_mod, "train", short)
    monkeypatch.setattr(train_mod, "finish_run", interrupted)
    out = tmp_path / "my demo"  # the commands it names are quoted, to be pasted as they are
    assert main(["demo", str(out), *DEMO]) == 2
    err = capsys.readouterr().err
    assert "continue with --resume" in err and f"defect-fast demo '{out}' --overwrite starts over" in err
    assert f"defect-fast train '{out / 'data'}' --out '{out / 'run'}' --resume finishes it" in err
    assert (out / "run" / "checkpoint.pt").is_file() and (out / "data" / "train").is_dir()


def test_a_demo_stopped_after_its_training_says_what_is_kept(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the demo wrote its maps printed predict's advice (its --resume) glued to the
    training's ("train ... --resume finishes it"), which failed: the run was finished."""
    import defect_fast.train as train_mod
    from defect_fast import visualize

    real = train_mod.train

    def short(cfg, run, **kw):
        cfg.max_steps = [1] * len(cfg.epochs)
        return real(cfg, run, **kw)

    def pressed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", short)
    monkeypatch.setattr(visualize, "save_overlay", pressed)
    out = tmp_path / "demo"
    from defect_fast.safety import run_main

    assert run_main(main, ["demo", str(out), *DEMO]) == 130
    err = capsys.readouterr().err
    assert f"stopped after the training: the trained run is kept in {out / 'run'}" in err, err
    assert f"defect-fast demo {out} --overwrite starts over" in err and "--resume" not in err, err
    assert (out / "run" / "model.pt").is_file()


def test_a_second_demo_in_a_folder_in_use_is_refused_before_it_clears_anything(tmp_path, capsys):
    """demo --overwrite in a folder whose demo still ran cleared that demo's data/ and only then met
    the lock of its run/ (the first demo then failed: no test/ folder)."""
    from defect_fast.safety import RunLock

    import defect_fast.train as train_mod

    out = tmp_path / "demo"
    assert main(["demo", str(out), *DEMO]) == 0
    capsys.readouterr()
    real, seen = train_mod.train, {}

    def train(cfg, run, **kw):  # a second demo started while the first trains
        before = sorted(p.relative_to(out) for p in (out / "data").rglob("*"))
        seen["second"] = main(["demo", str(out), *DEMO, "--overwrite"])
        seen["err"] = capsys.readouterr().err
        seen["kept"] = sorted(p.relative_to(out) for p in (out / "data").rglob("*")) == before
        return real(cfg, run, **kw)

    train_mod.train = train
    try:
        assert main(["demo", str(out), *DEMO, "--overwrite"]) == 0
    finally:
        train_mod.train = real
    assert seen["second"] == 2 and f"in use by PID {os.getpid()}" in seen["err"] and seen["kept"], seen
    assert (out / "run" / "model.pt").is_file() and (out / "metrics.json").is_file()
    with RunLock(out):  # released at the end: held by nobody now
        pass


def test_predict_overwrite_never_replaces_a_user_file_named_like_an_output(tiny_run, synthetic_root, tmp_path, capsys):
    a, b = (synthetic_root / "test" / "spot" / "000.png"), (synthetic_root / "test" / "good" / "001.png")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), str(a), "--out", str(out)]) == 0
    (out / "maps" / "001_map.png").write_bytes(b"mine")  # the name b's map takes
    capsys.readouterr()
    assert main(["predict", str(tiny_run), str(b), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "001_map.png: exists and was not written by defect-fast" in err and "\n" not in err
    assert (out / "maps" / "001_map.png").read_bytes() == b"mine"
    assert not (out / "overlays" / "001_overlay.png").exists()
    # refused before the earlier output was cleared (it was removed, then the refusal came)
    assert json.loads((out / "scores.json").read_text())["images"][0]["image"] == str(a)
    assert (out / "maps" / "000_map.png").is_file() and (out / "overlays" / "000_overlay.png").is_file()


def test_predict_stopped_by_sigterm_leaves_no_half_written_output(tiny_run, synthetic_root, tmp_path):
    """SIGTERM (a service manager's stop) ended predict with a truncated PNG under its final name and
    a folder a rerun took for complete output: now it keeps the images it finished, as Ctrl-C does,
    with a scores.json that says it stopped, and then ends by the signal as before (a stop, not a
    failure, to a service manager); each PNG is written under a temporary name until it is complete,
    and the one cut short is not kept."""
    import signal
    import subprocess
    import sys

    images = sorted((synthetic_root / "test" / "scratch").glob("*.png"))[:3]
    out = tmp_path / "p"
    code = f"""
import os, pathlib, signal, sys
import defect_fast.visualize as vis
real_map, real_overlay, calls = vis.save_map, vis.save_overlay, []
def save_map(m, fh, scale, **kw):
    calls.append(fh)
    assert len(list(pathlib.Path({str(out)!r}).glob("maps/*_map.png"))) == len(calls) - 1  # final names: when complete
    real_map(m, fh, scale, **kw)
def save_overlay(img, m, fh, scale, **kw):
    real_overlay(img, m, fh, scale, **kw)
    if len(calls) == 2:
        fh.write(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
vis.save_map, vis.save_overlay = save_map, save_overlay
from defect_fast.cli import main
sys.exit(main({["predict", str(tiny_run), *map(str, images), "--out", str(out)]!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "stopped: the maps, overlays and scores of 1 of 3 image(s) are kept" in proc.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert scores["stopped"] == {"images_done": 1, "images_given": 3} and len(scores["images"]) == 1
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == [Path(scores["images"][0]["overlay"]).name]  # the half one: neither kept nor left as a temporary


def test_demo_overwrite_after_its_training_was_resumed_with_train(tmp_path, monkeypatch, capsys):
    """An interrupted demo resumed with `train --resume` (or killed mid-training) leaves run/ files the
    demo's manifest does not list, only the run's own: --overwrite now clears them through it."""
    import defect_fast.train as train_mod
    from defect_fast.safety import UserError

    real = train_mod.train

    def interrupted(cfg, run, **kw):
        cfg.max_steps = [1] * len(cfg.epochs)
        real(cfg, run, **kw)
        (Path(run) / "model.pt").unlink()
        raise UserError(f"interrupted at step 1; progress saved, continue with --resume (run folder {run})")

    out = tmp_path / "demo"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "train", interrupted)
        assert main(["demo", str(out), *DEMO]) == 2
    (out / "run" / "late.txt").write_text("x")  # what a resumed training writes, unknown to the demo
    runs = json.loads((out / "run" / ".defect_fast-manifest.json").read_text())
    runs["files"].append("late.txt")
    (out / "run" / ".defect_fast-manifest.json").write_text(json.dumps(runs))
    demo_manifest = json.loads((out / ".defect_fast-manifest.json").read_text())
    demo_manifest["files"] = [f for f in demo_manifest["files"] if not f.startswith("run/")]  # as after a kill -9
    (out / ".defect_fast-manifest.json").write_text(json.dumps(demo_manifest))
    capsys.readouterr()
    assert main(["demo", str(out), *DEMO, "--overwrite"]) == 0, capsys.readouterr().err
    assert (out / "run" / "model.pt").is_file() and not (out / "run" / "late.txt").exists()


RECOMMENDED = ["--image-size", "256", "--batch-size", "64", "--epochs", "1", "1", "--patch-sampling", "random",
               "--flips", "--lr-schedule", "cosine", "--set", "synthesis=perlin", "--map", "perceptual",
               "--infer-stride", "32", "--blend", "hann", "--smooth", "4", "--context", "--context-profile", "auto",
               "--level-brightness"]


def _train_config(argv, monkeypatch):
    """The TrainConfig ``defect-fast train`` builds from ``argv`` (training itself replaced)."""
    import defect_fast.train as train_mod

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, run, **kw: seen.append(cfg))
    assert main(["train", "DATA", "--out", "unused-run", *argv]) == 0
    return seen[0]


def test_the_photos_preset_is_the_recommended_command(monkeypatch, capsys):
    """--preset photos trains with the options of the README's recommended magnetic-tile command,
    names them on stderr, and lets any option given explicitly win."""
    assert _train_config(["--preset", "photos"], monkeypatch) == _train_config(RECOMMENDED, monkeypatch)
    err = capsys.readouterr().err
    assert "--image-size 256" in err and "--set synthesis=perlin and 2 epochs in all" in err and "instead" not in err
    cfg = _train_config(["--preset", "photos", "--smooth", "0", "--image-size", "512", "--set", "synthesis=paper",
                         "--set", "memory_size=100", "--epochs", "3"], monkeypatch)
    assert (cfg.smooth, cfg.image_size, cfg.epochs) == (0.0, 512, [3, 3])
    # the message names what the run takes from the preset, and what was given instead
    said = capsys.readouterr().err
    assert "--image-size 256" not in said and "synthesis=perlin" not in said and "epochs in all" not in said
    assert "--flips" in said and "(given instead: --image-size 512 --smooth 0)" in said
    assert cfg.model_kwargs == {"synthesis": "paper", "memory_size": 100}
    assert (cfg.map, cfg.context, cfg.infer_stride, cfg.flips, cfg.context_profile) == ("perceptual", True, 32, True, "auto")
    # a one-stage model: two epochs in all, and no synthetic anomalies to shape
    one = _train_config(["--preset", "photos", "--model", "ae-l2"], monkeypatch)
    assert one.epochs == [2] and one.model_kwargs == {} and one.context
    plain = _train_config([], monkeypatch)
    assert (plain.image_size, plain.map, plain.context, plain.epochs) == (512, "", False, [10, 10])
    assert plain.context_profile == "none" and not plain.level_brightness
    v4 = _train_config(["--preset", "photos", "--context-profile", "none", "--no-level-brightness"], monkeypatch)
    assert v4.context and v4.context_profile == "none" and v4.image_size == 256 and not v4.level_brightness  # v4
    assert _train_config(["--preset", "photos"], monkeypatch).level_brightness  # since v7
    assert _train_config(["--preset", "photos"], monkeypatch).image_score == "combined"
    assert _train_config(["--preset", "photos", "--image-score", "context"], monkeypatch).image_score == "context"
    assert _train_config(["--preset", "photos"], monkeypatch).placement == "cells"
    assert _train_config(["--preset", "photos", "--placement", "centres"], monkeypatch).placement == "centres"
    # the preset's switches can be turned off too (--no-flips was "unrecognized arguments")
    off = _train_config(["--preset", "photos", "--no-flips", "--no-context"], monkeypatch)
    assert not off.flips and not off.context and off.map == "perceptual" and off.image_size == 256
    assert off.context_profile == "none" and off.level_brightness  # the context's profile goes with it
    assert "(given instead: --no-flips --no-context)" in capsys.readouterr().err
    bare = _train_config(["--preset", "photos", "--no-context", "--map", "residual"], monkeypatch)
    assert (bare.context, bare.context_profile, bare.level_brightness) == (False, "none", False)
    assert ("--preset photos: --context-profile auto and --level-brightness left out: nothing in the run uses them "
            "(--no-context, --map residual)") in capsys.readouterr().err
    # typed, they stay (and the settings' own check says what is wrong with them)
    typed = _train_config(["--preset", "photos", "--no-context", "--map", "residual", "--level-brightness",
                           "--context-profile", "rows"], monkeypatch)
    assert (typed.context_profile, typed.level_brightness) == ("rows", True)
    from defect_fast.train import check_config

    check_config(off, 2, 64), check_config(bare, 2, 64)  # neither refused for what the preset set for the context


def test_a_preset_with_resume_is_refused(tmp_path, capsys):
    assert main(["train", "DATA", "--out", str(tmp_path / "run"), "--resume", "--preset", "photos"]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "--resume" in err and len(err.strip().splitlines()) == 1


def test_file_names_that_are_not_utf8_do_not_fail_a_command(synthetic_root, tmp_path):
    """A name that is not UTF-8 (a camera's Latin-1 "Prüf") printed on a strict UTF-8 stream raised
    UnicodeEncodeError after the work was done (train: after model.pt was written)."""
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    for i, good in enumerate(sorted((synthetic_root / "train" / "good").iterdir())[:8]):
        Path(os.fsdecode(os.fsencode(src) + b"/Pr\xfcf%d.png" % i)).write_bytes(good.read_bytes())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, "-m", "defect_fast", "train", str(src), "--out", str(tmp_path / "run"),
                        "--image-size", "64", "--batch-size", "8", "--max-steps", "1", "1", "--set", "memory_size=10",
                        "--quiet"], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"Pr\\udcfcf" in r.stdout  # the threshold's image, shown escaped, not a traceback


def test_info_reports_the_build_cache_and_what_precision_auto_picks(capsys):
    """info printed the extension's raw build facts: "source_digest": null beside a stamped build,
    no library path (where the build cache is), and nothing of the CPU's bf16 support, which
    decides what --precision auto picks."""
    from defect_fast.ops import _native
    from defect_fast.precision import cpu_flags, default_precision

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision_auto_cpu"] == default_precision("cpu")
    assert info["cpu_bf16_flags"] == sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    module, _reason = _native.load()
    if module is not None:
        assert info["native"]["path"] == module.__file__ and info["native"]["source_digest"]


def test_the_command_line_starts_without_importing_torch():
    """torch loads for a second: imported before run_main was entered (by the CLI module itself), a
    Ctrl-C in that second printed a traceback of torch's import instead of "interrupted"."""
    import subprocess
    import sys

    probe = "import sys, defect_fast.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_demo_image_size_this_process_cannot_hold_is_one_line(tmp_path, capsys):
    """numpy's MemoryError from the synthetic images' generation was printed as an internal error."""
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--model", "ae-l2", "--image-size", "200064", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "demo --image-size 200064: its 32 training images at 200064 x 200064 need" in err and "fewer" not in err
    assert not out.exists()


def test_a_whole_number_past_torch_s_sizes_is_refused_by_its_option(tmp_path, capsys):
    """--image-size 6400000000000000000000 (and export --batch as large) ended in an internal
    error, a TypeError from torch; a count past 2**63 is now refused by its option, in one line."""
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--image-size", "6400000000000000000000"]) == 2
    err = capsys.readouterr().err
    assert "argument --image-size: must be a whole number below 2**63, got '6400000000000000000000'" in err


def test_a_model_option_torch_cannot_take_is_one_line_without_its_backtrace(tmp_path, capsys):
    """--set memory_size=99999999999999999999999 put torch's C++ backtrace ("Exception raised from
    ... frame #0: c10::Error::Error...") inside the one line."""
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "memory_size=99999999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Overflow when unpacking long long" in err
    assert "Exception raised from" not in err and "frame #" not in err


def test_an_unknown_option_points_to_the_help_of_its_command(tmp_path, capsys):
    """`audit RUN --out X --bogus` pointed to 'defect-fast --help', which does not list audit's options."""
    for command in (["audit", "run", "--out", "x"], ["predict", "run", "a.png", "--out", "x"]):
        assert main([*command, "--bogus"]) == 2
        assert capsys.readouterr().err.strip() == (f"defect-fast: error: unrecognized arguments: --bogus "
                                                   f"(see 'defect-fast {command[0]} --help')")
    assert main(["--bogus", "audit", "run", "--out", "x"]) == 2  # given to the top level: its help
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --bogus (see 'defect-fast --help')")


def test_train_options_that_would_be_ignored_or_disagree_are_refused(synthetic_root, tmp_path, capsys):
    """--set map=residual --map ssim trained with ssim while config.json kept residual; --fit-on
    held-back without a map statistic to fit changed nothing. Both are refused before any work."""
    out = tmp_path / "r"
    assert main(["train", str(synthetic_root), "--out", str(out), "--set", "map=residual", "--map", "ssim"]) == 2
    assert "--set map=residual and --map ssim name two maps" in capsys.readouterr().err
    assert main(["train", str(synthetic_root), "--out", str(out), "--fit-on", "held-back"]) == 2
    assert "--fit-on held-back chooses the images --map perceptual and --normalize position fit" in capsys.readouterr().err
    assert not out.exists()


def test_a_preset_summary_names_a_negated_option_as_it_is_typed(tmp_path, capsys):
    """The summary said "(given instead: no --level-brightness)", an option that does not exist."""
    main(["train", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--preset", "photos", "--no-level-brightness"])
    assert "(given instead: --no-level-brightness)" in capsys.readouterr().err


def test_evaluate_says_an_f1_optimal_threshold_means_nothing_without_defect_free_images(capsys):
    """A test set of defective images only printed "F1 1, precision 1, recall 1" (flagging every
    image); report leaves the line out. evaluate says why there is none."""
    from defect_fast.calibration import evaluate_thresholds
    from defect_fast.cli import _print_thresholds

    only_bad = evaluate_thresholds(torch.tensor([0.3, 0.5]), torch.tensor([1, 1]))
    assert only_bad["n_good"] == 0
    _print_thresholds(only_bad)
    assert capsys.readouterr().out.splitlines()[0] == ("F1-optimal image threshold: n/a, the test set holds no "
                                                       "defect-free image")
    both = evaluate_thresholds(torch.tensor([0.1, 0.5]), torch.tensor([0, 1]))
    _print_thresholds(both)
    assert capsys.readouterr().out.startswith("F1-optimal image threshold 0.1") and both["n_good"] == 1


def test_an_unknown_option_after_a_double_dash_is_named_without_it(tmp_path, capsys):
    assert main(["audit", "run", "--out", "x", "--", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus (see" in capsys.readouterr().err


def test_training_progress_is_plain_lines_where_stderr_is_no_terminal(synthetic_root, tmp_path, capsys, monkeypatch):
    """A training run by a service or into a log file wrote tqdm's bar, redrawn after carriage
    returns, as one line growing all training; it writes a plain line per minute and one per stage."""
    from defect_fast import train

    assert main(["train", str(synthetic_root), "--out", str(tmp_path / "run"), "--image-size", "128", "--batch-size",
                 "16", "--max-steps", "2", "1", "--set", "memory_size=10"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, err[:500]
    lines = [ln for ln in err.splitlines() if ln.startswith("stage ")]
    assert len(lines) == 2 and lines[0].startswith("stage 1/2 (") and ": 2/2 steps, loss " in lines[0], err
    assert lines[1].startswith("stage 2/2 (") and ": 1/1 steps, loss " in lines[1], err
    # on a terminal: tqdm's bar, as before
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(train._progress(3, 0, "stage 1/1", True), train.tqdm)
    assert isinstance(train._progress(3, 0, "stage 1/1", False), train.tqdm)  # --quiet: tqdm, disabled
