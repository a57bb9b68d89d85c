"""``defect-fast calibrate``: thresholds set again from defect-free images a run has not seen.

Two tiny runs (CMA-AE, 64 px, one step per stage) on a 64 px synthetic set: one with the default
map, one whose per-position normalisation is fitted on half of its held-back images. New
defect-free images come from the same generator with another seed.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from defect_fast.cli import main
from defect_fast.data.io import read_images
from defect_fast.detect import Detector
from defect_fast.runs import RunError, load_model_state
from defect_fast.safety import MANIFEST_NAME, save_with_digest
from test_cli_inspection import cli, refused  # noqa: E402  (the same refusal checks as the other line commands)

SIZE = 64
TRAIN = ["--image-size", str(SIZE), "--batch-size", "4", "--max-steps", "1", "--set", "memory_size=10", "--quiet",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from defect_fast.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("recalibrate")
    data = make_synthetic_dataset(root / "data", size=SIZE, seed=0)
    more = make_synthetic_dataset(root / "more", size=SIZE, seed=1, n_train=120, n_test_good=1, n_test_defect=1)
    run, halves = root / "run", root / "run-halves"
    assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
    assert main(["train", str(data), "--out", str(halves), "--normalize", "position", "--fit-on", "held-back", *TRAIN]) == 0
    return {"data": data, "more": more / "train" / "good", "run": run, "halves": halves}


def _older_file(run: Path, folder: Path) -> Path:
    """A copy of ``run``'s model file in ``folder`` as written before training recorded the keys of its images."""
    state = load_model_state(run)
    state.pop("image_keys")
    state.pop("tensor_digest", None)
    folder.mkdir()
    save_with_digest(state, folder / "model.pt")
    return folder


def test_thresholds_say_the_precision_they_were_measured_in_and_calibrate_measures_them_in_another(
        runs, tmp_path, capsys):
    """A float32 export of a run calibrated in bf16 carried its bf16 thresholds without a word (an
    image context's scores moved by 5 %: the held-back image at the threshold was flagged). The model
    file records the precision; loading it to compute in another warns, naming the remedy, which
    calibrate --precision gives."""
    import warnings

    default = Detector.load(runs["run"], device="cpu").precision
    other = "float32" if default == "bfloat16" else "bfloat16"
    assert load_model_state(runs["run"])["calibration"]["precision"] == default
    with pytest.warns(UserWarning, match=f"its thresholds were measured in {default}; this Detector computes in {other}.*"
                                         f"calibrate RUN IMAGES --precision {other} --out NEW_RUN") as said:
        Detector.load(runs["run"], device="cpu", precision=other)
    assert [w.filename for w in said] == [__file__]  # the caller's line, not one inside the package
    out = tmp_path / "cal"
    status, _stdout, err = cli(["calibrate", runs["run"], "--with-held-back", "--out", out, "--device", "cpu",
                                "--precision", other], capsys)
    assert status == 0 and "measured in" not in err, err
    assert load_model_state(out)["calibration"]["precision"] == other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Detector.load(out, device="cpu", precision=other)  # its own: nothing to say
        Detector.load(runs["run"], device="cpu", stride=32)  # set aside with other settings: said otherwise


