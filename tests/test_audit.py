"""``defect-fast audit``: training images scored by a detector fitted without them.

A tiny run (CMA-AE, 64 px, one step per stage, the perceptual map on random trunk weights) on a
64 px synthetic set in which two "defect-free" training images carry the same dark blotch.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_fast.cli import main
from defect_fast.data.dataset import load_train_images
from defect_fast.detect import Detector
from defect_fast.perceptual import PerceptualMap as PLAIN_MAP  # the fixture below replaces the module's
from defect_fast.runs import load_model_state
from test_cli_inspection import cli, refused  # noqa: E402  (the same refusal checks as the other line commands)

SIZE = 64
TRAIN = ["--image-size", str(SIZE), "--batch-size", "4", "--max-steps", "1", "--set", "memory_size=10", "--quiet",
         "--device", "cpu", "--map", "perceptual", "--map-scales", "1"]
PLANTED = ("005.png", "017.png")


def _random_trunk_map():
    """A PerceptualMap on random trunk weights: no ImageNet weights needed in tests."""
    import defect_fast.perceptual as perceptual
    from test_perceptual import _trunk

    class RandomTrunkMap(perceptual.PerceptualMap):
        def __init__(self, image_size, layers=2, trunk=None, prior=0.01, scales=(1,)):
            super().__init__(image_size, layers, trunk or _trunk(), prior, scales)

    return RandomTrunkMap


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import defect_fast.perceptual as perceptual

    RandomTrunkMap = _random_trunk_map()
    from defect_fast.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("audit")
    data = make_synthetic_dataset(root / "data", size=SIZE, seed=0)
    for name in PLANTED:
        p = data / "train" / "good" / name
        a = np.asarray(Image.open(p).convert("RGB")).copy()
        a[20:34, 24:40] = 10  # a dark blotch: not defect-free
        Image.fromarray(a).save(p)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(perceptual, "PerceptualMap", RandomTrunkMap)  # the audit fits new maps too
        run = root / "run"
        assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
        yield {"data": data, "run": run, "root": root}


def _reading(run: Path, folder: Path, **settings) -> Path:
    """``folder``, made, with a copy of ``run``'s model file whose training settings are changed as
    given (``data``: its images read elsewhere; ``held_back``: their names there), saved again."""
    from defect_fast.safety import save_with_digest

    state = load_model_state(run)
    state["train_config"] = {**state["train_config"], **settings}
    if "held_back" in settings:
        state["held_back"] = settings["held_back"]
    state.pop("tensor_digest", None)
    folder.mkdir()
    save_with_digest(state, folder / "model.pt")
    return folder


def test_defects_among_the_training_images_top_the_audit(planted, tmp_path, capsys):
    out = tmp_path / "audit"
    status, stdout, err = cli(["audit", planted["run"], "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    doc = json.loads((out / "audit.json").read_text())
    state = load_model_state(planted["run"])
    assert doc["n_images"] == 28 == len(state["image_keys"]["trained"]) and doc["folds"] == 2
    names = [Path(e["image"]).name for e in doc["images"]]
    assert set(names[:2]) == set(PLANTED) and all(e["flagged"] for e in doc["images"][:2])
    assert not set(names) & {Path(p).name for p in state["held_back"]}  # only what the run trained on
    top, rest = doc["images"][:2], doc["images"][2:]
    assert min(e["score"] for e in top) > 2 * max(e["score"] for e in rest)
    # by chance: each fold's 14 images at the expected rate of the largest of 4 held-back scores, 1/5
    assert doc["expected_by_chance"] == pytest.approx(28 / 5)
    assert doc["flagged"] == sum(e["flagged"] for e in doc["images"])
    for e in doc["images"]:
        assert e["flagged"] == (e["score"] > e["threshold"])
        assert ("overlay" in e) == e["flagged"] and (not e["flagged"] or (out / e["overlay"]).is_file())
    assert f"{doc['flagged']} of 28 training images" in stdout and "about 5.6 would be by chance" in stdout
    assert stdout.index(PLANTED[0]) < stdout.index("wrote") and PLANTED[1] in stdout
    assert "the held-back images set the thresholds and are not audited" in stdout
    assert Path(state["calibration"]["threshold_image"]).name in stdout
    # the run's own scores of its training images hide them: its statistics were fitted on them
    det = Detector.load(planted["run"], device="cpu")
    images, paths = load_train_images(planted["data"].resolve(), SIZE)
    own = dict(zip((p.name for p in paths), det.predict_batched(images)["scores"].tolist()))
    audit_scores = {Path(e["image"]).name: e["score"] for e in doc["images"]}
    for name in PLANTED:
        assert audit_scores[name] > 2 * own[name]


def test_the_folds_run_the_trunk_the_run_carries_with_no_weights_file(planted, tmp_path, capsys, monkeypatch):
    """The model file carries its AlexNet trunk, and predict, evaluate or calibrate need no weights
    file; the folds' perceptual maps were built afresh and asked for $DEFECT_FAST_ALEXNET_WEIGHTS
    (and would have run whatever trunk it named). Here the plain PerceptualMap, with no weights
    file anywhere, must give the run's own (random) trunk: the same scores as the audit above."""
    import sys

    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(perceptual, "PerceptualMap", PLAIN_MAP)
    monkeypatch.delenv("DEFECT_FAST_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    status, _stdout, err = cli(["audit", planted["run"], "--out", tmp_path / "plain", "--device", "cpu"], capsys)
    assert status == 0, err
    monkeypatch.undo()
    status, _stdout, err = cli(["audit", planted["run"], "--out", tmp_path / "patched", "--device", "cpu"], capsys)
    assert status == 0, err
    scores = [{e["image"]: e["score"] for e in json.loads((tmp_path / d / "audit.json").read_text())["images"]}
              for d in ("plain", "patched")]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


def test_audit_refusals_leave_everything_as_it_was(planted, tmp_path, capsys):
    run = planted["run"]
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "1"], capsys)[::2], "argument --folds: must be 2 or more")
    for bad in ("0", "-3"):  # said as what --folds takes, not ">= 1"
        refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", bad], capsys)[::2], "must be 2 or more")
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "two"], capsys)[::2],
            "argument --folds: expected a whole number >= 2, got 'two'")
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "9" * 20], capsys)[::2], "below 2**63")
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "20"], capsys)[::2], "--folds 20", "28 images",
            "--folds 14 at most")
    refused(*cli(["audit", run, "--out", run / "audit"], capsys)[::2], str(run))  # inside the run: an input
    refused(*cli(["audit", run / "model.pt", "--out", run / "audit"], capsys)[::2], str(run))  # the run's file: too
    good = planted["data"] / "train" / "good"  # the training folder is read: overlays there would be read next time
    refused(*cli(["audit", run, "--out", good / "audit"], capsys)[::2], "lies inside the input")
    assert not (good / "audit").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(*cli(["audit", run, "--out", mine], capsys)[::2], "not empty")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a").exists()
    # the training images changed since the run: the audit would judge other images than it trained on
    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    noise = np.random.default_rng(9).integers(60, 120, (SIZE, SIZE, 3), dtype=np.uint8)  # not a blank frame (warned of)
    Image.fromarray(noise).save(data / "train" / "good" / "999.png")
    held = [str(data / "train" / "good" / Path(p).name) for p in load_model_state(run)["held_back"]]
    moved = _reading(run, tmp_path / "moved", data=str(data), held_back=held)
    refused(*cli(["audit", moved, "--out", tmp_path / "b"], capsys)[::2], "changed since", "(added: 999.png)")
    (data / "train" / "good" / "999.png").unlink()
    status, _stdout, err = cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu"], capsys)
    assert status == 0, err
    refused(*cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu"], capsys)[::2], "--overwrite")
    assert cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu", "--overwrite"], capsys)[0] == 0


def test_blank_frames_among_the_training_images_are_marked(planted, tmp_path, capsys):
    """A blank frame in train/good (a failed exposure) scored like a dull photograph, under the
    threshold, and audit.json said nothing of it (predict's scores.json marks such frames): it is
    marked "blank" and named among what to look at."""
    import warnings

    import defect_fast.perceptual as perceptual

    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(data / "train" / "good" / "shutter.png")
    run = tmp_path / "run"
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("ignore")  # the reader's own note of the blank frame
        m.setattr(perceptual, "PerceptualMap", _random_trunk_map())
        assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
        capsys.readouterr()
        status, stdout, err = cli(["audit", run, "--out", tmp_path / "a", "--device", "cpu"], capsys)
    assert status == 0, err
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    held = {Path(p).name for p in load_model_state(run)["held_back"]}
    blank = [Path(e["image"]).name for e in doc["images"] if e.get("blank")]
    assert "shutter.png" not in held  # trained on (the split of this set and seed), so audited
    assert blank == ["shutter.png"]
    assert "1 training image(s) are blank frames, of one colour throughout" in stdout and "shutter.png" in stdout


def test_a_run_whose_images_moved_is_audited_on_them_where_they_are_now(planted, tmp_path, capsys):
    """A run copied to another machine, its images at another path, could not be audited (audit
    read the path the run recorded, and nothing said how to point it elsewhere): --data names the
    folder, checked to hold the same images, names and pixels. The JSON's folds are numbered as
    the log's (it said "fold 1" of images audit.json put in fold 0)."""
    import re

    status, base_out, err = cli(["audit", planted["run"], "--out", tmp_path / "here", "--device", "cpu"], capsys)
    assert status == 0, err
    here = json.loads((tmp_path / "here" / "audit.json").read_text())
    for k in (1, 2):  # "fold k of 2: ..., N flagged" counts the images audit.json puts in fold k
        said = int(re.search(rf"fold {k} of 2: .*; (\d+) flagged", base_out).group(1))
        assert said == sum(1 for e in here["images"] if e["fold"] == k and e["flagged"])
    assert {e["fold"] for e in here["images"]} == {1, 2} and here["folds_from"] == 1  # (files before: from 0)
    # each fold names the held-back image its threshold is the score of (the folds' thresholds differ by it)
    held = {Path(p).name for p in load_model_state(planted["run"])["held_back"]}
    for k in (1, 2):
        assert re.search(rf"fold {k} of 2: .* held-back images \(the score of (\S+)\); ", base_out).group(1) in held
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(planted["data"], elsewhere)
    status, stdout, err = cli(["audit", planted["run"], "--out", tmp_path / "there", "--data", elsewhere,
                               "--device", "cpu"], capsys)
    assert status == 0, err
    assert f"trained on the images in {planted['data']}; auditing the same images (names and pixels) in " in stdout
    there = json.loads((tmp_path / "there" / "audit.json").read_text())
    assert [(Path(e["image"]).name, e["score"], e["fold"]) for e in there["images"]] == \
        [(Path(e["image"]).name, e["score"], e["fold"]) for e in here["images"]]
    assert all(Path(e["image"]).parent == (elsewhere / "train" / "good").absolute() for e in there["images"])
    # other images there: refused, by name
    Image.fromarray(np.random.default_rng(3).integers(60, 120, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        elsewhere / "train" / "good" / "999.png")
    refused(*cli(["audit", planted["run"], "--out", tmp_path / "c", "--data", elsewhere], capsys)[::2],
            f"{elsewhere.absolute()}: holds other images than", "(added: 999.png)", "give the folder of the run's images")
    # a run whose recorded folder is gone: told how to point it at them
    moved = _reading(planted["run"], tmp_path / "moved", data=str(tmp_path / "gone"))
    refused(*cli(["audit", moved, "--out", tmp_path / "d"], capsys)[::2], "cannot be read",
            "(moved? give --data with the folder they are in now)")


def test_a_run_without_held_back_images_has_no_threshold_to_audit_by(planted, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(planted["data"]), "--out", str(run), *TRAIN, "--holdback", "0"]) == 0
    capsys.readouterr()
    refused(*cli(["audit", run, "--out", tmp_path / "a"], capsys)[::2], "held back no images")
    assert not (tmp_path / "a").exists()
    # a stage's model records no held-back images (it said the run held back none)
    refused(*cli(["audit", planted["run"] / "stage1.pt", "--out", tmp_path / "a"], capsys)[::2],
            "the model at the end of a stage, which does not record the run's held-back images")
    assert not (tmp_path / "a").exists()


def test_identical_images_share_a_fold():
    from defect_fast.audit import fold_parts

    idx = list(range(3, 13))
    assert fold_parts(idx, [str(i) for i in range(20)], 3) == [idx[0::3], idx[1::3], idx[2::3]]  # no copies: as before
    keys = [str(i) for i in range(20)]
    keys[8] = keys[3]  # image 8 is a copy of image 3 (positions 5 and 0)
    keys[12] = keys[3]
    parts = fold_parts(idx, keys, 2)
    assert {3, 8, 12} <= set(parts[0]) and sorted(parts[0] + parts[1]) == idx


def test_a_folder_of_copies_is_refused_for_its_copies_not_its_count(planted, tmp_path, capsys):
    """Copies share a fold, so a folder of one photograph copied twelve times leaves a fold's
    detector nothing to fit on: the refusal says so, not that twelve images are too few."""
    data = tmp_path / "copies"
    data.mkdir()
    one = sorted((planted["data"] / "train" / "good").glob("*.png"))[0]
    for i in range(12):
        shutil.copy(one, data / f"copy_{i:02d}.png")
    run = tmp_path / "run"
    status, _stdout, err = cli(["train", data, "--out", run, *TRAIN[:TRAIN.index("--map")]], capsys)
    assert status == 0, err
    refused(*cli(["audit", run, "--out", tmp_path / "a"], capsys)[::2],
            "would fit on 0 of the 8 images", "only 1 of them differ: identical copies stay in one fold",
            "too few different training images")
    assert not (tmp_path / "a").exists()


def test_a_defective_photograph_held_twice_is_still_found(planted, tmp_path, capsys):
    """With a renamed copy of a planted image in the folder, the copy sat in the fit of the detector
    that scored the original (and back): a fold's statistics then knew the blotch and both scored
    as defect-free. Copies now share a fold."""
    import defect_fast.perceptual as perceptual

    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    shutil.copy(data / "train" / "good" / PLANTED[0], data / "train" / "good" / "005b.png")
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(perceptual, "PerceptualMap", _random_trunk_map())  # the audit fits new maps too
        assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
        status, _stdout, err = cli(["audit", run, "--out", tmp_path / "a", "--device", "cpu"], capsys)
    assert status == 0, err
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    found = {Path(e["image"]).name: e for e in doc["images"]}
    copies = [found[n] for n in (PLANTED[0], "005b.png") if n in found]  # (one may be held back)
    assert copies and all(e["flagged"] for e in copies) and len({e["fold"] for e in copies}) == 1


def test_a_context_run_needs_enough_images_in_each_fold(planted, tmp_path, capsys):
    """A fold's image context needs 10 images to fit on: with 16 training images, 2 folds fit on 8
    (before, a ValueError from deep inside the fit); the error names the fewest folds that work."""
    from defect_fast.safety import save_with_digest

    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    for p in sorted((planted["data"] / "train" / "good").iterdir())[:20]:
        shutil.copy(p, data / "train" / "good" / p.name)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
    state = load_model_state(run)
    assert len(state["image_keys"]["trained"]) == 16
    state["train_config"] = {**state["train_config"], "context": True}
    state.pop("tensor_digest", None)
    save_with_digest(state, run / "model.pt")
    capsys.readouterr()
    refused(*cli(["audit", run, "--out", tmp_path / "a"], capsys)[::2], "fit on 8 of the 16", "needs 10",
            "use --folds 3")


def test_a_held_back_copy_of_a_defective_photograph_hides_it_no_more(planted, tmp_path, capsys):
    """A held-back copy of a defective training photograph set each fold's threshold at that
    photograph's own score (the same pixels, the same detector): 12 times any other score, never
    flagged. The copy is now left out of the threshold of the fold that scores it, and said. The
    overlays are drawn at each photo's own size (they were the model's square), a refused
    --overwrite keeps the earlier audit (it was cleared first), and the audit of a calibrate output
    says its thresholds are not the ones it judges by (it named the calibrate images as held back)."""
    import defect_fast.perceptual as perceptual

    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    good = data / "train" / "good"
    for p in good.iterdir():  # 96 x 64 photos: the run reads them at 64 x 64
        Image.open(p).convert("RGB").resize((96, SIZE)).save(p)
    held = [Path(p).name for p in load_model_state(planted["run"])["held_back"]]  # by name: the same split
    shutil.copy(good / PLANTED[0], good / held[0])
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(perceptual, "PerceptualMap", _random_trunk_map())  # the audit fits new maps too
        assert main(["train", str(data), "--out", str(run), *TRAIN]) == 0
        assert sorted(Path(p).name for p in load_model_state(run)["held_back"]) == sorted(held)
        status, stdout, err = cli(["audit", run, "--out", tmp_path / "a", "--device", "cpu"], capsys)
        assert status == 0, err
        doc = json.loads((tmp_path / "a" / "audit.json").read_text())
        assert {Path(e["image"]).name for e in doc["images"][:2]} == set(PLANTED), doc["images"][:3]
        top = next(e for e in doc["images"] if Path(e["image"]).name == PLANTED[0])
        assert top["flagged"]
        assert f"held-back image(s) identical to training images it scores ({held[0]}) left out of its threshold" \
            in stdout
        assert Image.open(tmp_path / "a" / top["overlay"]).size == (96, SIZE)
        # a user's file at an overlay's name: refused before the earlier audit is cleared
        kept = (tmp_path / "a" / "audit.json").read_bytes()
        (tmp_path / "a" / top["overlay"]).write_bytes(b"mine")
        folder = tmp_path / "a"
        for p in (folder / "overlays").iterdir():
            if p.name != Path(top["overlay"]).name:
                p.unlink()
        import defect_fast.safety as safety

        manifest = json.loads((folder / safety.MANIFEST_NAME).read_text())
        manifest["files"] = [f for f in manifest["files"] if f != top["overlay"]]  # the user's now
        (folder / safety.MANIFEST_NAME).write_text(json.dumps(manifest))
        refused(*cli(["audit", run, "--out", folder, "--device", "cpu", "--overwrite"], capsys)[::2],
                "exists and was not written by defect-fast")
        assert (folder / "audit.json").read_bytes() == kept and (folder / top["overlay"]).read_bytes() == b"mine"
        # a calibrate output: its thresholds come from other images
        cal = tmp_path / "cal"
        assert cli(["calibrate", run, data / "test" / "good", "--out", cal, "--device", "cpu"], capsys)[0] == 0
        status, stdout, err = cli(["audit", cal, "--out", tmp_path / "b", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "was calibrated again" in stdout and "at the run's rate 0.01 on its 4 held-back images" in stdout
    assert "the run's highest held-back scores" not in stdout


def test_a_run_that_fitted_nothing_on_its_training_images_says_its_own_detector_judged(planted, tmp_path, capsys):
    """With neither map statistics fitted on the training images nor an image context, every
    fold's detector is the run's own: the audit says so (it claimed "a detector that did not see
    them") and its scores are the run's."""
    from defect_fast.models import build_model
    from defect_fast.train import TrainConfig, fits_on_training_images

    model = build_model("cmaae", memory_size=10)
    assert fits_on_training_images(TrainConfig(data="d", map="perceptual"), model)
    assert not fits_on_training_images(TrainConfig(data="d", map="perceptual", fit_on="held-back"), model)
    assert not fits_on_training_images(TrainConfig(data="d"), model)
    assert fits_on_training_images(TrainConfig(data="d", context=True), model)
    # the brightness level is the training images' mean, whatever the statistics are fitted on
    assert fits_on_training_images(TrainConfig(data="d", map="perceptual", fit_on="held-back", level_brightness=True),
                                   model)
    run = planted["root"] / "plain"
    if not run.exists():
        assert TRAIN[-4:] == ["--map", "perceptual", "--map-scales", "1"]
        plain = TRAIN[:-4]
        assert main(["train", str(planted["data"]), "--out", str(run), *plain]) == 0
        capsys.readouterr()
    out = tmp_path / "audit"
    status, stdout, err = cli(["audit", run, "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    doc = json.loads((out / "audit.json").read_text())
    assert doc["refitted"] is False and "fitted nothing on its training images but the autoencoder" in stdout
    assert "above the threshold of the run (its own detector)" in stdout
    # no fold fitted anything (its lines said "fitted on 14 training images"), and "look at them"
    # comes with images to look at
    assert "fitted on" not in stdout and stdout.count("the run's own detector, scored 14") == 2
    assert ("look at them" in stdout) == (doc["flagged"] > 0)
    det = Detector.load(run, device="cpu")
    images, paths = load_train_images(planted["data"].resolve(), SIZE)
    own = dict(zip((str(p) for p in paths), det.predict_batched(images)["scores"].tolist()))
    for e in doc["images"]:
        assert e["score"] == pytest.approx(own[e["image"]], rel=1e-5)


def test_what_reading_a_flagged_image_says_is_said_once(planted, tmp_path, capsys):
    """The overlay of a flagged image read it again, and said again what its reading had said
    (transparent pixels, here): one warning per flagged image more."""
    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    p = data / "train" / "good" / PLANTED[0]
    rgb = np.asarray(Image.open(p).convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :4] = 0  # the same pixels, a strip of them transparent
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(p)
    status, _stdout, err = cli(["audit", planted["run"], "--out", tmp_path / "audit", "--data", data, "--device",
                                "cpu"], capsys)
    assert status == 0, err
    doc = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert any(Path(e["image"]).name == PLANTED[0] and e["flagged"] for e in doc["images"])
    assert err.count("transparent pixels") == 1, err
