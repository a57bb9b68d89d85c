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
from defect_fast.runs import load_model_state
from test_cli_inspection import cli, refused  # noqa: E402  (the same refusal checks as the other line commands)

SIZE = 64
TRAIN = ["--image-size", str(SIZE), "--batch-size", "4", "--max-steps", "1", "--set", "memory_size=10", "--quiet",
         "--device", "cpu", "--map", "perceptual", "--map-scales", "1"]
PLANTED = ("005.png", "017.png")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import defect_fast.perceptual as perceptual
    from test_perceptual import _trunk

    class RandomTrunkMap(perceptual.PerceptualMap):  # no ImageNet weights needed in tests
        def __init__(self, image_size, layers=2, trunk=None, prior=0.01, scales=(1,)):
            super().__init__(image_size, layers, trunk or _trunk(), prior, scales)

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


def test_audit_refusals_leave_everything_as_it_was(planted, tmp_path, capsys):
    run = planted["run"]
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "1"], capsys)[::2], "--folds")
    refused(*cli(["audit", run, "--out", tmp_path / "a", "--folds", "20"], capsys)[::2], "--folds 20", "28 images")
    refused(*cli(["audit", run, "--out", run / "audit"], capsys)[::2], str(run))  # inside the run: an input
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(*cli(["audit", run, "--out", mine], capsys)[::2], "not empty")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a").exists()
    # the training images changed since the run: the audit would judge other images than it trained on
    data = tmp_path / "data"
    shutil.copytree(planted["data"], data)
    Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(data / "train" / "good" / "999.png")
    state = load_model_state(run)
    cfg = dict(state["train_config"])
    cfg["data"] = str(data)
    cfg["held_back"] = [str(data / "train" / "good" / Path(p).name) for p in state["held_back"]]
    state["train_config"] = cfg
    state["held_back"] = cfg["held_back"]
    state.pop("tensor_digest", None)
    moved = tmp_path / "moved"
    moved.mkdir()
    from defect_fast.safety import save_with_digest

    save_with_digest(state, moved / "model.pt")
    refused(*cli(["audit", moved, "--out", tmp_path / "b"], capsys)[::2], "changed since")
    (data / "train" / "good" / "999.png").unlink()
    status, _stdout, err = cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu"], capsys)
    assert status == 0, err
    refused(*cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu"], capsys)[::2], "--overwrite")
    assert cli(["audit", moved, "--out", tmp_path / "b", "--device", "cpu", "--overwrite"], capsys)[0] == 0


def test_a_run_without_held_back_images_has_no_threshold_to_audit_by(planted, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(planted["data"]), "--out", str(run), *TRAIN, "--holdback", "0"]) == 0
    capsys.readouterr()
    refused(*cli(["audit", run, "--out", tmp_path / "a"], capsys)[::2], "held back no images")
    assert not (tmp_path / "a").exists()