def test_held_back_alone_gives_the_stored_thresholds(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    status, stdout, err = cli(["calibrate", runs["run"], "--with-held-back", "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    before, after = (load_model_state(p)["calibration"] for p in (runs["run"], out))
    for key in ("image_threshold", "pixel_threshold", "score_max"):
        assert after[key] == pytest.approx(before[key], rel=1e-5), key
    assert after["held_back_scores"] == pytest.approx(before["held_back_scores"], rel=1e-5)
    assert after["threshold_image"] == before["threshold_image"] and after["n_images"] == before["n_images"] == 4
    assert "warning" in err and "needs at least 99" in err  # too few for the run's rate: the fallback, said
    assert "4 images the run held back" in stdout
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["before"]["image_threshold"] == before["image_threshold"]
    assert sorted(json.loads((out / MANIFEST_NAME).read_text())["files"]) == ["calibration.json", "model.pt"]


def test_more_images_reach_the_rate_and_leave_the_scores_alone(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    status, stdout, err = cli(["calibrate", runs["run"], runs["more"], "--with-held-back", "--out", out,
                               "--device", "cpu"], capsys)
    assert status == 0, err
    assert "warning" not in err
    cal = load_model_state(out)["calibration"]
    assert cal["n_images"] == 124 and cal["sufficient"] and cal["rank"] == 1  # floor(0.01 * 125) = 1
    assert cal["far_expected"] == pytest.approx(1 / 125)
    assert cal["source"] == "120 defect-free images given to calibrate and 4 images the run held back"
    assert cal["calibrated_from"]["image_threshold"] == load_model_state(runs["run"])["calibration"]["image_threshold"]
    assert cal["image_threshold"] == max(cal["held_back_scores"]) and len(cal["held_back_scores"]) == 124
    # what the run's own threshold would have done on these defect-free images, said and recorded
    was = cal["calibrated_from"]["image_threshold"]
    flagged = sum(1 for v in cal["held_back_scores"] if v > was)
    # (held-back images among them: said, the 124 are not all the images given)
    assert (f"at the run's threshold {was!r}, {flagged} of these 124 defect-free images (120 defect-free images "
            "given to calibrate and 4 images the run held back) would be flagged") in stdout
    assert json.loads((out / "calibration.json").read_text())["before"]["flagged_here"] == flagged
    # the weights and the map are the run's: every image scores the same under both files
    images = read_images(sorted((runs["data"] / "test" / "scratch").glob("*.png"))[:4], SIZE)
    a, b = (Detector.load(r, device="cpu").predict_batched(images) for r in (runs["run"], out))
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["maps"], b["maps"])
    # and --far now has the images for lower rates than the run alone could give
    status, stdout, err = cli(["evaluate", out, runs["data"], "--far", "0.02", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "2nd largest of 124" in stdout


def test_a_threshold_raised_far_above_the_run_s_is_warned_of(runs, tmp_path, capsys):
    """Defective parts given as defect-free set a threshold 26 times the run's on a line's photos,
    said on standard output only: every defect scoring below it then passed. More defect-free
    images raise it by a fraction of the run's spread, and are not warned of."""
    import statistics

    from defect_fast.recalibrate import RAISED

    out = tmp_path / "cal"
    defective = runs["data"] / "test" / "scratch"
    status, _stdout, err = cli(["calibrate", runs["run"], defective, "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    cal, run = load_model_state(out)["calibration"], load_model_state(runs["run"])["calibration"]
    was = run["image_threshold"]
    rise = (cal["image_threshold"] - was) / (was - statistics.median(run["held_back_scores"]))
    assert rise > 2 * RAISED, rise  # (far above: not a matter of rounding)
    assert (f"defect-fast: warning: {out / 'model.pt'}: its image threshold {cal['image_threshold']!r} is above the "
            f"run's {was!r} by {rise:.1f} times the run's spread of defect-free scores (from their middle up to its "
            f"threshold, or their standard deviation), set by {cal['threshold_image']}: a changed line, or defective "
            "parts among the images given as defect-free? Look at the highest scoring ones before judging by it") in err
    status, _stdout, err = cli(["calibrate", runs["run"], runs["more"], "--with-held-back", "--out", tmp_path / "more",
                                "--device", "cpu"], capsys)
    assert status == 0 and "spread of defect-free scores" not in err, err


def test_the_rise_of_a_threshold_is_measured_in_the_run_s_spread_not_as_a_ratio():
    """An image context's scores are centred on 0: a normal calibrate of a --context run (the
    photos preset) with new line images doubled its threshold, 1.1 -> 2.7, and was warned of as
    defective parts; that rise is one spread of its defect-free scores."""
    from defect_fast.recalibrate import RAISED, _rise

    context_run = {"image_threshold": 1.096, "held_back_scores": [-0.9, -0.43, -0.2, 1.096]}
    assert _rise(context_run, 2.667) == pytest.approx((2.667 - 1.096) / (1.096 + 0.315))
    assert _rise(context_run, 2.667) < RAISED
    assert _rise(context_run, 1.096 + 4 * 1.411) > RAISED
    assert _rise({**context_run, "inapplicable": "other settings"}, 9.0) is None
    # a run that held none back: its thresholds' scores are of its training images, optimistic
    assert _rise({**context_run, "source": "training images"}, 9.0) is None
    assert _rise({"image_threshold": 1.0}, 9.0) is None  # nothing of its scores: not known
    # older files: their scores' mean; a threshold not above the middle (a high --far): their spread
    assert _rise({"image_threshold": 1.0, "score_mean": 0.5}, 3.0) == pytest.approx(4.0)
    assert _rise({"image_threshold": 1.0, "held_back_scores": [1.0, 1.0], "score_std": 0.25}, 3.0) == pytest.approx(8.0)
    assert _rise({"image_threshold": 1.0, "held_back_scores": [1.0, 1.0], "score_std": 0.0}, 3.0) is None


def test_a_calibrated_run_is_calibrated_again_at_its_own_rate(runs, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    status, _stdout, err = cli(["calibrate", runs["run"], runs["more"], "--with-held-back", "--far", "0.05",
                                "--out", first, "--device", "cpu"], capsys)
    assert status == 0, err
    assert load_model_state(first)["calibration"]["far"] == 0.05
    # no --far: the rate the file's thresholds were set at, not the 0.01 the run was trained with
    status, stdout, err = cli(["calibrate", first, "--with-held-back", "--out", second, "--device", "cpu"], capsys)
    assert status == 0, err
    assert load_model_state(second)["calibration"]["far"] == 0.05
    assert "far=0.05 needs at least 19" in err and "the run asked for 5 %" in stdout
    # the images given to the first, which only it was given, are said to be left out (they were, quietly)
    assert (f"{first}: its thresholds rested on 120 image(s) not given now (given to an earlier calibrate: the model "
            "file keeps digests of their pixels, not their files), which the new thresholds leave out; give them "
            "again to keep them in") in stdout
    status, stdout, err = cli(["calibrate", first, runs["more"], "--with-held-back", "--out", tmp_path / "third",
                               "--device", "cpu"], capsys)
    assert status == 0 and "not given now" not in stdout, err


def test_rate_asked_for_needs_the_images(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    refused(*cli(["calibrate", runs["run"], runs["more"], "--far", "0.005", "--out", out, "--device", "cpu"], capsys)[::2],
            "--far 0.005", "199", "120")
    assert not out.exists()


def test_images_the_run_trained_on_are_refused(runs, tmp_path, capsys):
    out, mixed = tmp_path / "cal", tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(runs["more"].glob("*.png"))[:5]:
        shutil.copy(p, mixed / f"new_{p.name}")
    held = set(load_model_state(runs["run"])["held_back"])
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][0]
    shutil.copy(trained, mixed / "renamed_copy.png")  # found by its pixels, not its name
    refused(*cli(["calibrate", runs["run"], mixed, "--out", out, "--device", "cpu"], capsys)[::2],
            "1 of the images", "renamed_copy.png", "trained on")
    assert not out.exists()
    # the run's own held-back images, given as files, are not training images
    status, _stdout, err = cli(["calibrate", runs["run"], *sorted(held), "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err


def test_fitted_half_of_the_held_back_images_stays_out(runs, tmp_path, capsys):
    state = load_model_state(runs["halves"])
    held = list(state["held_back"])
    out = tmp_path / "cal"
    status, stdout, err = cli(["calibrate", runs["halves"], "--with-held-back", "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    cal = load_model_state(out)["calibration"]
    assert cal["n_images"] == 2 == state["calibration"]["n_images"]
    assert cal["image_threshold"] == pytest.approx(state["calibration"]["image_threshold"], rel=1e-5)
    refused(*cli(["calibrate", runs["halves"], held[0], "--out", tmp_path / "cal2", "--device", "cpu"], capsys)[::2],
            "fitted its map on", Path(held[0]).name)


def test_identical_images_count_once(runs, tmp_path, capsys):
    src = tmp_path / "twins"
    src.mkdir()
    files = sorted(runs["more"].glob("*.png"))[:3]
    for p in files:
        shutil.copy(p, src / p.name)
    shutil.copy(files[0], src / "again.png")
    status, stdout, err = cli(["calibrate", runs["run"], src, "--out", tmp_path / "cal", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "1 image(s) are identical to another given one" in stdout and "again.png" in stdout
    assert load_model_state(tmp_path / "cal")["calibration"]["n_images"] == 3
    # with the held-back images too, each kind is counted apart (the twin is neither)
    status, _stdout, err = cli(["calibrate", runs["run"], src, "--with-held-back", "--out", tmp_path / "cal2",
                                "--device", "cpu"], capsys)
    assert status == 0, err
    cal = load_model_state(tmp_path / "cal2")["calibration"]
    assert cal["source"] == "3 defect-free images given to calibrate and 4 images the run held back"


def test_outputs_are_never_replaced_silently(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    args = ["calibrate", runs["run"], runs["more"], "--out", out, "--device", "cpu"]
    assert cli(args, capsys)[0] == 0
    first = (out / "model.pt").read_bytes()
    refused(*cli(args, capsys)[::2], "--overwrite")
    assert (out / "model.pt").read_bytes() == first
    assert cli([*args, "--overwrite"], capsys)[0] == 0
    # a folder of the user's, or a run that train wrote, is never a calibrate output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(*cli(["calibrate", runs["run"], runs["more"], "--out", mine, "--device", "cpu"], capsys)[::2], "not empty")
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    refused(*cli(["calibrate", runs["run"], runs["more"], "--out", runs["halves"], "--overwrite", "--device", "cpu"],
                 capsys)[::2], "defect-fast train")
    # the run itself is an input
    refused(*cli(["calibrate", runs["run"], runs["more"], "--out", runs["run"], "--device", "cpu"], capsys)[::2],
            str(runs["run"]))
    # and so is its training folder, where its held-back images are
    inside = runs["data"] / "train" / "good" / "cal"
    refused(*cli(["calibrate", runs["run"], "--with-held-back", "--out", inside, "--device", "cpu"], capsys)[::2],
            "lies inside the input")
    assert not inside.exists()


def test_nothing_to_calibrate_on_and_missing_held_back(runs, tmp_path, capsys):
    refused(*cli(["calibrate", runs["run"], "--out", tmp_path / "cal"], capsys)[::2], "--with-held-back")
    state = load_model_state(runs["run"])
    gone = tmp_path / "gone"
    state["held_back"] = [str(tmp_path / "nowhere" / Path(p).name) for p in state["held_back"]]
    state.pop("tensor_digest", None)
    gone.mkdir()
    save_with_digest(state, gone / "model.pt")
    refused(*cli(["calibrate", gone, "--with-held-back", "--out", tmp_path / "cal"], capsys)[::2],
            "4 of its 4 held-back images are gone")
    assert not (tmp_path / "cal").exists()


def test_held_back_files_that_changed_since_training_are_refused(runs, tmp_path, capsys):
    """Only the held-back files' names were checked: another part written over one of them (a
    camera's numbering restarted) set the thresholds as if it were one of the run's images."""
    import shutil

    state = load_model_state(runs["run"])
    held = tmp_path / "held"
    held.mkdir()
    state["held_back"] = [str(shutil.copy(p, held / Path(p).name)) for p in state["held_back"]]
    state.pop("tensor_digest", None)
    moved = tmp_path / "moved"
    moved.mkdir()
    save_with_digest(state, moved / "model.pt")
    status, _out, err = cli(["calibrate", moved, "--with-held-back", "--out", tmp_path / "same", "--device", "cpu"], capsys)
    assert status == 0, err  # the same pixels under other names: the run's images
    other = sorted(Path(runs["more"]).iterdir())[0]
    shutil.copy(other, state["held_back"][1])
    refused(*cli(["calibrate", moved, "--with-held-back", "--out", tmp_path / "cal", "--device", "cpu"], capsys)[::2],
            "1 of its held-back images changed since the run held them back", Path(state["held_back"][1]).name)
    assert not (tmp_path / "cal").exists()


def test_the_model_file_records_what_the_run_has_seen(runs, tmp_path, capsys):
    """Training records the pixel keys of its images, so the check needs no training folder; a
    model file written before that record is checked against the folder, and a warning says when
    the folder is gone."""
    state = load_model_state(runs["run"])
    assert len(state["image_keys"]["trained"]) == 28 and len(state["image_keys"]["held_back"]) == 4
    held = set(state["held_back"])
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][0]
    cfg = dict(state["train_config"])
    cfg["data"] = str(tmp_path / "moved-away")
    state["train_config"] = cfg
    state.pop("tensor_digest", None)
    moved = tmp_path / "moved"
    moved.mkdir()
    save_with_digest(state, moved / "model.pt")
    refused(*cli(["calibrate", moved, trained, "--out", tmp_path / "cal", "--device", "cpu"], capsys)[::2],
            "trained on", trained.name)
    # an older file: no record, the training folder gone
    state.pop("image_keys")
    older = tmp_path / "older"
    older.mkdir()
    save_with_digest(state, older / "model.pt")
    status, _stdout, err = cli(["calibrate", older, runs["more"], "--out", tmp_path / "cal", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "could not check that the images were not trained on" in err and "moved-away" in err


def test_training_with_too_few_held_back_images_points_to_calibrate(runs, tmp_path, capsys):
    status, stdout, err = cli(["train", runs["data"], "--out", tmp_path / "run", *TRAIN], capsys)
    assert status == 0, err
    assert "needs at least 99" in err  # the fallback to the largest held-back score, said as before
    line = next(ln for ln in stdout.splitlines() if "defect-fast calibrate" in ln)
    assert line.startswith("95 more defect-free images") and "--with-held-back" in line and "far 0.01" in line


def test_the_report_says_which_images_the_thresholds_rest_on(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    assert cli(["calibrate", runs["run"], runs["more"], "--with-held-back", "--out", out, "--device", "cpu"], capsys)[0] == 0
    for run, said in ((out, "120 defect-free images given to calibrate and 4 images the run held back"),
                      (runs["run"], "held-back images")):
        page = tmp_path / f"{run.name}.html"
        status, _stdout, err = cli(["report", run, runs["data"], "--out", page, "--device", "cpu"], capsys)
        assert status == 0, err
        text = page.read_text()
        assert "defect-free images the thresholds rest on" in text and said in text


def test_the_held_back_half_the_map_was_fitted_on_is_read_from_the_file():
    """finish_run fits the map statistics on half of the held-back images with --fit-on held-back,
    and also with --fit-on train when fewer than 2 images were trained on: the file's
    map_fitted_on says which, so --with-held-back never calibrates on images the map was fitted on."""
    from types import SimpleNamespace

    from defect_fast.recalibrate import _fit_half

    held = ["a", "b", "c", "d"]
    on_train = SimpleNamespace(fit_on="train")
    assert _fit_half(held, {"calibration": {"map_fitted_on": "4 held-back images"}}, on_train) == (["a", "c"], ["b", "d"])
    assert _fit_half(held, {"calibration": {"map_fitted_on": "30 training images"}}, on_train) == ([], held)
    assert _fit_half(held, {"calibration": {"map_fitted_on": None}}, SimpleNamespace(fit_on="held-back")) == ([], held)
    # files from before map_fitted_on: the run's setting, and whether a map was fitted at all
    older = SimpleNamespace(fit_on="held-back")
    assert _fit_half(held, {"perceptual": {"x": 1}, "calibration": {}}, older) == (["a", "c"], ["b", "d"])
    assert _fit_half(held, {"calibration": {}}, older) == ([], held)


def test_blank_frames_are_left_out_of_the_thresholds(runs, tmp_path, capsys):
    """A black frame among the defect-free images set the image threshold by its score (8 times the
    parts'); watch never judges such a frame (a camera fault), so calibrate and training's end leave
    them out, and say so."""
    import numpy as np
    from PIL import Image

    from defect_fast.train import TrainConfig, finish_run

    folder = tmp_path / "good"
    folder.mkdir()
    parts = sorted(runs["more"].glob("*.png"))[:4]
    for p in parts:
        shutil.copy(p, folder / p.name)
    Image.new("RGB", (SIZE, SIZE)).save(folder / "black.png")
    status, stdout, _err = cli(["calibrate", runs["run"], folder, "--out", tmp_path / "cal", "--device", "cpu"], capsys)
    assert status == 0 and "1 blank frame(s), one colour throughout, are left out" in stdout and "black.png" in stdout
    cal = load_model_state(tmp_path / "cal")["calibration"]
    assert cal["n_images"] == 4 and "black.png" not in json.dumps(cal)
    for p in parts:
        (folder / p.name).unlink()
    status, _stdout, err = cli(["calibrate", runs["run"], folder, "--out", tmp_path / "cal2", "--device", "cpu"], capsys)
    assert status == 2 and err.splitlines()[-1] == ("defect-fast: error: calibrate: every one of the 1 images is a "
                                                    "blank frame, one colour throughout (a failed exposure, a covered "
                                                    "lens?); give photographs of defect-free parts")
    assert not (tmp_path / "cal2").exists()

    state = load_model_state(runs["run"])
    det = Detector.load(runs["run"], device="cpu")
    held = read_images(parts, SIZE)
    black = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    cfg = TrainConfig.from_json(state["train_config"])
    cfg.held_back = [str(p) for p in parts] + [str(folder / "black.png")]
    finished = finish_run(det.model, cfg, torch.cat([held, black]), where="run")
    err = capsys.readouterr().err
    assert "run: 1 of the 5 held-back images the thresholds are set on are blank frames" in err and "(black.png)" in err
    assert finished["calibration"]["n_images"] == 4 and "black.png" not in json.dumps(finished["calibration"])


def test_a_far_that_needs_one_image_more_than_given_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    # 120 images; far 0.0082 needs ceil(1/0.0082) - 1 = 121
    status, _stdout, err = cli(["calibrate", runs["run"], runs["more"], "--far", "0.0082", "--out", out, "--device", "cpu"],
                               capsys)
    refused(status, err, "--far 0.0082", "121", "120")
    lowest = err.strip().rsplit(" = ", 1)[1]  # the lowest rate it names, given back, is taken
    assert float(lowest) >= 1 / 121
    assert cli(["calibrate", runs["run"], runs["more"], "--far", lowest, "--out", out, "--device", "cpu"], capsys)[0] == 0


def test_an_older_file_still_refuses_the_held_back_images_its_map_was_fitted_on(runs, tmp_path, capsys):
    """A model file written before the image keys were recorded: the training folder is read again
    to know which images the map statistics saw."""
    held = list(load_model_state(runs["halves"])["held_back"])
    older = _older_file(runs["halves"], tmp_path / "older")
    refused(*cli(["calibrate", older, held[0], "--out", tmp_path / "cal", "--device", "cpu"], capsys)[::2],
            "fitted its map on", Path(held[0]).name)


def _test_set_with(runs, tmp_path, copies: dict[str, Path]) -> Path:
    """The run's data root copied, with ``copies`` (name -> file) added to its test/good/."""
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    for name, src in copies.items():
        shutil.copy(src, data / "test" / "good" / name)
    return data


def test_evaluate_names_test_images_the_run_has_seen(runs, tmp_path, capsys):
    """A test image the run trained on inflates the metrics, one its thresholds were set on the
    false-alarm rate at them: evaluate names each, found by its pixels, and records them."""
    state = load_model_state(runs["run"])
    held = sorted(state["held_back"])
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][0]
    data = _test_set_with(runs, tmp_path, {"copy_of_trained.png": trained, "copy_of_held.png": held[0]})
    status, stdout, err = cli(["evaluate", runs["run"], data, "--device", "cpu", "--json", tmp_path / "m.json"], capsys)
    assert status == 0, err
    seen = json.loads((tmp_path / "m.json").read_text())["seen_by_run"]
    assert [Path(p).name for p in seen["trained"]] == ["copy_of_trained.png"]
    assert [Path(p).name for p in seen["thresholds"]] == ["copy_of_held.png"]
    trained_line = next(ln for ln in err.splitlines() if "copy_of_trained.png" in ln)
    assert "warning" in trained_line and "trained on" in trained_line and "metrics are optimistic" in trained_line
    held_line = next(ln for ln in err.splitlines() if "copy_of_held.png" in ln)
    assert "thresholds were set on" in held_line and "copy_of_trained" not in held_line
    # diagnose's AUROC table too (it judges by no threshold)
    status, _stdout, err = cli(["diagnose", runs["run"], data, "--device", "cpu", "--out", tmp_path / "diag"], capsys)
    assert status == 0, err
    assert "copy_of_trained.png" in err and "metrics are optimistic" in err and "copy_of_held.png" not in err
    # another threshold than the stored ones: the rates do not rest on those images, the record stays
    status, _stdout, err = cli(["evaluate", runs["run"], data, "--device", "cpu", "--threshold", "1"], capsys)
    assert status == 0, err
    assert "copy_of_trained.png" in err and "copy_of_held.png" not in err
    # the run's own test set: nothing seen, nothing said
    status, _stdout, err = cli(["evaluate", runs["run"], runs["data"], "--device", "cpu", "--json", tmp_path / "c.json"],
                               capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["seen_by_run"] == {"trained": [], "thresholds": []}
    assert "found by their pixels" not in err


def test_a_calibrated_file_records_the_images_its_thresholds_rest_on(runs, tmp_path, capsys):
    out = tmp_path / "cal"
    assert cli(["calibrate", runs["run"], runs["more"], "--out", out, "--device", "cpu"], capsys)[0] == 0
    keys = load_model_state(out)["image_keys"]
    assert len(keys["calibrated"]) == 120 and keys["trained"] == load_model_state(runs["run"])["image_keys"]["trained"]
    given = sorted(runs["more"].glob("*.png"))[7]
    held = sorted(load_model_state(runs["run"])["held_back"])[0]
    data = _test_set_with(runs, tmp_path, {"line_part.png": given, "held_part.png": held})
    status, _stdout, err = cli(["evaluate", out, data, "--device", "cpu", "--json", tmp_path / "m.json"], capsys)
    assert status == 0, err
    seen = json.loads((tmp_path / "m.json").read_text())["seen_by_run"]
    # the thresholds now rest on the images given to calibrate, not on the run's held-back ones
    assert [Path(p).name for p in seen["thresholds"]] == ["line_part.png"] and seen["trained"] == []
    assert "line_part.png" in err and "held_part.png" not in err


def test_a_model_file_without_the_record_is_evaluated_unchecked(runs, tmp_path, capsys):
    older = _older_file(runs["run"], tmp_path / "older")
    status, _stdout, err = cli(["evaluate", older, runs["data"], "--device", "cpu", "--json", tmp_path / "m.json"], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["seen_by_run"] is None


def test_a_file_trained_before_the_record_names_its_calibration_images_once_calibrated(runs, tmp_path, capsys):
    """calibrate records the keys of its images also in a file whose training recorded none: evaluate
    names them (which images it trained on, that file cannot say)."""
    older = _older_file(runs["run"], tmp_path / "older")
    out = tmp_path / "cal"
    assert cli(["calibrate", older, runs["more"], "--out", out, "--device", "cpu"], capsys)[0] == 0
    data = _test_set_with(runs, tmp_path, {"line_part.png": sorted(runs["more"].glob("*.png"))[3]})
    status, _stdout, err = cli(["evaluate", out, data, "--device", "cpu", "--json", tmp_path / "m.json"], capsys)
    assert status == 0, err
    seen = json.loads((tmp_path / "m.json").read_text())["seen_by_run"]
    assert seen["trained"] is None and [Path(p).name for p in seen["thresholds"]] == ["line_part.png"]
    assert "line_part.png) is one its thresholds were set on" in err


def test_the_report_names_images_the_run_has_seen(runs, tmp_path, capsys):
    """The page carries what evaluate says on stderr: a shared report outlives the terminal."""
    held = set(load_model_state(runs["run"])["held_back"])
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][0]
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(trained, folder / "copy_of_trained.png")
    shutil.copy(sorted(runs["more"].glob("*.png"))[0], folder / "new.png")
    page = tmp_path / "page.html"
    status, _stdout, err = cli(["report", runs["run"], folder, "--out", page, "--device", "cpu"], capsys)
    assert status == 0, err
    assert "1 of the 2 images (" in err and "copy_of_trained.png) is one the run trained on" in err
    text = page.read_text()
    assert "<th>notes</th>" in text and "copy_of_trained.png" in text.split("</table>")[0]
    # images it has not seen: no note
    (folder / "copy_of_trained.png").unlink()
    status, _stdout, err = cli(["report", runs["run"], folder, "--out", page, "--overwrite", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "<th>notes</th>" not in page.read_text() and "found by their pixels" not in err


def test_a_run_that_held_back_nothing_names_its_training_images_as_trained_only():
    """A run that held back no images set its thresholds on its training images: a test image it
    trained on is named once, as trained on, not again as one its thresholds were set on."""
    import warnings

    from defect_fast.evaluate import seen_test_images
    from defect_fast.data.io import image_keys

    images = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 20, 30)])
    keys = image_keys(images)
    state = {"image_keys": {"trained": [keys[0].hex(), keys[1].hex()]}, "held_back": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = seen_test_images(state, images, ["a.png", "b.png", "c.png"], "run")
    assert seen == {"trained": ["a.png", "b.png"], "thresholds": []}
    assert len(caught) == 1 and "trained on" in str(caught[0].message)


def test_calibration_images_far_from_the_trained_proportions_are_said(runs, tmp_path, capsys):
    """Thresholds set on images the square input stretches otherwise than the training images
    hold for none of them: calibrate names such images, as predict and evaluate do."""
    from PIL import Image

    folder = tmp_path / "strips"
    folder.mkdir()
    for i, p in enumerate(sorted(runs["more"].glob("*.png"))[:6]):
        img = Image.open(p).convert("RGB")
        (img.resize((8 * SIZE, SIZE)) if i == 0 else img).save(folder / f"{i}.png")
    status, _, err = cli(["calibrate", runs["run"], folder, "--with-held-back", "--out", tmp_path / "cal",
                          "--device", "cpu"], capsys)
    assert status == 0, err
    assert f"calibrate inputs: 1 of 10 images are of other proportions than the training images (width:height 1:1): " \
           f"{folder / '0.png'} (512x64)" in err, err


def test_a_detector_saved_in_python_keeps_the_record_of_the_run_behind_its_weights(runs, tmp_path, capsys):
    """Detector.save wrote the weights, settings and thresholds only: calibrate then took the run's
    training images without a word (it could not check them), evaluate named none of them in a test
    set, and audit refused the file. The record goes with the weights; a calibrate in Python records
    its images as defect-fast calibrate does; other weights loaded into the Detector leave no record."""
    import copy

    from defect_fast.data.io import image_keys

    record = ("train_config", "held_back", "image_keys", "data_digest", "data_files")
    run_state = load_model_state(runs["run"])
    det = Detector.load(runs["run"], device="cpu")
    saved = load_model_state(det.save(tmp_path / "line.pt"))
    assert all(saved[k] == run_state[k] for k in record)
    held = set(run_state["held_back"])
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][:2]
    refused(*cli(["calibrate", tmp_path / "line.pt", *trained, "--out", tmp_path / "cal", "--device", "cpu"],
                 capsys)[::2], "2 of the images", "trained on")

    parts = sorted(runs["more"].glob("*.png"))[:20]
    twin = copy.copy(det)  # a shallow copy calibrated on its own leaves the first one's record as it was
    twin.calibrate(read_images(parts[:10], SIZE))
    det.calibrate(read_images(parts, SIZE))
    keys = load_model_state(det.save(tmp_path / "line2.pt"))["image_keys"]
    assert keys["calibrated"] == [k.hex() for k in image_keys(read_images(parts, SIZE))]
    assert keys["trained"] == run_state["image_keys"]["trained"]
    assert run_state["image_keys"].get("calibrated") is None  # the loaded file's record is left as it was
    det.calibrate(read_images(parts, SIZE).float() / 127.5 - 1)  # float pixels: which files they are is not known
    assert load_model_state(det.save(tmp_path / "line3.pt"))["image_keys"]["calibrated"] is None

    other = Detector.load(runs["run"], device="cpu", fuse=False)
    weights = other.state_dict()
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    other.load_state_dict({**weights, name: weights[name] + 1})  # weights of another training
    assert not set(record) & set(load_model_state(other.save(tmp_path / "other.pt")))


def test_a_detector_fitted_in_python_records_its_fit_images_and_is_no_longer_the_run_s_to_audit(runs, tmp_path, capsys):
    """After fit_normalization in Python the saved record still said the map was fitted on the run's
    images only: calibrate took the fit's images for thresholds without a word, and audit refitted
    the run's maps (dropping the file's normalisation) and called the scores the file's. What the
    record knew stays: the training images, and the held-back half the run fitted its map on."""
    parts = sorted(runs["more"].glob("*.png"))
    fit, cal = parts[:20], parts[20:40]
    det = Detector.load(runs["halves"], device="cpu")
    det.fit_normalization(read_images(fit, SIZE))
    det.fit_normalization(read_images(fit[:10], SIZE))  # the same images again: recorded once (each refit grew it)
    det.fit_normalization(read_images(fit, SIZE).float() / 127.5 - 1)  # float pixels: no file's, not recorded
    det.calibrate(read_images(cal, SIZE))
    state = load_model_state(det.save(tmp_path / "fitted.pt"))
    assert state["train_config"] == load_model_state(runs["halves"])["train_config"]
    assert len(state["image_keys"]["fitted"]) == 20
    held = load_model_state(runs["halves"])["held_back"]
    trained = [p for p in sorted((runs["data"] / "train" / "good").glob("*.png")) if str(p) not in held][:2]
    for images, said in ((fit[:3], "3 of the images"), (trained, "2 of the images"), (held[:1], "1 of the images")):
        refused(*cli(["calibrate", tmp_path / "fitted.pt", *images, "--out", tmp_path / "c", "--device", "cpu"],
                     capsys)[::2], said, "fitted its map on")
    status, _out, err = cli(["audit", tmp_path / "fitted.pt", "--out", tmp_path / "a", "--device", "cpu"], capsys)
    refused(status, err, "fitted again in Python")


def test_calibrate_in_python_leaves_out_blank_frames_and_names_the_run_s_own_images(runs):
    """Detector.calibrate, the Python way to set thresholds again, took a black frame's score as
    the threshold (9 times the parts': every defect passed) and the run's own training images
    without a word; defect-fast calibrate leaves the one out and refuses the other."""
    import warnings

    from defect_fast.data import DataWarning
    from defect_fast.data.io import DataError

    parts = read_images(sorted(runs["more"].glob("*.png"))[:6], SIZE)
    black, white = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), torch.full((1, 3, SIZE, SIZE), 255, dtype=torch.uint8)
    det = Detector.load(runs["run"], device="cpu")
    plain = dict(det.calibrate(parts, 0.2))
    with pytest.warns(DataWarning, match=r"2 blank frame\(s\).*left out.*\(image 6, image 7\)"):
        cal = det.calibrate(torch.cat([parts, black, white]), 0.2)
    assert cal["image_threshold"] == plain["image_threshold"] and cal["n_images"] == 6
    names = [f"p{i}.png" for i in range(6)] + ["black.png"]
    with pytest.warns(DataWarning, match=r"\(black.png\)"):
        det.calibrate(torch.cat([parts, black]), 0.2, names=names)
    with pytest.raises(DataError, match="every one of the 2 images is a blank frame"):
        det.calibrate(torch.cat([black, white]))
    trained = read_images(sorted((runs["data"] / "train" / "good").glob("*.png"))[:3], SIZE)
    with pytest.warns(DataWarning, match=r"3 of the images are ones the run trained on"):
        det.calibrate(torch.cat([parts, trained]), 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        det.calibrate(parts, 0.2)  # unseen, none blank: nothing said


def test_fit_normalization_in_python_leaves_out_blank_frames(runs):
    """One black frame among the fit images made the per-position std 15 times wider."""
    from defect_fast.data import DataWarning

    parts = read_images(sorted(runs["more"].glob("*.png"))[:6], SIZE)
    det = Detector.load(runs["run"], device="cpu")
    plain = det.fit_normalization(parts)
    with pytest.warns(DataWarning, match=r"1 blank frame\(s\).*left out.*\(image 2\)"):
        fitted = det.fit_normalization(torch.cat([parts[:2], torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), parts[2:]]))
    assert torch.equal(fitted["std"], plain["std"]) and torch.equal(fitted["mean"], plain["mean"])
    # one image left but for them: fitted on them all, as a training's fit is, and now said
    black, white = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), torch.full((1, 3, SIZE, SIZE), 255, dtype=torch.uint8)
    with pytest.warns(DataWarning, match=r"2 of the 3 images are blank frames.*\(image 0, image 2\), kept as fewer than 2"):
        det.fit_normalization(torch.cat([black, parts[:1], white]))


def test_another_top_fraction_sets_the_stored_thresholds_aside(runs, tmp_path, capsys):
    """Detector.load(run, top_fraction=...) kept the thresholds set on the default score: with the
    whole map's mean as the score, no defect reached them. evaluate's JSON gave the expected
    rate of thresholds it had set aside."""
    from defect_fast.detect import TOP_FRACTION

    from defect_fast.detect import SettingError

    from defect_fast.calibration import stored_thresholds

    det = Detector.load(runs["run"], device="cpu", top_fraction=1.0)
    with pytest.raises(SettingError, match=r"the stored ones were calibrated with other inference settings "
                                           r"\(top_fraction 0.001 -> 1.0\)"):
        det.image_threshold()
    # the map is the same: its pixel threshold (predict's regions) and colour scale stay
    stored = load_model_state(runs["run"])["calibration"]
    assert stored_thresholds(det.calibration)[1] == stored["pixel_threshold"] is not None
    assert det.calibration["pixel_q999"] == stored["pixel_q999"]
    same = Detector.load(runs["run"], device="cpu", top_fraction=TOP_FRACTION * 1.0001)  # the same number of values
    assert same.image_threshold() == Detector.load(runs["run"], device="cpu").image_threshold() is not None
    status, stdout, err = cli(["evaluate", runs["run"], runs["data"], "--device", "cpu", "--stride", "32", "--json", "-"],
                              capsys)
    assert status == 0, err
    th = json.loads(stdout)["thresholds"]
    assert th["at_threshold"] is None and th["far_expected"] is None and th["n_calibration_images"] is None


def test_a_second_calibrate_in_python_still_names_the_held_back_half_the_map_was_fitted_on(runs):
    """The calibration Detector.calibrate wrote kept no record of which held-back images the map was
    fitted on: a second call took them for unseen."""
    from defect_fast.data import DataWarning

    state = load_model_state(runs["halves"])
    fitted = read_images([state["held_back"][0]], SIZE)  # every other held-back image fitted the map
    parts = read_images(sorted(runs["more"].glob("*.png"))[:6], SIZE)
    det = Detector.load(runs["halves"], device="cpu")
    for _ in range(2):
        with pytest.warns(DataWarning, match="1 of the images is one the run trained on or fitted its map on"):
            det.calibrate(torch.cat([parts, fitted]), 0.2)


def test_calibrate_in_python_says_when_the_model_file_records_no_training_images(runs, tmp_path):
    """defect-fast calibrate warns that it could not check a file that records no training images;
    Detector.calibrate said nothing, and thresholds set on training images went unnoticed."""
    import warnings

    from defect_fast.data import DataWarning

    parts = read_images(sorted(runs["more"].glob("*.png"))[:6], SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with its record: nothing to say of unseen parts
        Detector.load(runs["run"], device="cpu").calibrate(parts, 0.2)
    state = load_model_state(runs["run"])
    state.pop("image_keys")
    state.pop("tensor_digest", None)
    older = tmp_path / "older"
    older.mkdir()
    save_with_digest(state, older / "model.pt")
    with pytest.warns(DataWarning, match=r"could not check that the images were not trained on: .*older.*model\.pt "
                                         r"does not record the images its model trained on"):
        Detector.load(older, device="cpu").calibrate(parts, 0.2)


@pytest.mark.parametrize("key, value, said", [("image_threshold", float("nan"), "image_threshold (nan) is not a finite"),
                                              ("image_threshold", "0.5", "image_threshold ('0.5') is not a finite"),
                                              ("pixel_threshold", float("inf"), "pixel_threshold (inf) is not a finite"),
                                              ("held_back_scores", [0.1, "x"], "held_back_scores"),
                                              ("highest_scores", [["a.png", "x"]], "highest_scores"),
                                              ("note", ["\x1b[2J"], "note (['\\x1b[2J']) is not text")])
def test_thresholds_that_are_no_numbers_are_refused_and_calibrate_sets_them_anew(runs, tmp_path, capsys, key, value,
                                                                                said):
    """A model file whose image threshold was NaN made predict pass every part (a score is never
    above NaN), with status 0; a string gave a traceback. calibrate, which replaces them, takes it."""
    state = load_model_state(runs["run"])
    state["calibration"][key] = value
    state["calibration"]["far"] = 0.2  # (not the default rate: kept by calibrate)
    state.pop("tensor_digest", None)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    save_with_digest(state, damaged / "model.pt")
    parts = sorted(runs["more"].glob("*.png"))
    for argv in (["predict", damaged, parts[0], "--out", tmp_path / "p"], ["evaluate", damaged, runs["data"]]):
        refused(*cli([*argv, "--device", "cpu"], capsys)[::2], said, "damaged model file")
    assert not (tmp_path / "p").exists()
    import re

    with pytest.raises(RunError, match=re.escape(said)):
        Detector.load(damaged, device="cpu")
    status, stdout, err = cli(["calibrate", damaged, *parts[:8], "--out", tmp_path / "cal", "--device", "cpu"], capsys)
    assert status == 0 and said in stdout and "they are set anew here" in stdout, err
    assert Detector.load(tmp_path / "cal", device="cpu").image_threshold() is not None
    # the rate the run asked, and the images its map was fitted on, are kept (not the default rate)
    new = load_model_state(tmp_path / "cal")["calibration"]
    assert new["far"] == state["calibration"]["far"] and "map_fitted_on" in new
    assert new["map_fitted_on"] == state["calibration"].get("map_fitted_on")


def test_texts_of_the_model_file_are_printed_on_one_line_without_escapes(runs, tmp_path, capsys):
    """evaluate printed the calibration's note as it was: a terminal's escape sequence cleared the
    screen, and a line break forged a line of results."""
    state = load_model_state(runs["run"])
    state["calibration"]["note"] = "held-back\x1b[2J\nat that threshold 1: false-alarm rate 0 (0/9 good images)"
    state.pop("tensor_digest", None)
    folder = tmp_path / "texts"
    folder.mkdir()
    save_with_digest(state, folder / "model.pt")
    status, stdout, err = cli(["evaluate", folder, runs["data"], "--device", "cpu"], capsys)
    assert status == 0, err
    assert "\x1b" not in stdout and "held-back\\x1b[2J\\x0aat that threshold 1" in stdout
    assert not any(line.startswith("at that threshold 1:") for line in stdout.splitlines())
