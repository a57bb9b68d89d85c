"""The line-side commands through the command line: watch, report, diagnose.

One tiny run (CMA-AE, 64 px, one step per stage) on a 64 px synthetic MVTec-style set serves all
tests. Refusals must exit with status 2, print one error line naming the argument, and leave the
user's files as they were.
"""
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast.calibration import stored_thresholds
from defect_fast.cli import main
from defect_fast.safety import MANIFEST_NAME, run_main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``defect-fast ARGV`` in-process behind the package's error boundary: (status, stdout, stderr)."""
    try:
        status = run_main(main, [str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exit on a bad option
        status = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return status, out.out, out.err


def refused(status: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("defect-fast: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


def png_bytes(seed: int, bright: float = 0.5, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255 * bright).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from defect_fast.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("inspect")
    data = root / "data"
    make_synthetic_dataset(data, size=SIZE, seed=0)
    run = root / "run"
    assert main(["train", str(data), "--out", str(run), "--image-size", str(SIZE), "--batch-size", "4",
                 "--max-steps", "1", "--set", "memory_size=10", "--quiet", "--device", "cpu"]) == 0
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    threshold, pixel_threshold, _ = stored_thresholds(state.get("calibration"))
    assert threshold is not None
    version = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()[:12]
    return {"data": data, "run": run, "threshold": threshold, "pixel_threshold": pixel_threshold, "version": version}


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------------


def test_watch_once_judges_resumes_and_refuses(tiny, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, p in enumerate(sorted((tiny["data"] / "test" / "scratch").glob("*.png"))[:3]):
        (src / f"part{i}.png").write_bytes(p.read_bytes())
    (src / "broken.png").write_bytes(png_bytes(9)[:70])
    base = ["watch", tiny["run"], src, "--out", out, "--once", "--device", "cpu", "--poll", "0.05", "--settle", "0.05"]
    status, stdout, err = cli(base, capsys)
    assert status == 0, err
    recs = journal(out)
    assert sorted(r["image"] for r in recs) == ["broken.png", "part0.png", "part1.png", "part2.png"]
    assert len({r["sha256"] for r in recs}) == 4
    judged = [r for r in recs if r["result"] != "rejected"]
    assert all(r["threshold"] == pytest.approx(tiny["threshold"]) for r in judged)  # the model file's threshold
    assert all(r["result"] == ("fail" if r["score"] > tiny["threshold"] else "pass") for r in judged)
    assert all(r["model_version"] == tiny["version"] and r["model"] == "cmaae" for r in recs)
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(r["map"]).name for r in judged)
    assert (out / "rejected" / "broken.png").read_bytes() == png_bytes(9)[:70] and not (src / "broken.png").exists()
    status_doc = json.loads((out / "status.json").read_text())
    assert status_doc["counts"]["total"] == 4 and status_doc["threshold"] == pytest.approx(tiny["threshold"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {"results.jsonl", "status.json"} <= set(manifest["files"]) and {"maps", "overlays", "rejected"} <= set(manifest["dirs"])
    assert "threshold" in stdout and "pass" in stdout

    # a restart resumes the journal: nothing judged twice, a new image judged once
    (src / "part9.png").write_bytes(png_bytes(3))
    assert cli(base, capsys)[0] == 0
    recs = journal(out)
    assert len(recs) == 5 and [r["image"] for r in recs].count("part9.png") == 1

    # --threshold overrides the stored one
    low = tmp_path / "low"
    status, _, err = cli(base[:4] + [low] + base[5:] + ["--threshold=-1e9"], capsys)
    assert status == 0, err
    assert {r["result"] for r in journal(low)} == {"fail"} and journal(low)[0]["threshold"] == -1e9
    # --maps none: the verdicts, no maps or overlays
    bare = tmp_path / "bare"
    status, _, err = cli(base[:4] + [bare] + base[5:] + ["--maps", "none"], capsys)
    assert status == 0, err
    assert all(r.get("map") is None for r in journal(bare)) and not any((bare / "maps").iterdir())


def test_watch_move_judged_empties_the_drop_folder_through_the_command_line(tiny, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    sent = {f"part{i}.png": p.read_bytes() for i, p in enumerate(sorted((tiny["data"] / "test" / "scratch").glob("*.png"))[:2])}
    for name, data in sent.items():
        (src / name).write_bytes(data)
    base = ["watch", tiny["run"], src, "--out", out, "--once", "--device", "cpu", "--poll", "0.05", "--settle", "0.05"]
    status, _, err = cli(base + ["--move-judged"], capsys)
    assert status == 0, err
    assert list(src.iterdir()) == []
    for rec in journal(out):
        assert rec["moved_to"] == f"judged/{rec['result']}/{Path(rec['image']).stem}_{rec['sha256'][:12]}.png"
        assert (out / rec["moved_to"]).read_bytes() == sent[rec["image"]]
    assert {"judged/pass", "judged/fail"} <= set(json.loads((out / MANIFEST_NAME).read_text())["dirs"])
    # the folder is resumed with or without the option: its journal and moved images are its own
    (src / "late.png").write_bytes(png_bytes(4))
    assert cli(base, capsys)[0] == 0
    assert (src / "late.png").is_file() and len(journal(out)) == 3 and "moved_to" not in journal(out)[-1]


def test_watch_move_judged_is_refused_beside_another_watch_of_the_folder(tiny, tmp_path, capsys, monkeypatch):
    """Refused before the model is read and before --out is made (each image would be judged and
    recorded by one of the two watches only)."""
    from defect_fast import detect

    from test_watch import _held_by_child

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    child = _held_by_child(src, exclusive=False)
    loads = []
    monkeypatch.setattr(detect.Detector, "load", lambda *a, **k: loads.append(a))
    try:
        status, _, err = cli(["watch", tiny["run"], src, "--out", out, "--once", "--move-judged"], capsys)
    finally:
        child.kill()
        child.wait()
    refused(status, err, str(src), f"watched by PID {child.pid}", "--move-judged")
    assert not out.exists() and not loads and (src / "a.png").is_file()


def test_watch_refusals_keep_user_files(tiny, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run = ["watch", tiny["run"]]
    status, err = cli(run + [src, "--out", mine, "--once"], capsys)[::2]
    refused(status, err, "--out", "not empty")
    assert "--overwrite" not in err  # an option watch does not have
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(os.listdir(mine)) == ["notes.txt"]
    refused(*cli(run + [src, "--out", src / "results", "--once"], capsys)[::2], "--out", "inside the input")
    refused(*cli(run + [tmp_path / "nope", "--out", tmp_path / "o", "--once"], capsys)[::2], "nope")
    assert not (tmp_path / "o").exists()
    # a folder another command wrote is not taken over
    diag = tmp_path / "diag"
    diag.mkdir()
    (diag / MANIFEST_NAME).write_text(json.dumps({"format": "defect_fast-output-manifest", "version": 1,
                                                  "files": ["locations.json"], "dirs": []}))
    (diag / "locations.json").write_text("{}")
    refused(*cli(run + [src, "--out", diag, "--once"], capsys)[::2], "--out", "another defect-fast command")
    assert sorted(os.listdir(diag)) == sorted([MANIFEST_NAME, "locations.json", ".defect_fast.lock"]) or \
        sorted(os.listdir(diag)) == sorted([MANIFEST_NAME, "locations.json"])
    assert (src / "a.png").exists()
    status, _, err = cli(run + [src, "--out", tmp_path / "o", "--batch-size", "0"], capsys)
    assert status == 2 and "--batch-size" in err and not (tmp_path / "o").exists()


def _count(out: Path) -> int:
    try:
        return (out / "results.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_watch_sigkill_twice_through_the_command_line(tiny, tmp_path):
    """The bar: N images dropped while `defect-fast watch` runs, SIGKILL twice, restart: N results, N hashes."""
    src, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "service.log"
    src.mkdir()
    n, rng = 16, random.Random(0)
    payloads = {f"cam_{i:02d}.png": png_bytes(100 + i) for i in range(n - 1)}
    payloads["cam_07_corrupt.png"] = b"\x89PNG\r\n\x1a\n" + bytes(rng.getrandbits(8) for _ in range(300))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEFECT_FAST_BACKEND": "reference", "PYTHONPATH": str(ROOT)}

    def start():
        return subprocess.Popen([sys.executable, "-m", "defect_fast", "watch", str(tiny["run"]), str(src), "--out", str(out),
                                 "--batch-size", "2", "--poll", "0.1", "--settle", "0.3", "--device", "cpu"],
                                env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def drop():
        for i, (name, data) in enumerate(payloads.items()):
            if i % 3 == 0:  # write then rename
                (src / (name + ".tmp")).write_bytes(data)
                os.replace(src / (name + ".tmp"), src / name)
            elif i % 3 == 1:  # slow copy in three pieces
                with open(src / name, "wb") as f:
                    for k in range(3):
                        f.write(data[k * len(data) // 3:(k + 1) * len(data) // 3])
                        f.flush()
                        time.sleep(0.05)
            else:
                (src / name).write_bytes(data)
            time.sleep(0.1 if i % 4 else 0.0)  # some arrive together, so batches fill

    dropper = threading.Thread(target=drop)
    proc = start()
    try:
        dropper.start()
        for started, kill_after in enumerate((3, 8), start=1):
            # SIGKILL at a random moment once this process is watching and has added a result
            # (the one before may already have written more than kill_after)
            _wait(lambda: log.read_text().count("watching ") == started, 120, f"service {started} watching")
            before = _count(out)
            _wait(lambda: _count(out) >= max(kill_after, min(before + 1, n)), 120, f"{kill_after} results")
            time.sleep(rng.uniform(0.0, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            proc = start()
        dropper.join(timeout=60)
        _wait(lambda: _count(out) >= n, 120, f"all {n} results")
        # SIGTERM only once the last service watches: during its start-up (import, model load) the
        # default action applies, and it may start after the others have written every result
        _wait(lambda: log.read_text().count("watching ") == 3, 120, "service 3 watching")
        time.sleep(0.5)  # anything extra would show up now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recs = journal(out)
    assert len(recs) == n, log.read_text()
    assert {r["sha256"] for r in recs} == {hashlib.sha256(d).hexdigest() for d in payloads.values()}
    assert sorted(r["image"] for r in recs) == sorted(payloads)
    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert len(maps) == n - 1 and maps == sorted(Path(r["map"]).name for r in recs if "map" in r)
    assert len(list((out / "overlays").iterdir())) == n - 1
    bad = [r for r in recs if r["result"] == "rejected"]
    assert [r["image"] for r in bad] == ["cam_07_corrupt.png"] and bad[0]["reason"]
    assert (out / "rejected" / "cam_07_corrupt.png").read_bytes() == payloads["cam_07_corrupt.png"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["counts"]["total"] == n
    text = log.read_text()
    assert "SIGTERM" in text and text.count("watching ") == 3  # three service processes, two killed


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def test_report_with_ground_truth_and_refusals(tiny, tmp_path, capsys, monkeypatch):
    page = tmp_path / "r.html"
    status, stdout, err = cli(["report", tiny["run"], tiny["data"], "--out", page, "--max-gallery", "4",
                               "--device", "cpu"], capsys)
    assert status == 0, err
    text = page.read_text()
    for sid in ("summary", "metrics", "curves", "histogram", "gallery"):
        assert f'<section id="{sid}">' in text
    assert text.count('alt="reconstruction"') == 4 and text.count('alt="input"') == 4
    assert f"{tiny['threshold']:.4f}" in text and "http" not in text.replace("http-equiv", "")
    assert "sections summary, metrics, curves, histogram, gallery" in stdout
    before = page.read_bytes()
    refused(*cli(["report", tiny["run"], tiny["data"], "--out", page], capsys)[::2], "--out", "--overwrite")
    assert page.read_bytes() == before
    inside = tiny["data"] / "test" / "good" / "000.png"
    original = inside.read_bytes()
    refused(*cli(["report", tiny["run"], tiny["data"], "--out", inside, "--overwrite"], capsys)[::2], "--out", "input")
    assert inside.read_bytes() == original
    assert cli(["report", tiny["run"], tiny["data"] / "test" / "good", "--out", page, "--overwrite", "--threshold", "0",
                "--device", "cpu"], capsys)[0] == 0
    text = page.read_text()
    assert '<section id="metrics">' not in text and '<section id="gallery">' in text and "given on the command line" in text
    refused(*cli(["report", tiny["run"], tmp_path / "nothing", "--out", tmp_path / "x.html"], capsys)[::2], "nothing")
    # "-" is no page's name (evaluate --json - is standard output): not a file called "-"
    with_dash = tmp_path / "cwd"
    with_dash.mkdir()
    monkeypatch.chdir(with_dash)
    refused(*cli(["report", tiny["run"], tiny["data"], "--out", "-"], capsys)[::2], "--out -", "standard output")
    assert list(with_dash.iterdir()) == []


# --------------------------------------------------------------------------------------------
# images of other proportions than the training images
# --------------------------------------------------------------------------------------------


def test_predict_says_once_what_it_says_of_a_file(tiny, tmp_path, capsys):
    """A photo of another size than the model's is read again at its own size for its overlay: that
    second read warned of each file again what the first had said of them all in one line."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):  # float pixels in no range the reader knows, at a size other than the model's
        Image.fromarray((np.arange(48 * 40, dtype=np.float32).reshape(40, 48) + i)).save(src / f"f{i}.tif")
    status, _, err = cli(["predict", tiny["run"], src, "--out", tmp_path / "p", "--device", "cpu"], capsys)
    assert status == 0, err
    said = [ln for ln in err.splitlines() if "float pixels" in ln]
    assert len(said) == 1 and "2 of 2 images" in said[0], err


def _ctrl_c_in_each_list_write(monkeypatch):
    """A Ctrl-C (a real SIGINT) as each output list is written; returns what puts the write back."""
    from defect_fast.safety import OutputFolder

    real_write = OutputFolder.write_json

    def pressed(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_write(self, *a, **k)

    monkeypatch.setattr(OutputFolder, "write_json", pressed)
    return lambda: monkeypatch.setattr(OutputFolder, "write_json", real_write)


def test_a_stopped_predict_keeps_the_images_it_finished(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM) in a predict of many images removed every map it had written: the
    images done are kept, with a scores.json that lists them and says how many of how many."""
    from defect_fast import visualize

    src = tmp_path / "in"
    src.mkdir()
    good = sorted((tiny["data"] / "test" / "good").glob("*.png"))
    for i in range(5):
        Image.open(good[i % len(good)]).save(src / f"im{i}.png")
    real, drawn = visualize.save_overlay, []

    def stopped_at_the_fourth(*a, **k):
        if len(drawn) == 3:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*a, **k)

    monkeypatch.setattr(visualize, "save_overlay", stopped_at_the_fourth)
    # a second Ctrl-C while the list of what is kept is written (it removed everything): it waits
    restore = _ctrl_c_in_each_list_write(monkeypatch)
    out = tmp_path / "p"
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu"], capsys)
    assert status == 130 and "stopped: the maps, overlays and scores of 3 of 5 image(s) are kept" in err, err
    restore()
    scores = json.loads((out / "scores.json").read_text())
    assert scores["stopped"] == {"images_done": 3, "images_given": 5} and len(scores["images"]) == 3
    assert all((out / e["map"]).is_file() and (out / e["overlay"]).is_file() for e in scores["images"])
    # the fourth image's map was written before the stop: not listed, so not kept
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(e["map"]).name for e in scores["images"])
    monkeypatch.setattr(visualize, "save_overlay", real)
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu"], capsys)
    assert status == 2 and "--overwrite" in err  # kept, not overwritten silently
    assert "or --resume does only the images the stopped predict there had not done" in err
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--overwrite"], capsys)
    assert status == 0, err
    scores = json.loads((out / "scores.json").read_text())
    assert "stopped" not in scores and len(scores["images"]) == 5


def _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images: int, done: int):
    """A predict of ``images`` copies of the test set's good images into tmp_path/p, stopped by a
    Ctrl-C as image ``done`` + 1 is drawn: (its input folder, its output folder)."""
    from defect_fast import visualize

    src = tmp_path / "in"
    src.mkdir()
    good = sorted((tiny["data"] / "test" / "good").glob("*.png"))
    for i in range(images):
        Image.open(good[i % len(good)]).save(src / f"im{i}.png")
    real, drawn = visualize.save_overlay, []

    def stopped(*a, **k):
        if len(drawn) == done:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*a, **k)

    monkeypatch.setattr(visualize, "save_overlay", stopped)
    out = tmp_path / "p"
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu"], capsys)
    assert status == 130 and f"of {done} of {images} image(s) are kept" in err and "--resume" in err, err
    monkeypatch.setattr(visualize, "save_overlay", real)
    return src, out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_stopped_predict_resumes_with_the_images_it_had_not_done(tiny, tmp_path, capsys, monkeypatch):
    """A stopped predict of many images could only be done again whole (--overwrite): --resume
    does the images it had not done, keeps the files and entries of those it had, and ends with
    the list an uninterrupted predict writes."""
    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=5, done=3)
    before = _files(out)
    kept = json.loads((out / "scores.json").read_text())["images"]
    status, stdout, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    assert status == 0 and "for 5 image(s)" in stdout and "2 of them now, 3 before the stop" in stdout, err
    scores = json.loads((out / "scores.json").read_text())
    assert "stopped" not in scores and scores["images"][:3] == kept and len(scores["images"]) == 5
    after = _files(out)
    assert all(after[e[f]] == before[e[f]] for e in kept for f in ("map", "overlay"))  # not written again
    # the two done now: as a predict of those two alone (the same parts) gives them
    alone = tmp_path / "alone"
    alone.mkdir()
    for i in (3, 4):
        (alone / f"im{i}.png").write_bytes((src / f"im{i}.png").read_bytes())
    assert cli(["predict", tiny["run"], alone, "--out", tmp_path / "q", "--device", "cpu"], capsys)[0] == 0
    theirs = json.loads((tmp_path / "q" / "scores.json").read_text())
    assert [e["score"] for e in scores["images"][3:]] == [e["score"] for e in theirs["images"]]
    assert [after[e["map"]] for e in scores["images"][3:]] == [(tmp_path / "q" / e["map"]).read_bytes()
                                                               for e in theirs["images"]]
    assert scores["model_sha256"] == hashlib.sha256((tiny["run"] / "model.pt").read_bytes()).hexdigest()
    # a finished predict: nothing to resume, and nothing touched
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    refused(status, err, "was not stopped", "nothing to resume")
    assert _files(out) == after


def test_resume_refuses_other_images_settings_or_folders(tiny, tmp_path, capsys, monkeypatch):
    """A resume that would mix maps of other settings, another model or other images into one list
    is refused, and leaves the stopped output as it was."""
    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=4, done=2)
    before = _files(out)
    base = ["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"]
    status, _, err = cli(base + ["--smooth", "3"], capsys)
    refused(status, err, "--resume", "settings", "smooth")
    status, _, err = cli(base + ["--overwrite"], capsys)
    refused(status, err, "--resume", "--overwrite")
    (src / "im3.png").unlink()
    status, _, err = cli(base, capsys)
    refused(status, err, "was given 4 image(s), this one 3")
    (src / "im3.png").write_bytes((src / "im2.png").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (other / name).write_bytes((src / "im0.png").read_bytes())
    status, _, err = cli(["predict", tiny["run"], other, "--out", out, "--device", "cpu", "--resume"], capsys)
    refused(status, err, "image 1 of the predict stopped", "a.png")
    assert _files(out) == before
    status, _, err = cli(["predict", tiny["run"], src, "--out", tmp_path / "none", "--device", "cpu", "--resume"], capsys)
    refused(status, err, "no output of defect-fast predict to resume")
    assert not (tmp_path / "none").exists()


def test_resume_does_again_what_was_removed_and_takes_the_run_at_any_path(tiny, tmp_path, capsys, monkeypatch):
    """A kept map removed since the stop was listed in the finished scores.json all the same; the
    run given at another path (its model.pt) was refused though its SHA-256 is the same."""
    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=5, done=3)
    (out / json.loads((out / "scores.json").read_text())["images"][1]["map"]).unlink()
    status, stdout, err = cli(["predict", tiny["run"] / "model.pt", src, "--out", out, "--device", "cpu", "--resume"],
                              capsys)
    assert status == 0 and "of image 2 is gone: the images from it on are predicted again" in err, err
    assert "4 of them now, 1 before the stop" in stdout
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["images"]) == 5 and all((out / e[k]).is_file() for e in scores["images"] for k in ("map", "overlay"))


def test_resume_takes_the_same_images_named_another_way(tiny, tmp_path, capsys, monkeypatch):
    """The images given relative where the stopped predict had them absolute (or from another
    folder) were refused as other images: "image 1 ... was /.../in/im0.png, here it is in/im0.png"."""
    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=4, done=2)
    assert Path(json.loads((out / "scores.json").read_text())["images"][0]["image"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    status, stdout, err = cli(["predict", tiny["run"], "in", "--out", "p", "--device", "cpu", "--resume"], capsys)
    assert status == 0 and "2 of them now, 2 before the stop" in stdout, err
    images = json.loads((out / "scores.json").read_text())["images"]
    assert [e["image"] for e in images] == [str(Path("in") / f"im{i}.png") for i in range(4)]  # named as now, all


def test_a_resume_flags_a_blank_frame_an_earlier_version_judged_by_its_score(tiny, tmp_path, capsys, monkeypatch):
    """A predict stopped under an earlier version, which wrote a blank frame's verdict by its score
    ("defective": false), kept that verdict beside a summary saying blank frames are flagged."""
    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=3, done=2)
    scores = json.loads((out / "scores.json").read_text())
    scores["images"][0].update(blank=True, defective=False)
    (out / "scores.json").write_text(json.dumps(scores))
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    assert status == 0, err
    assert json.loads((out / "scores.json").read_text())["images"][0]["defective"] is True


def test_resume_refuses_another_precision_an_earlier_version_s_list_and_a_predict_at_work(tiny, tmp_path, capsys,
                                                                                         monkeypatch):
    """Scores of another precision (a stop on a GPU, a resume on a CPU) were mixed into one list; a
    folder of an earlier version was refused as of "another model file or settings", and one whose
    predict was still at work as "killed"."""
    from defect_fast.safety import RunLock

    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=4, done=2)
    scores_json = out / "scores.json"
    written = json.loads(scores_json.read_text())
    base = ["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"]
    other = "float32" if written["precision"] != "float32" else "bfloat16"
    scores_json.write_text(json.dumps({**written, "precision": other}))
    status, _, err = cli(base, capsys)
    refused(status, err, "another model file or settings", f"precision {other!r} -> {written['precision']!r}")
    scores_json.write_text(json.dumps({k: v for k, v in written.items()
                                       if k not in ("model_sha256", "precision", "stride", "smooth", "blend")}))
    status, _, err = cli(base, capsys)
    refused(status, err, "of an earlier defect-fast", "--overwrite")
    # one that recorded the model file but not yet the precision: no option gives a precision to match
    scores_json.write_text(json.dumps({k: v for k, v in written.items() if k != "precision"}))
    status, _, err = cli(base, capsys)
    refused(status, err, "of an earlier defect-fast", "(precision); predict all again with --overwrite")
    scores_json.unlink()
    lock = RunLock(out).acquire()
    try:
        status, _, err = cli(base, capsys)
        refused(status, err, "in use")
    finally:
        lock.release()
    status, _, err = cli(base, capsys)
    refused(status, err, "has no scores.json")


def test_a_resumed_predict_that_fails_keeps_what_is_done(tiny, tmp_path, capsys, monkeypatch):
    """An error in a resumed predict (an image changed since its check) removed nothing of the
    earlier command's images only by luck of the order: the images done, before and now, are
    kept and listed as stopped, and a second resume finishes."""
    from defect_fast import visualize
    from defect_fast.data.io import DataError

    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=5, done=2)
    real, drawn = visualize.save_overlay, []

    def fails_at_the_second(*a, **k):
        if len(drawn) == 1:
            raise DataError("im3.png: changed since it was checked")
        drawn.append(1)
        return real(*a, **k)

    monkeypatch.setattr(visualize, "save_overlay", fails_at_the_second)
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    assert status == 2 and "changed since it was checked" in err and "of 3 of 5 image(s) are kept" in err, err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["stopped"] == {"images_done": 3, "images_given": 5}
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(e["map"]).name for e in scores["images"])
    monkeypatch.setattr(visualize, "save_overlay", real)
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    assert status == 0, err
    assert len(json.loads((out / "scores.json").read_text())["images"]) == 5


def test_a_predict_stopped_as_it_writes_its_list_keeps_every_image(tiny, tmp_path, capsys, monkeypatch):
    """A stop while the scores.json of a finished predict was written removed every image (with
    --overwrite, the earlier output was gone too); SIGTERM's stop says so by its status (143)."""
    from defect_fast import cli as cli_mod, visualize

    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(sorted((tiny["data"] / "test" / "good").glob("*.png"))[:3]):
        Image.open(p).save(src / f"im{i}.png")
    restore = _ctrl_c_in_each_list_write(monkeypatch)
    out = tmp_path / "p"
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu"], capsys)
    assert status == 130 and "of 3 of 3 image(s) are kept" in err, err
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["images"]) == 3 and "stopped" not in scores  # all done: the list is whole
    restore()
    real_overlay = visualize.save_overlay

    def terminated(*a, **k):
        raise cli_mod._Terminated  # what the command line's SIGTERM handler raises

    monkeypatch.setattr(visualize, "save_overlay", terminated)
    # (behind the error boundary only: main() then ends the process by the signal, this one here)
    status = run_main(cli_mod._run, [str(a) for a in ("predict", tiny["run"], src, "--out", out, "--device", "cpu",
                                                      "--overwrite")])
    err = capsys.readouterr().err
    assert status == 143 and "0 of 3 image(s) are kept" in err, err
    monkeypatch.setattr(visualize, "save_overlay", real_overlay)
    assert list((out / "maps").iterdir()) == [] and json.loads((out / "scores.json").read_text())["images"] == []


def test_images_far_from_the_trained_proportions_are_said_everywhere(tiny, tmp_path, capsys):
    """Every image is stretched to the model's square input: a 16:1 strip of the trained surface is
    stretched otherwise than the square images the model learnt (its defects can pass unseen).
    The run records its training images' proportions; predict, evaluate, report, diagnose, watch
    and Detector.predict say so of such an image, not of one within the training images' range."""
    import warnings

    from defect_fast.data import DataWarning
    from defect_fast.detect import Detector

    state = torch.load(tiny["run"] / "model.pt", map_location="cpu", weights_only=True)
    assert state["trained_proportions"] == [1.0, 1.0]  # the synthetic set's square images
    src = tmp_path / "in"
    src.mkdir()
    good = Image.open(sorted((tiny["data"] / "test" / "good").glob("*.png"))[0]).convert("RGB")
    strip = Image.fromarray(np.tile(np.asarray(good), (1, 16, 1)))  # 1024 x 64
    strip.save(src / "strip.png")
    good.resize((72, 64)).save(src / "near.png")  # 1.125:1, within the margin
    status, _, err = cli(["predict", tiny["run"], src, "--out", tmp_path / "p", "--device", "cpu"], capsys)
    assert status == 0, err
    said = [ln for ln in err.splitlines() if "other proportions than the training images" in ln]
    assert len(said) == 1 and "1 of 2 images" in said[0] and "strip.png (1024x64)" in said[0], err
    assert "near.png" not in said[0]

    det = Detector.load(tiny["run"], device="cpu")
    assert det.trained_proportions == [1.0, 1.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.predict(np.asarray(good.resize((80, 64))))  # 1.25:1, within the margin: nothing said
        det.predict([np.asarray(strip), np.asarray(good)])
        det.predict(np.asarray(strip))  # said once a Detector: a per-frame loop is not one warning a frame
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        "predict (said once a Detector): 1 of 2 images are of other proportions than the training images "
        "(width:height 1:1): image 0 (1024x64); every image is stretched to the model's square input, so their "
        "defects are stretched otherwise than the model learnt and can pass unseen: inspect pieces of the trained "
        "proportions, or train on images of these"]
    wide = Detector.load(tiny["run"], device="cpu")
    wide.trained_proportions = [4.0, 16.0]  # a line-scan camera's strips
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # at the model's size: brought to it (a textured frame: a grey one is named as a blank frame)
        wide.predict(torch.randint(60, 200, (1, 3, SIZE, SIZE), dtype=torch.uint8))
    assert not [w for w in caught if issubclass(w.category, DataWarning)]
    with pytest.warns(DataWarning, match=r"\(width:height 4:1 to 16:1\): image 0 \(32x64\)"):
        wide.predict(torch.randint(60, 200, (1, 3, 64, 32), dtype=torch.uint8))
    det.save(tmp_path / "saved.pt")  # a model file the Detector writes keeps them
    assert Detector.load(tmp_path / "saved.pt", device="cpu").trained_proportions == [1.0, 1.0]

    # evaluate and report on a test set with the strip among its defect-free images
    data = tmp_path / "data"
    (data / "test" / "good").mkdir(parents=True)
    for p in sorted((tiny["data"] / "test" / "good").glob("*.png"))[:3]:
        (data / "test" / "good" / p.name).write_bytes(p.read_bytes())
    strip.save(data / "test" / "good" / "strip.png")
    status, _, err = cli(["evaluate", tiny["run"], data, "--device", "cpu"], capsys)
    assert status == 0 and "1 of 4 images are of other proportions" in err and "strip.png (1024x64)" in err, err
    status, _, err = cli(["report", tiny["run"], data, "--out", tmp_path / "r.html", "--device", "cpu"], capsys)
    assert status == 0 and "1 of 4 images are of other proportions" in err, err
    assert "1 of 4 images are of other proportions" in (tmp_path / "r.html").read_text()  # the page says it too
    status, _, err = cli(["diagnose", tiny["run"], data, "--out", tmp_path / "d", "--device", "cpu"], capsys)
    assert status == 0 and "1 of 4 images are of other proportions" in err, err  # its table is evaluate's

    # watch: said once a session
    status, stdout, err = cli(["watch", tiny["run"], src, "--out", tmp_path / "w", "--once", "--device", "cpu",
                               "--poll", "0.05", "--settle", "0.05"], capsys)
    assert status == 0, err
    assert (stdout + err).count("other proportions than the training images") == 1, stdout + err

    # a damaged record is refused, not taken for proportions
    from defect_fast.runs import RunError

    for bad in ([2.0, 1.0], [1.0], "1:1", [0.0, 1.0], [1.0, float("nan")]):
        with pytest.raises(RunError, match="trained_proportions .* are not a \\[lowest, highest\\] pair"):
            Detector.from_state({**state, "trained_proportions": bad}, device="cpu")


def test_maps_drawn_to_their_own_maximum_say_it_in_scores_json(tiny, tmp_path, capsys):
    """With --map other than the one the run was calibrated on, no threshold applies and each map
    is drawn to its own maximum: scores.json said "map_scale": null and no image's, so a good
    image's map looked as saturated as a defective one's and no PNG could be read back."""
    from defect_fast.detect import Detector

    src = tiny["data"] / "test" / "scratch"
    status, _, err = cli(["predict", tiny["run"], src, "--out", tmp_path / "p", "--map", "residual", "--device", "cpu"],
                         capsys)
    assert status == 0, err
    doc = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert doc["map_scale"] is None and doc["images"]
    det = Detector.load(tiny["run"], device="cpu", map_kind="residual")
    for e in doc["images"]:
        m = det.predict(e["image"])["maps"][0]
        assert e["map_scale"] == pytest.approx(float(m.max()), rel=1e-6)
        png = np.asarray(Image.open(tmp_path / "p" / e["map"]))
        assert png.max() == 255 and np.abs(png / 255 * e["map_scale"] - m.numpy()).max() <= e["map_scale"] / 255 + 1e-6
    status, _, err = cli(["predict", tiny["run"], src, "--out", tmp_path / "q", "--device", "cpu"], capsys)
    doc = json.loads((tmp_path / "q" / "scores.json").read_text())
    assert status == 0 and doc["map_scale"] > 0 and not any("map_scale" in e for e in doc["images"])  # one scale


def test_a_leading_tilde_is_the_home_folder_for_every_path_given(tiny, tmp_path, capsys, monkeypatch):
    """A "~" no shell expanded (quoted, a service's unit file, a program's argument list): train
    read it as the home folder, predict said its input did not exist and made a folder named "~"
    in the current one for its --out, printing "wrote ... to ~/out" as if in the home folder."""
    import shutil

    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    shutil.copytree(tiny["data"] / "test" / "good", home / "parts")
    shutil.copytree(tiny["run"], home / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    status, _, err = cli(["predict", "~/run", "~/parts", "--out", "~/out", "--device", "cpu"], capsys)
    assert status == 0, err
    assert json.loads((home / "out" / "scores.json").read_text())
    assert list(here.iterdir()) == []  # no "~" folder here
    status, _, err = cli(["evaluate", "~/run", tiny["data"], "--json", "~/m.json", "--device", "cpu"], capsys)
    assert status == 0 and (home / "m.json").is_file(), err
    # a folder named "~" here, which earlier versions wrote (a watch's journal): refused as ambiguous,
    # where the home folder's would have been taken without a word (a new journal, images judged again)
    (here / "~" / "out").mkdir(parents=True)
    status, _, err = cli(["watch", "~/run", "~/parts", "--out", "~/out", "--once", "--device", "cpu"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"~/out names both {here / '~' / 'out'}" in err and f"and {home / 'out'}" in err, err
    # a "~" here that is a link to the home folder names one folder: taken
    shutil.rmtree(here / "~")
    (here / "~").symlink_to(home)
    status, _, err = cli(["predict", "~/run", "~/parts", "--out", "~/out2", "--device", "cpu"], capsys)
    assert status == 0 and (home / "out2" / "scores.json").is_file(), err


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


def test_diagnose_writes_figures_and_locations(tiny, tmp_path, capsys):
    out = tmp_path / "diag"
    # a band over the whole 64-px map is refused; a seam band of any width is empty here (one 64-px patch)
    status, _stdout, err = cli(["diagnose", tiny["run"], tiny["data"], "--out", out, "--border", "32"], capsys)
    assert status == 2 and "--border 32: a band that wide covers the whole 64 x 64 map" in err and not out.exists()
    argv = ["diagnose", tiny["run"], tiny["data"], "--out", out, "--per-class", "2", "--border", "4", "--seam", "1",
            "--device", "cpu"]
    status, stdout, err = cli(argv, capsys)
    assert status == 0, err
    assert "border band 4 px" in stdout and "interior" in stdout
    doc = json.loads((out / "locations.json").read_text())
    assert set(doc["figures"]) == {"good", "scratch", "spot"}
    for name in doc["figures"].values():
        assert Image.open(out / name).size[0] > 200
    good = doc["locations"]["good"]["share"]
    assert sum(good[k] for k in ("border", "seam_only", "interior")) == pytest.approx(1.0)
    assert doc["locations"]["area"]["border"] == pytest.approx(1 - (56 / 64) ** 2)
    assert len(doc["scores"]) == len(doc["images"]) == 24
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"good.png", "scratch.png", "spot.png", "locations.json"}
    before = (out / "locations.json").read_bytes()
    refused(*cli(argv, capsys)[::2], "--out", "--overwrite")
    assert (out / "locations.json").read_bytes() == before
    (out / "my_notes.txt").write_text("keep")
    assert cli(argv + ["--overwrite", "--per-class", "1"], capsys)[0] == 0
    assert (out / "my_notes.txt").read_text() == "keep"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    refused(*cli(argv[:4] + [mine] + argv[5:] + ["--overwrite"], capsys)[::2], "--out", "not empty")
    assert sorted(os.listdir(mine)) == ["a.txt"]
    status, _, err = cli(argv[:4] + [tmp_path / "d2"] + argv[5:] + ["--per-class", "0"], capsys)
    assert status == 2 and "--per-class" in err and not (tmp_path / "d2").exists()


def test_a_diagnose_overwrite_stopped_on_the_way_keeps_the_earlier_diagnosis(tiny, tmp_path, capsys, monkeypatch):
    """--overwrite cleared the earlier diagnosis before its work began: a Ctrl-C or an error while
    the maps or figures were made left --out empty (the folder itself removed)."""
    import defect_fast.diagnose as diagnose_mod

    out = tmp_path / "diag"
    argv = ["diagnose", tiny["run"], tiny["data"], "--out", out, "--per-class", "1", "--border", "4", "--seam", "1",
            "--device", "cpu"]
    assert cli(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = diagnose_mod.draw_grid

    def stopped(*args, **kwargs):
        real(*args, **kwargs)  # its figures written (in the work folder), then the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnose_mod, "draw_grid", stopped)
    status, _, err = cli(argv + ["--overwrite", "--per-class", "2"], capsys)
    assert status == 130 and "interrupted" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(diagnose_mod, "draw_grid", real)
    status, stdout, err = cli(argv + ["--overwrite", "--per-class", "2"], capsys)
    assert status == 0, err
    assert f"figures and locations.json in {out}" in stdout and "border band 4 px" in stdout
    assert {p.name for p in out.iterdir()} == set(before)
    assert Image.open(out / "good.png").size[1] > Image.open(io.BytesIO(before["good.png"])).size[1]  # 2 rows, not 1


def _another_model_over(run: Path) -> None:
    """Replace RUN/model.pt, as a calibrate --overwrite finishing does, by another model's file (the
    same weights at another threshold): another version."""
    from defect_fast.safety import save_with_digest

    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    state["calibration"] = {**state["calibration"], "image_threshold": 123.0}
    save_with_digest({k: v for k, v in state.items() if k != "tensor_digest"}, run / "model.pt")


def _replaced_once_loaded(tiny, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the tiny run whose model.pt another model's file replaces as soon as
    ``Detector.load`` has read it."""
    import shutil

    from defect_fast.detect import Detector

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    real_load = Detector.load

    def load_then_replaced(*args, **kwargs):
        det = real_load(*args, **kwargs)
        _another_model_over(run)
        return det

    monkeypatch.setattr(Detector, "load", staticmethod(load_then_replaced))
    return run


def test_watch_says_a_model_file_replaced_even_while_it_was_being_loaded(tiny, tmp_path, capsys, monkeypatch):
    """The command looked at the model file after loading it: a calibrate --overwrite finishing
    during the load became what the file "was", and its replacement was never said."""
    import defect_fast.watch as watch_mod

    run = _replaced_once_loaded(tiny, tmp_path, monkeypatch)
    said = []

    def fake_watch(*args, model_changed=None, **kwargs):  # one look at the folder, as the loop's listing makes
        said.append(model_changed())
        said.append(args[1])  # the ModelInfo its journal lines carry
        return {}

    monkeypatch.setattr(watch_mod, "watch", fake_watch)
    src = tmp_path / "in"
    src.mkdir()
    status, _out, err = cli(["watch", run, src, "--out", tmp_path / "w", "--device", "cpu"], capsys)
    assert status == 0, err
    assert said and said[0].startswith(f"{run / 'model.pt'}: replaced since watch loaded it"), said
    # the journal's model version is the one judging, the file loaded: it was read from the file there after the load
    info = said[1]
    assert info.version == tiny["version"] and info.image_threshold == pytest.approx(tiny["threshold"])
    assert hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()[:12] != tiny["version"]


def test_export_records_the_digest_of_the_model_file_it_loaded(tiny, tmp_path, capsys, monkeypatch):
    """The description's source_digest was read from the run's model file after the trace: a file
    replaced meanwhile (a calibrate --overwrite) was named as the source of a graph and thresholds
    that came from the file before it."""
    run = _replaced_once_loaded(tiny, tmp_path, monkeypatch)
    out = tmp_path / "m.ts"
    status, _out, err = cli(["export", run, "--format", "torchscript", "--out", out], capsys)
    assert status == 0, err
    desc = json.loads((tmp_path / "m.ts.json").read_text())
    assert desc["source_digest"].startswith(f"sha256:{tiny['version']}")
    assert desc["thresholds"]["score"] == pytest.approx(tiny["threshold"])


def test_report_names_the_version_of_the_model_file_it_loaded(tiny, tmp_path, capsys, monkeypatch):
    """report hashed the model file after loading it: a file replaced meanwhile gave the page the
    new file's version beside the thresholds of the one loaded."""
    import shutil

    import defect_fast.runs as runs

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    real = runs.load_model_file

    def load_then_replaced(where):
        loaded = real(where)
        _another_model_over(run)
        return loaded

    monkeypatch.setattr(runs, "load_model_file", load_then_replaced)
    out = tmp_path / "r.html"
    status, _out, err = cli(["report", run, tiny["data"], "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    text = out.read_text()
    assert f"cmaae ({tiny['version']})" in text
    assert hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()[:12] not in text


def test_a_loaded_detector_names_its_file_s_bytes_only_for_that_file_and_until_saved(tiny, tmp_path):
    """The digest of the bytes loaded stood for any file given with the Detector: calibrated and
    saved as another file, the Detector's version was still the first file's."""
    import shutil

    from defect_fast.calibration import ModelInfo
    from defect_fast.detect import Detector

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    det = Detector.load(run, device="cpu")
    assert det.loaded_sha256(run / "model.pt")[:12] == tiny["version"] and det.loaded_sha256(tmp_path / "x.pt") is None
    det.calibrate(torch.stack([torch.full((3, 64, 64), v, dtype=torch.uint8) for v in (90, 110, 130)])
                  + torch.randint(0, 20, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    det.save(tmp_path / "recal.pt")
    new = hashlib.sha256((tmp_path / "recal.pt").read_bytes()).hexdigest()[:12]
    assert ModelInfo.from_detector(det, tmp_path / "recal.pt").version == new != tiny["version"]
    assert det.loaded_sha256(run / "model.pt") is None  # saved: read from the file again


def test_a_loaded_detector_s_file_is_the_file_its_path_names(tiny, tmp_path, monkeypatch):
    """The file a Detector came from was named by its path with ".." taken off as text: through a
    linked folder, a/ln/../model.pt (the file real/model.pt) counted as a/model.pt, another model.
    And a model file removed once read (an output folder cleared) failed the load after it."""
    import shutil

    import defect_fast.detect as detect_mod
    from defect_fast.detect import Detector

    real, a = tmp_path / "real", tmp_path / "a"
    shutil.copytree(tiny["run"], real)
    (real / "sub").mkdir()
    a.mkdir()
    shutil.copy(real / "model.pt", a / "model.pt")
    (a / "ln").symlink_to(real / "sub")
    det = Detector.load(a / "ln" / ".." / "model.pt", device="cpu")
    assert det.loaded_sha256(real / "model.pt")[:12] == tiny["version"]
    assert det.loaded_sha256(a / "model.pt") is None  # another file (a copy, here)
    copy = tmp_path / "copy"
    shutil.copytree(tiny["run"], copy)
    read = detect_mod.load_model_file

    def read_then_removed(path):
        loaded = read(path)
        (copy / "model.pt").unlink()
        return loaded

    monkeypatch.setattr(detect_mod, "load_model_file", read_then_removed)
    det = Detector.load(copy, device="cpu")
    assert det.loaded_sha256(copy / "model.pt")[:12] == tiny["version"]


def test_a_fifo_or_device_in_place_of_a_list_the_command_reads_back_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """A FIFO in place of the output folder's manifest or of a stopped predict's scores.json made
    predict --resume (and --overwrite) wait for ever; a link to /dev/zero read until memory ran out."""
    import os

    from defect_fast.safety import MANIFEST_NAME

    src, out = _stopped_predict_at(tiny, tmp_path, capsys, monkeypatch, images=3, done=1)
    (out / "scores.json").unlink()
    os.mkfifo(out / "scores.json")
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    refused(status, err, "its scores.json cannot be read", "not a regular file")
    (out / "scores.json").unlink()
    (out / "scores.json").symlink_to("/dev/zero")
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--resume"], capsys)
    refused(status, err, "its scores.json cannot be read", "not a regular file")
    (out / MANIFEST_NAME).unlink()
    os.mkfifo(out / MANIFEST_NAME)
    status, _, err = cli(["predict", tiny["run"], src, "--out", out, "--device", "cpu", "--overwrite"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
