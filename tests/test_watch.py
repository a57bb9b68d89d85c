"""The drop-folder service: exactly one result per image, across kill -9, with bad files set aside.
Its file-system events: tests/test_watch_events.py."""
import contextlib
import errno
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast import watch as watch_mod
from defect_fast.calibration import ModelInfo
from defect_fast.safety import RunInUse, UserError
from defect_fast.watch import Journal, WatchError, is_temporary_name, output_name, watch

SIZE = 32


def stub_predict(images):
    x = images.float() / 255.0
    maps = x.mean(dim=1)
    return {"maps": maps, "scores": maps.flatten(1).max(dim=1).values, "recon": images.float() / 127.5 - 1}


INFO = ModelInfo(SIZE, name="stub", version="v1", image_threshold=0.5, pixel_threshold=0.9)


def png_bytes(seed: int, bright: float = 0.4, size: int = SIZE) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    a = (rng.random((size, size, 3)) * 255 * bright).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def run_once(in_dir, out_dir, **kw):
    lines = []
    kw.setdefault("settle", 0.05)
    kw.setdefault("poll_interval", 0.05)
    res = watch(stub_predict, INFO, in_dir, out_dir, once=True, handle_signals=False, log=lines.append, **kw)
    return res, lines


def journal(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "results.jsonl").read_text().splitlines()]


def test_names():
    assert is_temporary_name(".hidden.png") and is_temporary_name("a.png.tmp") and is_temporary_name("a.PART")
    assert is_temporary_name("a.png~") and not is_temporary_name("a.png")
    assert output_name("sub/part.01.png", "ab" * 32) == "sub__part.01_" + "ab" * 6


def test_once_judges_rejects_and_ignores(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "dark.png").write_bytes(png_bytes(0, bright=0.3))  # max < 0.5: pass
    (src / "bright.png").write_bytes(png_bytes(1, bright=1.0))  # max > 0.5: fail
    (src / "broken.png").write_bytes(png_bytes(2)[:60])  # truncated
    (src / "coming.png.part").write_bytes(b"xx")
    (src / ".hidden.png").write_bytes(png_bytes(3))
    (src / "notes.txt").write_text("not an image")
    res, lines = run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert sorted(recs) == ["bright.png", "broken.png", "dark.png"]
    assert recs["dark.png"]["result"] == "pass" and recs["bright.png"]["result"] == "fail"
    assert recs["bright.png"]["score"] > 0.5 > recs["dark.png"]["score"]
    assert recs["bright.png"]["regions"] and all(r["peak"] > 0.9 for r in recs["bright.png"]["regions"])
    size = recs["bright.png"]["map_size"]  # the frame of the region boxes: the photo's own size
    assert size == [SIZE, SIZE]
    assert all(0 <= r["x0"] <= r["x1"] <= size[0] and 0 <= r["y0"] <= r["y1"] <= size[1] for r in recs["bright.png"]["regions"])
    assert recs["dark.png"]["regions"] == []
    assert recs["dark.png"]["sha256"] == hashlib.sha256((src / "dark.png").read_bytes()).hexdigest()
    assert recs["dark.png"]["model_version"] == "v1" and recs["dark.png"]["threshold"] == 0.5
    bad = recs["broken.png"]
    assert bad["result"] == "rejected" and ("truncated" in bad["reason"] or "corrupt" in bad["reason"])
    assert (out / bad["rejected_to"]).is_file() and not (src / "broken.png").exists()
    for name in ("dark.png", "bright.png"):
        assert (out / recs[name]["map"]).is_file() and (out / recs[name]["overlay"]).is_file()
        assert Image.open(out / recs[name]["map"]).size == (SIZE, SIZE)
    assert len(list((out / "maps").iterdir())) == 2
    assert (src / "coming.png.part").exists() and (src / "notes.txt").exists()
    assert any("notes.txt" in line for line in lines)
    status = json.loads((out / "status.json").read_text())
    assert status["counts"] == {"pass": 1, "fail": 1, "rejected": 1, "total": 3} and status["state"] == "stopped"
    assert res["session"]["total"] == 3
    # a second run finds everything done
    res2, _ = run_once(src, out)
    assert res2["session"]["total"] == 0 and len(journal(out)) == 3 and res2["counts"]["total"] == 3
    # new content under an old name is a new image; a renamed-in file is picked up
    (src / "dark.png").write_bytes(png_bytes(10, bright=0.2))
    (src / "late.png.tmp").write_bytes(png_bytes(11))
    os.replace(src / "late.png.tmp", src / "late.png")
    res3, _ = run_once(src, out)
    assert res3["session"]["total"] == 2
    recs = journal(out)
    assert [r["image"] for r in recs].count("dark.png") == 2 and len({r["sha256"] for r in recs}) == 5


def test_threshold_override_and_required(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0, bright=0.3))
    run_once(src, tmp_path / "out", threshold=0.1)
    assert journal(tmp_path / "out")[0]["result"] == "fail"
    # an image is flagged above the threshold, not at it (as predict, evaluate and report judge)
    score = journal(tmp_path / "out")[0]["score"]
    run_once(src, tmp_path / "at", threshold=score)
    assert journal(tmp_path / "at")[0]["result"] == "pass"
    run_once(src, tmp_path / "below", threshold=float(np.nextafter(score, -np.inf)))
    assert journal(tmp_path / "below")[0]["result"] == "fail"
    assert issubclass(WatchError, UserError)  # one line at the command line, exit status 2
    with pytest.raises(WatchError, match="no image threshold"):
        watch(stub_predict, ModelInfo(SIZE), src, tmp_path / "o2", once=True, handle_signals=False, log=lambda m: None)
    with pytest.raises(WatchError, match="does not exist"):
        run_once(tmp_path / "missing", tmp_path / "o3")


def test_a_resumed_journal_judged_at_another_threshold_is_said(tmp_path):
    """Restarted at another threshold (e.g. --far), the service says how many earlier results were
    judged at which one; they stand, and the new images are judged at the new one. At the same
    threshold and model nothing is said."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0, bright=0.3))
    run_once(src, tmp_path / "out", threshold=0.1)
    _res, lines = run_once(src, tmp_path / "out", threshold=0.1)
    assert not any(line.startswith("note:") for line in lines)
    (src / "b.png").write_bytes(png_bytes(1, bright=0.3))
    _res, lines = run_once(src, tmp_path / "out", threshold=0.9)
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ["note: 1 earlier result(s) were judged at threshold 0.1 (model v1), not at this session's "
                     "threshold 0.9 (model v1) (1 of them would get the other verdict at it); they stand as recorded, "
                     "new images are judged at 0.9"]
    # at a threshold that keeps its verdict: how many were judged apart, and that none would change
    _res, lines = run_once(src, tmp_path / "out", threshold=0.2)
    assert [line for line in lines if line.startswith("note:")][0].startswith(
        "note: 2 earlier result(s) were judged at threshold 0.1 (model v1), threshold 0.9 (model v1), not at this "
        "session's threshold 0.2 (model v1) (")
    assert json.loads((tmp_path / "out" / "status.json").read_text())["threshold_source"] == "given to watch()"
    recs = {r["image"]: r for r in journal(tmp_path / "out")}
    assert (recs["a.png"]["threshold"], recs["a.png"]["result"]) == (0.1, "fail")
    assert (recs["b.png"]["threshold"], recs["b.png"]["result"]) == (0.9, "pass")


def test_second_process_on_same_out_is_refused(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    held = watch_mod._lock(out)
    try:
        with pytest.raises(RunInUse, match=f"in use by PID {os.getpid()}"):
            run_once(src, out)
    finally:
        held.release()
    run_once(src, out)  # free again


def test_torn_last_line_is_cut_and_redone(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.png").write_bytes(png_bytes(i))
    run_once(src, out)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    # crash in the middle of the third line's write: half of it on disk, its map already written
    (out / "results.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    (out / "maps" / ".tmp-123-x_map.png").write_bytes(b"partial")  # a map write cut short
    res, log = run_once(src, out)
    assert any("torn last line" in line for line in log)
    recs = journal(out)
    assert len(recs) == 3 and len({(r["image"], r["sha256"]) for r in recs}) == 3
    assert res["session"]["total"] == 1
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(r["map"]).name for r in recs)


def test_whole_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"image":"a.png","sha256":"00"}\n{"image":"b.png","sha256":"11"}')
    j = Journal(path)
    j.append({"image": "c.png", "sha256": "22"})
    j.close()
    assert [json.loads(x)["image"] for x in path.read_text().splitlines()] == ["a.png", "b.png", "c.png"]


class Crash(BaseException):
    """Stands in for kill -9 at one point of the work (BaseException: nothing catches it)."""


@pytest.mark.parametrize("where,nth", [("map", 1), ("map", 3), ("overlay", 2), ("journal", 1), ("journal", 3),
                                       ("journal", 4), ("move", 1), ("copied", 1), ("status", 2)])
def test_crash_at_each_step_then_restart_gives_one_result_each(tmp_path, monkeypatch, where, nth):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(5):
        (src / f"p{i}.png").write_bytes(png_bytes(i, bright=0.3 + 0.15 * i))
    (src / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    crash_at(monkeypatch, where, nth)
    with pytest.raises(Crash):
        run_once(src, out, batch_size=2)
    monkeypatch.undo()
    run_once(src, out, batch_size=2)
    recs = journal(out)
    assert sorted(r["image"] for r in recs) == ["p0.png", "p1.png", "p2.png", "p3.png", "p4.png", "zz_bad.png"]
    assert len({r["sha256"] for r in recs}) == 6
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(r["map"]).name for r in recs if "map" in r)
    assert len(list((out / "overlays").iterdir())) == 5
    assert [p.name for p in (out / "rejected").iterdir()] == ["zz_bad.png"] and not (src / "zz_bad.png").exists()
    assert json.loads((out / "status.json").read_text())["counts"]["total"] == 6


def crash_at(monkeypatch, where: str, nth: int) -> None:
    """A :class:`Crash` at the ``nth`` call of one step of the work: the write of a "map",
    "overlay" or "status" file (its temporary file on disk, never renamed), a "journal" line
    (before it is written), a "move" (before it), or a move across file systems "copied" (the copy
    in place, the original not yet removed)."""
    calls = {"n": 0}

    def bomb():
        calls["n"] += 1
        if calls["n"] == nth:
            raise Crash(where)

    real_write, real_append, real_move = watch_mod._atomic_write, Journal.append, watch_mod._move
    if where in ("map", "overlay", "status"):
        suffix = {"map": "_map.png", "overlay": "_overlay.png", "status": "status.json"}[where]

        def atomic_write(final, write, sync=True):
            if final.name.endswith(suffix):
                tmp = final.with_name(".tmp-999-" + final.name)
                write(tmp)  # the temporary file is on disk, the rename never happens
                bomb()
            return real_write(final, write, sync)

        monkeypatch.setattr(watch_mod, "_atomic_write", atomic_write)
    elif where == "journal":
        def append(self, record):
            bomb()
            return real_append(self, record)

        monkeypatch.setattr(Journal, "append", append)
    elif where == "move":
        def move(a, b, sig=None):
            bomb()
            return real_move(a, b, sig)

        monkeypatch.setattr(watch_mod, "_move", move)
    else:  # a move across file systems: the copy is in place, the original not yet removed
        def copy_then_crash(a, b, sig=None):
            b.write_bytes(a.read_bytes())
            bomb()
            return real_move(a, b, sig)

        monkeypatch.setattr(watch_mod, "_move", copy_then_crash)


@pytest.mark.parametrize("use_watchdog", [True, False])
def test_slow_writer_is_waited_for_and_stop_event(tmp_path, use_watchdog):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    data = png_bytes(5)
    stop = threading.Event()
    results = {}
    t = threading.Thread(target=lambda: results.update(watch(
        stub_predict, INFO, src, out, poll_interval=0.05, settle=0.4, stop=stop, handle_signals=False,
        use_watchdog=use_watchdog, log=lambda m: None)))
    t.start()
    with open(src / "slow.png", "wb") as f:  # a copy that trickles in, pausing less than `settle`
        for i in range(0, len(data), 400):
            f.write(data[i:i + 400])
            f.flush()
            time.sleep(0.1)
    deadline = time.time() + 20
    while time.time() < deadline and _count(out) < 1:
        time.sleep(0.05)
    stop.set()
    t.join(timeout=20)
    assert not t.is_alive()
    recs = journal(out)
    assert len(recs) == 1 and recs[0]["result"] in ("pass", "fail")
    assert recs[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert results["session"]["total"] == 1


def _count(out) -> int:
    try:
        return (Path(out) / "results.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# The bar (a real service process killed with SIGKILL twice while images arrive) runs through the
# command line: tests/test_cli_inspection.py::test_watch_sigkill_twice_through_the_command_line.


def test_a_line_lists_the_regions_of_highest_peak_and_counts_them_all(tmp_path):
    """64 separate spots: the line lists MAX_REGIONS of them (it listed 50 and said nothing of the
    rest), the brightest first, and regions_total counts all; a line with fewer has no count."""
    from defect_fast.watch import MAX_REGIONS

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[1::4, 1::4] = np.linspace(235, 255, 64).astype(np.uint8).reshape(8, 8, 1)  # 64 single-pixel spots
    Image.fromarray(a).save(src / "spots.png")
    b = np.zeros((SIZE, SIZE, 3), np.uint8)
    b[5, 5] = 255
    Image.fromarray(b).save(src / "one.png")
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    spots = recs["spots.png"]
    assert MAX_REGIONS == 50 and len(spots["regions"]) == MAX_REGIONS and spots["regions_total"] == 64
    peaks = [r["peak"] for r in spots["regions"]]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] == 1.0
    assert len(recs["one.png"]["regions"]) == 1 and "regions_total" not in recs["one.png"]


def test_a_12_bit_camera_s_frames_are_said_once_a_session(tmp_path):
    """16-bit files holding 12-bit data are read dark, at a few grey levels: the line's log says so once."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    frame = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) % 4096).astype(np.uint16)
    for name in ("a.png", "b.png"):
        Image.fromarray(frame).save(src / name)
    _res, lines = run_once(src, out)
    said = [line for line in lines if "16-bit images hold values up to 1023 at most" in line]
    assert len(said) == 1 and "said once a session" in said[0], lines
    assert len(journal(out)) == 2


def test_maps_overlays_and_region_boxes_are_at_the_photo_size(tmp_path):
    """A photo of another size than the model's: its map and overlay are written at the photo's
    size, and its region boxes are in the photo's pixels (map_size says so)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    a = np.zeros((48, 80, 3), np.uint8)  # 80 wide, 48 high; a bright block at x 50..69, y 10..29
    a[10:30, 50:70] = 255
    Image.fromarray(a).save(src / "wide.png")
    run_once(src, out)
    rec = journal(out)[0]
    assert rec["result"] == "fail" and rec["map_size"] == [80, 48]
    assert Image.open(out / rec["map"]).size == (80, 48) and Image.open(out / rec["overlay"]).size == (80, 48)
    (box,) = rec["regions"]
    # the block, give or take the two resizes (80x48 -> 32x32 -> 80x48) blurring its edges
    assert abs(box["x0"] - 50) <= 3 and abs(box["x1"] - 69) <= 3 and abs(box["y0"] - 10) <= 2 and abs(box["y1"] - 29) <= 2
    overlay = np.asarray(Image.open(out / rec["overlay"]))
    assert overlay[20, 60].astype(int).sum() > overlay[40, 10].astype(int).sum()  # the photo under the heat, in place


def test_a_bad_file_that_cannot_be_moved_is_judged_and_the_service_goes_on(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a_bad.png").write_bytes(png_bytes(2)[:60])
    (src / "b_good.png").write_bytes(png_bytes(3, bright=0.3))
    real_move = watch_mod._move

    def move(a, b, sig=None):
        if Path(a).name == "a_bad.png":
            raise PermissionError(1, "Operation not permitted", str(a))
        return real_move(a, b, sig)

    monkeypatch.setattr(watch_mod, "_move", move)
    for _ in range(2):  # the second start retries the move, says so, and goes on
        _, lines = run_once(src, out)
        recs = {r["image"]: r["result"] for r in journal(out)}
        assert recs == {"a_bad.png": "rejected", "b_good.png": "pass"} and len(journal(out)) == 2
        assert (src / "a_bad.png").exists() and any("left where it is" in line for line in lines)


def test_a_photo_without_memory_for_its_outputs_is_set_aside_alone(tmp_path, monkeypatch):
    import defect_fast.visualize as visualize

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "big.png").write_bytes(png_bytes(4, size=48))
    (src / "small.png").write_bytes(png_bytes(5, bright=0.3))
    real = visualize.save_overlay

    def overlay(image, m, path, scale, **kw):
        if image.shape[-1] == 48:
            raise MemoryError
        return real(image, m, path, scale, **kw)

    monkeypatch.setattr(visualize, "save_overlay", overlay)
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["small.png"]["result"] == "pass"
    assert recs["big.png"]["result"] == "rejected" and "too large" in recs["big.png"]["reason"]
    assert sorted(p.name for p in (out / "maps").iterdir()) == [Path(recs["small.png"]["map"]).name]
    assert (out / recs["big.png"]["rejected_to"]).is_file()


def test_a_reader_s_unexpected_error_sets_that_file_aside_and_the_line_goes_on(tmp_path, monkeypatch):
    """An exception of PIL's the readers did not turn into a DataError (struct.error on one photo's
    EXIF) stopped the service, and again at every start, on the same file."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "odd.png").write_bytes(png_bytes(4))
    (src / "fine.png").write_bytes(png_bytes(5, bright=0.3))
    real = watch_mod.read_image_at_both_sizes

    def reader(path, size, **kw):
        if Path(path).name == "odd.png":
            import struct

            raise struct.error("required argument is not an integer")
        return real(path, size, **kw)

    monkeypatch.setattr(watch_mod, "read_image_at_both_sizes", reader)
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["fine.png"]["result"] == "pass"
    assert recs["odd.png"]["result"] == "rejected"
    assert recs["odd.png"]["reason"] == "cannot be read (internal error struct.error: required argument is not an integer)"
    assert (out / recs["odd.png"]["rejected_to"]).is_file()


def test_an_image_the_model_gives_a_nan_score_is_set_aside_not_passed(tmp_path):
    """NaN > threshold is False: such an image passed, then the strict journal refused the line
    and the service stopped, on every restart again."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "nan.png").write_bytes(png_bytes(6, bright=0.9))
    (src / "fine.png").write_bytes(png_bytes(7, bright=0.3))

    def predict(images):
        res = stub_predict(images)
        bright = images.float().mean(dim=(1, 2, 3)) > 80
        res["scores"] = torch.where(bright, torch.tensor(float("nan")), res["scores"])
        return res

    res = watch(predict, INFO, src, out, once=True, handle_signals=False, log=lambda _m: None, settle=0.05,
                poll_interval=0.05)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["fine.png"]["result"] == "pass"
    assert recs["nan.png"]["result"] == "rejected" and "NaN or infinite" in recs["nan.png"]["reason"]
    assert (out / recs["nan.png"]["rejected_to"]).is_file() and res["session"]["rejected"] == 1


def test_a_blank_frame_is_set_aside_not_judged(tmp_path):
    """A frame of one colour (a failed exposure, a covered lens) has nothing on it to judge; the
    reconstruction reproduces a flat grey frame, so its score passed it: it is rejected now, with
    its reason, as a bad file is, and the photos beside it are judged as before."""
    import io

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, value in (("grey.png", 40), ("white.png", 255)):
        buf = io.BytesIO()
        Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, format="PNG")
        (src / name).write_bytes(buf.getvalue())
    (src / "part.png").write_bytes(png_bytes(7, bright=0.3))
    res, lines = run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["part.png"]["result"] == "pass"
    for name in ("grey.png", "white.png"):  # the stub passes grey (score 0.16) and fails white: neither is judged
        assert recs[name]["result"] == "rejected" and recs[name]["reason"] == watch_mod.BLANK_REASON
        assert "score" not in recs[name] and (out / recs[name]["rejected_to"]).is_file() and not (src / name).exists()
    assert res["session"] == {**res["session"], "pass": 1, "fail": 0, "rejected": 2}
    assert any("rejected" in line and "grey.png" in line and "blank frame" in line for line in lines)
    assert len(list((out / "maps").iterdir())) == 1


def test_blank_is_judged_at_the_model_s_size_as_predict_judges_it(tmp_path):
    """A photo whose only feature vanishes in the resize is blank to the model (and to predict):
    watch judged the full photo and passed it where predict marked it blank."""
    import io

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    a = np.full((8 * SIZE, 8 * SIZE, 3), 128, np.uint8)
    a[100, 77] = 129  # one grey level in one pixel of 65,536: nothing at 32 x 32
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    (src / "faint.png").write_bytes(buf.getvalue())
    run_once(src, out)
    (rec,) = journal(out)
    assert rec["result"] == "rejected" and rec["reason"] == watch_mod.BLANK_REASON  # one pixel: no detail to speak of


def test_a_photo_of_detail_finer_than_the_model_resolves_is_not_only_called_a_camera_fault(tmp_path):
    """A textured photo (a fine weave: a one-pixel checkerboard) is of one grey at the model's size:
    rejected as blank, as predict marks it, with the photo's own spread and the larger --image-size
    that would see it, where the reason named a failed exposure or a covered lens only."""
    import io

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    weave = ((np.indices((20 * SIZE, 20 * SIZE)).sum(0) % 2) * 254).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(weave).convert("RGB").save(buf, format="PNG")
    (src / "weave.png").write_bytes(buf.getvalue())
    # a solid colour (a capture card's "no signal" frame) does not vary: the plain reason
    Image.new("RGB", (8 * SIZE, 8 * SIZE), (200, 100, 50)).save(src / "solid.png")
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["solid.png"]["reason"] == watch_mod.BLANK_REASON
    rec = recs["weave.png"]
    assert rec["result"] == "rejected" and rec["reason"].startswith(watch_mod.BLANK_REASON)
    assert "the photo itself varies (standard deviation 127 grey levels): if that is the part, its detail is " \
           "finer than the model resolves (a model trained at a larger --image-size may see it)" in rec["reason"]


def test_a_black_16_bit_frame_leaves_the_bit_depth_advice_for_a_dark_one(tmp_path):
    """The bit-depth advice is said once a session; an all-zero frame (rejected as blank) used it
    up, and a 12-bit camera's dark frame after it was rejected with no word of its bit depth."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint16)).save(src / "a_black.png")
    dark = np.full((SIZE, SIZE), 60, np.uint16)
    dark[::2] = 100
    Image.fromarray(dark).save(src / "b_dark.png")
    _res, lines = run_once(src, out)
    advice = [line for line in lines if "grey level(s) or fewer" in line]
    assert len(advice) == 1 and "b_dark.png" in advice[0] and "2**(16 - bits)" in advice[0]
    assert {r["image"]: r["result"] for r in journal(out)} == {"a_black.png": "rejected", "b_dark.png": "rejected"}


def test_the_journal_keeps_no_record_in_memory_after_writing_or_reading_it(tmp_path):
    j = Journal(tmp_path / "results.jsonl")
    j.append({"image": "a.png", "sha256": "0" * 64, "result": "pass"})
    assert not hasattr(j, "records")
    j.close()
    j = Journal(tmp_path / "results.jsonl")
    assert [r["image"] for r in j.read()] == ["a.png"] and not hasattr(j, "records")
    j.close()


def test_status_says_error_when_the_service_dies(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))

    def broken(images):
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        watch(broken, INFO, src, out, once=True, handle_signals=False, log=lambda s: None, settle=0.05, poll_interval=0.05)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "error" and "model exploded" in status["last"]["error"]
    assert status["counts"]["total"] == 0  # the journal read whole: its counts
    # an error while the journal is read: its counts are not known (null), not those of the lines read
    run_once(src, out)
    real = watch_mod._recover

    def failing(st, log, keep=None, stop=None):
        real(st, log, keep, stop)
        raise OSError(errno.EIO, "Input/output error")

    watch_mod._recover = failing
    try:
        with pytest.raises(OSError, match="Input/output error"):
            run_once(src, out)
    finally:
        watch_mod._recover = real
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "error" and status["counts"] is None


def test_a_stop_leaves_the_rest_of_the_batch_for_the_next_start(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(png_bytes(20 + i, bright=0.3))
    stop = threading.Event()

    def predict_then_stop(images):  # SIGTERM arrives while the batch is judged
        stop.set()
        return stub_predict(images)

    watch(predict_then_stop, INFO, src, out, stop=stop, handle_signals=False, log=lambda s: None, settle=0.05,
          poll_interval=0.05, batch_size=8)
    assert len(journal(out)) == 1 and len(list((out / "maps").iterdir())) == 1
    run_once(src, out)
    assert sorted(r["image"] for r in journal(out)) == ["0.png", "1.png", "2.png"]


def _serve(src, out, stop, **kw):
    """watch() in a thread until ``stop`` is set; returns (thread, results dict, log lines)."""
    results, lines = {}, []
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("settle", 0.1)
    t = threading.Thread(target=lambda: results.update(watch(
        stub_predict, INFO, src, out, stop=stop, handle_signals=False, log=lines.append, **kw)))
    t.start()
    return t, results, lines


def _wait_for(out, n, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline and _count(out) < n:
        time.sleep(0.05)
    return _count(out)


def test_results_inside_the_drop_folder_through_a_symlink_are_not_judged(tmp_path):
    """OUT_DIR inside IN_DIR (Python API, recursive) spelled through a symlink: its maps were taken
    for new images, each map making another."""
    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    (src / "a.png").write_bytes(png_bytes(22))
    stop = threading.Event()
    t, _, _ = _serve(src, tmp_path / "link" / "results", stop, recursive=True, rescan_interval=3600)
    _wait_for(src / "results", 1, timeout=10)
    time.sleep(1.0)
    stop.set()
    t.join(timeout=20)
    assert [r["image"] for r in journal(src / "results")] == ["a.png"]


def test_the_results_folder_may_not_be_the_drop_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(WatchError, match="must not be the folder to watch"):
        watch(stub_predict, INFO, src, src, once=True, handle_signals=False, log=lambda m: None)


def test_a_replacement_of_the_same_size_and_time_is_judged(tmp_path):
    """A copy that keeps the modification time (cp -p, an archive) of another image of the same
    byte size, over a judged one: judged again (the signature has the change time too)."""
    import io

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()

    def bmp(seed):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(buf, format="BMP")
        return buf.getvalue()

    first, second = bmp(1), bmp(2)
    assert len(first) == len(second) and first != second
    (src / "a.bmp").write_bytes(first)
    run_once(src, out)
    stamp = os.stat(src / "a.bmp").st_mtime_ns
    time.sleep(0.01)
    (src / "a.bmp").write_bytes(second)
    os.utime(src / "a.bmp", ns=(stamp, stamp))
    run_once(src, out)
    assert [r["sha256"] for r in journal(out)] == [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
    run_once(src, out)  # and once only
    assert len(journal(out)) == 2


def test_journal_lines_without_the_change_time_still_mark_their_images_done(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(30))
    run_once(src, out)
    lines = journal(out)
    del lines[0]["ctime_ns"]  # as an earlier version wrote it
    (out / "results.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (src / "a.png").touch()  # a new change time; the size and modification time stay
    os.utime(src / "a.png", ns=(lines[0]["mtime_ns"], lines[0]["mtime_ns"]))
    res, _ = run_once(src, out)
    assert res["session"]["total"] == 0 and len(journal(out)) == 1


def test_entries_that_cannot_be_looked_at_are_named_once_and_the_rest_is_judged(tmp_path):
    """A symlink in a loop (or into a folder the service may not read) makes every stat of it fail:
    before, that stopped the service at every start, and the images behind it were never judged."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "loop.png").symlink_to("loop.png")
    (src / "good.png").write_bytes(png_bytes(0))
    for _ in range(2):  # and again at the next start
        _res, log = run_once(src, out)
        assert sum("skipping" in line and "loop.png" in line for line in log) == 1
    assert [r["image"] for r in journal(out)] == ["good.png"]


def test_a_name_too_long_for_its_outputs_is_judged_under_a_shortened_one(tmp_path):
    """A legal name of 239 bytes gives output names over the 255 bytes a file system allows; the
    stem is shortened, with a digest of the whole of it so that two such names stay apart."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    names = ["cam1_" + "x" * 230 + ".png", "cam1_" + "x" * 229 + "y.png"]
    for i, name in enumerate(names):
        (src / name).write_bytes(png_bytes(i))
    (src / "next.png").write_bytes(png_bytes(3))
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert sorted(recs) == sorted([*names, "next.png"])
    maps = {Path(recs[n]["map"]).name for n in names}
    assert len(maps) == 2 and all(len(os.fsencode(m)) <= 200 and (out / "maps" / m).is_file() for m in maps)
    assert output_name("next.png", "ab" * 32) == "next_" + "ab" * 6  # short names as before


def test_a_photo_without_memory_to_decode_is_set_aside(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "huge.png").write_bytes(png_bytes(1))
    (src / "small.png").write_bytes(png_bytes(2))
    real = watch_mod.read_image_at_both_sizes

    def read(path, size, **kw):
        if path.name == "huge.png":
            raise MemoryError
        return real(path, size, **kw)

    monkeypatch.setattr(watch_mod, "read_image_at_both_sizes", read)
    run_once(src, out)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["small.png"]["result"] == "pass"
    assert recs["huge.png"]["result"] == "rejected" and "no memory to decode" in recs["huge.png"]["reason"]


def test_an_unreadable_last_line_ending_in_a_newline_is_cut(tmp_path):
    """A power loss can keep a long line's later block and not its earlier one: a last line with
    its newline that is no record is cut like a torn one (its image is judged again)."""
    path = tmp_path / "results.jsonl"
    good = b'{"image":"a.png","sha256":"00","result":"pass","regions":[1,2],"path":"/x"}\n'
    path.write_bytes(good + b"\0" * 300 + b'9]}\n')
    j = Journal(path)
    j.close()
    assert "unreadable last line" in j.repaired and path.read_bytes() == good
    assert list(j.read()) == [{"image": "a.png", "sha256": "00", "result": "pass"}]  # what a restart needs only
    path.write_bytes(good + b"zz\n" + good)  # within the file: skipped, and left as it is
    j = Journal(path)
    j.close()
    assert j.repaired == "" and len(list(j.read())) == 2 and path.read_bytes().count(b"\n") == 3
    assert j.repaired == "skipped 1 unreadable line(s)"


def test_a_folder_of_the_users_is_refused_as_the_results_folder(tmp_path):
    """The command line refuses a non-empty --out it did not write; watch() did not, and rewrote a
    user's status.json, cut the last line of their results.jsonl and removed their .tmp-* files."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))
    out.mkdir()
    (out / "results.jsonl").write_text('{"lot": 1}\n{"lot": 2, "ok": fal')
    with pytest.raises(WatchError, match="not a journal watch wrote"):
        run_once(src, out)
    (out / "results.jsonl").unlink()
    (out / "status.json").write_text("{}")
    with pytest.raises(WatchError, match="files watch did not write"):
        run_once(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["status.json"] and (out / "status.json").read_text() == "{}"
    (out / "status.json").unlink()
    run_once(src, out)  # an empty folder is fine, and so is its own, resumed with a note of the user's kept
    (out / ".tmp-notes.txt").write_text("mine")
    (src / "b.png").write_bytes(png_bytes(1))
    run_once(src, out)
    assert (out / ".tmp-notes.txt").read_text() == "mine" and len(journal(out)) == 2


def test_what_would_stop_the_service_later_is_refused_at_its_start(tmp_path):
    """A NaN threshold passed every image and then failed every journal line (restart after restart);
    a model side of 0 set every image aside; a drop folder inside the results judged the service's
    own maps over and over (names growing _map_..._map_...), --once never ending."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    for thr in (float("nan"), float("inf")):
        with pytest.raises(WatchError, match=f"image threshold {thr!r}: not a finite number"):
            run_once(src, tmp_path / "o1", threshold=thr)
    with pytest.raises(WatchError, match="image threshold nan"):
        watch(stub_predict, ModelInfo(SIZE, image_threshold=float("nan")), src, tmp_path / "o2", once=True,
              handle_signals=False)
    with pytest.raises(WatchError, match="image size 0: the model's input side must be a positive integer"):
        watch(stub_predict, ModelInfo(0, image_threshold=0.5), src, tmp_path / "o3", once=True, handle_signals=False)
    out = tmp_path / "out"
    run_once(src, out)
    with pytest.raises(WatchError, match=f"{out / 'maps'}: the folder to watch lies inside the results folder {out}"):
        run_once(out / "maps", out)
    assert len(journal(out)) == 1 and not (tmp_path / "o1").exists()


def _service_waits(tmp_path, monkeypatch, n: int, counted=lambda timeout: True, **kw) -> list[float]:
    """The timeouts of the service's first ``n`` waits for new files (``counted`` ones), each cut to
    0, on an empty folder; the service stops after them."""
    src = tmp_path / "in"
    src.mkdir()
    stop, asked = threading.Event(), []
    real = threading.Event.wait

    def wait(self, timeout=None):
        if self is not stop and timeout is not None and counted(timeout):  # the service's wait for new files
            asked.append(timeout)
            if len(asked) == n:
                stop.set()
            timeout = 0
        return real(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", wait)
    watch(stub_predict, INFO, src, tmp_path / "out", handle_signals=False, stop=stop, log=lambda m: None, **kw)
    return asked


def test_a_poll_longer_than_the_platform_waits_is_waited_in_the_longest_it_takes(tmp_path, monkeypatch):
    """--poll 1e10 passed the option's check and overflowed the wait's time_t: an internal error."""
    # one wait is enough to see what it was asked for
    asked = _service_waits(tmp_path, monkeypatch, 1, lambda timeout: timeout > 1, poll_interval=1e10, settle=1e10)
    assert asked and max(asked) == threading.TIMEOUT_MAX


def test_a_poll_too_short_to_wait_is_waited_at_the_shortest_the_service_waits(tmp_path, monkeypatch):
    """--poll 1e-300 is a valid positive number: the idle loop spun a third of a core on an empty folder."""
    from defect_fast.watch import MIN_WAIT

    asked = _service_waits(tmp_path, monkeypatch, 3, poll_interval=1e-300)
    assert len(asked) >= 3 and min(asked) == MIN_WAIT


def test_a_sub_folder_is_named_once_as_not_watched_without_recursive(tmp_path):
    """A photo dropped into a sub-folder waited unseen, without a word."""
    src = tmp_path / "in"
    (src / "later").mkdir(parents=True)
    (src / "later" / "b.png").write_bytes(png_bytes(2))
    (src / "a.png").write_bytes(png_bytes(1))
    _, lines = run_once(src, tmp_path / "out")
    said = [line for line in lines if "later" in line]
    assert said == [f"skipping {src / 'later'}: a sub-folder, not watched (--recursive watches them)"]
    assert [r["image"] for r in journal(tmp_path / "out")] == ["a.png"]
    _, lines = run_once(src, tmp_path / "out2", recursive=True)
    assert not [line for line in lines if "skipping" in line]
    assert sorted(r["image"] for r in journal(tmp_path / "out2")) == ["a.png", "later/b.png"]


def test_rejected_files_of_one_name_in_several_sub_folders_are_all_kept(tmp_path):
    """--recursive: cameras in sub-folders write files of the same name, some the same bytes. The
    second name (with the content's digits) was taken by the third such file, which replaced the
    second's in rejected/: four files kept of six, two journal lines naming one file."""
    src, out = tmp_path / "in", tmp_path / "out"
    for cam in ("cam1", "cam2", "cam3"):
        (src / cam).mkdir(parents=True)
        (src / cam / "frame.png").write_bytes(b"not an image")
    (src / "cam1__frame.png").write_bytes(b"not an image either")  # the name cam1/frame.png flattens to
    run_once(src, out, recursive=True)
    recs = journal(out)
    kept = [r["rejected_to"] for r in recs]
    assert len(recs) == 4 and all(r["result"] == "rejected" for r in recs)
    assert len(set(kept)) == 4 and all((out / k).is_file() for k in kept)
    assert sorted(p.name for p in (out / "rejected").iterdir()) == sorted(Path(k).name for k in kept)
    by_image = {r["image"]: (out / r["rejected_to"]).read_bytes() for r in recs}
    assert by_image["cam1__frame.png"] == b"not an image either"


def test_a_rejected_file_whose_move_failed_keeps_its_name_in_rejected(tmp_path, monkeypatch):
    """A file whose move to rejected/ failed stays where it is, its journal line naming its place in
    rejected/. Another file of that name and bytes was moved to that free name, and a restart took
    it for the first file's completed copy and removed the first file from the drop folder."""
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "cam1").mkdir(parents=True)
    (src / "cam1" / "x.png").write_bytes(b"not an image")
    (src / "cam1__x.png").write_bytes(b"not an image")  # flattens to the same name, the same bytes
    real, calls = watch_mod._move, []

    def move(path, dest, sig=None):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EACCES, "Permission denied", str(path))
        real(path, dest, sig)

    monkeypatch.setattr(watch_mod, "_move", move)
    run_once(src, out, recursive=True)
    recs = journal(out)
    assert len(recs) == 2 and len({r["rejected_to"] for r in recs}) == 2
    stuck = calls[0]
    assert stuck.is_file()
    monkeypatch.setattr(watch_mod, "_move", real)
    run_once(src, out, recursive=True)  # a restart finishes the failed move to its own name
    assert not stuck.exists()
    assert sorted(p.name for p in (out / "rejected").iterdir()) == sorted(Path(r["rejected_to"]).name for r in recs)


def test_a_writer_that_stalls_mid_file_gets_its_photo_judged_once_it_is_complete(tmp_path, monkeypatch):
    """A camera upload that pauses longer than settle: the half file does not decode, and waits
    (MIN_GRACE, here 1.5 s) for the rest instead of being rejected at once (the whole photo then
    went to rejected/ unjudged, or across file systems was cut off there while the rest of the
    upload went into the removed file); a file that stays truncated is rejected after the wait."""
    monkeypatch.setattr(watch_mod, "MIN_GRACE", 1.5)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    data = png_bytes(31)
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, rescan_interval=0.2)
    try:
        with open(src / "cam.png", "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            time.sleep(0.8)  # settle 0.1: taken as done, read, found truncated
            assert _count(out) == 0 and any("cam.png" in line and "rejected if it stays so" in line for line in lines)
            fh.write(data[len(data) // 2:])
        assert _wait_for(out, 1) == 1
        t0 = time.monotonic()
        (src / "cut.png").write_bytes(data[:100])
        (src / "empty.png").write_bytes(b"")  # waits its grace as an empty file, once, not twice
        assert _wait_for(out, 3) == 3
        waited = time.monotonic() - t0
    finally:
        stop.set()
        t.join(timeout=20)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["cam.png"]["result"] in ("pass", "fail") and recs["cam.png"]["size"] == len(data)
    assert recs["cut.png"]["result"] == "rejected" and recs["empty.png"]["result"] == "rejected" and waited >= 1.5
    assert sorted(p.name for p in (out / "rejected").iterdir()) == ["cut.png", "empty.png"] and (src / "cam.png").exists()
    assert not any("empty.png" in line and "rejected if it stays so" in line for line in lines)


def test_a_move_across_file_systems_leaves_a_file_that_changed_in_place(tmp_path, monkeypatch):
    src, dest = tmp_path / "a.png", tmp_path / "rejected" / "a.png"
    dest.parent.mkdir()
    src.write_bytes(b"half a photo")
    judged = watch_mod._signature(src)

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(watch_mod.os, "replace", cross_device)
    real_copy = watch_mod.shutil.copy2

    def copy_while_written(a, b):
        real_copy(a, b)
        with open(src, "ab") as fh:  # the writer went on while the file was copied
            fh.write(b" and the rest")

    monkeypatch.setattr(watch_mod.shutil, "copy2", copy_while_written)
    with pytest.raises(OSError, match="changed while it was copied"):
        watch_mod._move(src, dest, judged)
    assert src.read_bytes() == b"half a photo and the rest" and list(dest.parent.iterdir()) == []
    with pytest.raises(OSError, match="changed since it was read"):  # and one that changed before the move
        watch_mod._move(src, dest, judged)
    monkeypatch.undo()


def test_a_rejected_file_sent_again_is_not_removed_at_the_next_start(tmp_path):
    """At start, a rejected file still in the drop folder was taken for a move cut short, and
    removed when its copy in rejected/ had the same bytes: a camera sending the same bad file
    again under the same name lost it. It is a new arrival: judged, with its own line, and set
    aside beside the first."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    bad = png_bytes(2)[:60]
    (src / "bad.png").write_bytes(bad)
    run_once(src, out)
    assert not (src / "bad.png").exists() and (out / "rejected" / "bad.png").read_bytes() == bad
    time.sleep(0.01)
    (src / "bad.png").write_bytes(bad)
    _, lines = run_once(src, out)
    assert not any("removed" in line or "cut short" in line for line in lines)
    recs = journal(out)
    assert [r["image"] for r in recs] == ["bad.png", "bad.png"] and recs[1]["rejected_to"] != recs[0]["rejected_to"]
    assert [(out / r["rejected_to"]).read_bytes() for r in recs] == [bad, bad] and not (src / "bad.png").exists()


def test_the_journal_names_each_image_by_an_absolute_path(tmp_path, monkeypatch):
    """watch started with a relative drop folder wrote "path": "a.png", which a program reading the
    journal from another working folder cannot find."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(4))
    monkeypatch.chdir(tmp_path)
    run_once(Path("in"), Path("out"))
    rec = journal(tmp_path / "out")[0]
    assert rec["image"] == "a.png" and rec["path"] == str(tmp_path / "in" / "a.png")


def test_a_resumed_journal_judged_by_another_model_file_is_said(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0, bright=0.3))
    for version in ("v1", "v2"):
        lines = []
        watch(stub_predict, ModelInfo(SIZE, name="stub", version=version, image_threshold=0.5), src, tmp_path / "out",
              once=True, handle_signals=False, log=lines.append, settle=0.05, poll_interval=0.05)
    assert any(line.startswith("note: 1 earlier result(s) were judged at threshold 0.5 (model v1)") for line in lines)


def test_a_journal_of_one_unreadable_line_is_cut(tmp_path):
    """A power loss can leave the journal's only line cut short: it is cut off, as a last line is."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"image": "a.png", "sha2\n')
    j = Journal(path)
    j.close()
    assert j.repaired.startswith("cut off an unreadable last line") and path.read_bytes() == b""


def test_a_judged_image_touched_again_is_not_judged_twice(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))
    run_once(src, tmp_path / "out")
    st = os.stat(src / "a.png")
    os.utime(src / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))  # touched: same bytes, a new time
    _res, lines = run_once(src, tmp_path / "out")
    assert len(journal(tmp_path / "out")) == 1
    assert any("the same content as when it was judged before" in line for line in lines)


def test_images_are_judged_in_the_order_they_were_written(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "b.png").write_bytes(png_bytes(0))
    (src / "a.png").write_bytes(png_bytes(1))
    t = os.stat(src / "b.png").st_mtime_ns
    os.utime(src / "b.png", ns=(t, t - 10**10))  # b written 10 s before a
    run_once(src, tmp_path / "out")
    assert [r["image"] for r in journal(tmp_path / "out")] == ["b.png", "a.png"]


def test_a_file_sent_again_after_it_left_the_folder_is_judged_again(tmp_path):
    """A camera that names every frame alike (or counts from 0 again after a reboot) sends the same
    name again, a blank frame even the same bytes: once the first left the folder (moved to
    rejected/, or taken away by the line), the second is a new arrival, with its own line. One
    still in the folder, touched or copied over with the same bytes, is not judged again."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    blank = np.full((SIZE, SIZE, 3), 0, np.uint8)
    Image.fromarray(blank).save(src / "frame.png")
    (src / "part.png").write_bytes(png_bytes(1))
    run_once(src, out)
    assert not (src / "frame.png").exists()  # set aside as blank
    Image.fromarray(blank).save(src / "frame.png")  # the same bytes again
    (src / "part.png").write_bytes(png_bytes(1))  # rewritten in place, the same bytes: the same image
    _, lines = run_once(src, out)
    recs = journal(out)
    assert [r["image"] for r in recs].count("frame.png") == 2 and all(r["result"] == "rejected" for r in recs[::2])
    assert [r["image"] for r in recs].count("part.png") == 1
    assert any("part.png: the same content as when it was judged before" in line for line in lines)
    assert len(list((out / "rejected").iterdir())) == 2 and not (src / "frame.png").exists()


@pytest.mark.parametrize("maps", ["failed", "none"])
def test_maps_of_failed_images_only_or_of_none(tmp_path, maps):
    """A map and an overlay for every image filled a line's disk in weeks: --maps failed writes
    them for failed images only, none for none; every line keeps its verdict, score and regions."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "dark.png").write_bytes(png_bytes(0, bright=0.3))  # max < 0.5: pass
    (src / "bright.png").write_bytes(png_bytes(1, bright=1.0))  # max > 0.5: fail
    run_once(src, out, maps=maps)
    recs = {r["image"]: r for r in journal(out)}
    assert (recs["dark.png"]["result"], recs["bright.png"]["result"]) == ("pass", "fail")
    assert recs["dark.png"]["map"] is None and recs["dark.png"]["overlay"] is None
    assert all("regions" in r and "score" in r for r in recs.values())
    written = sorted(p.name for p in (out / "maps").iterdir()) + sorted(p.name for p in (out / "overlays").iterdir())
    if maps == "failed":
        assert written == [Path(recs["bright.png"]["map"]).name, Path(recs["bright.png"]["overlay"]).name]
    else:
        assert written == [] and recs["bright.png"]["map"] is None
    with pytest.raises(WatchError, match="maps must be one of all, failed, none, got 'some'"):
        run_once(src, tmp_path / "o2", maps="some")


def test_a_stop_while_the_journal_is_read_ends_at_once_judging_nothing(tmp_path, monkeypatch):
    """A SIGTERM while a start read a journal of 300,000 lines took effect seconds later, once the
    whole journal was read; a service manager's stop timeout could pass meanwhile."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))
    run_once(src, out)
    line = (out / "results.jsonl").read_text()
    with open(out / "results.jsonl", "a") as f:
        for i in range(20):
            f.write(line.replace('"a.png"', f'"x{i}.png"'))
    with open(out / "results.jsonl", "a") as f:
        f.write('{"image": "y.png", "sha2')  # torn: cut at the opening, which says so
    (src / "b.png").write_bytes(png_bytes(1))
    stop, read = threading.Event(), Journal.read

    def reading(self):
        for i, rec in enumerate(read(self)):
            if i == 5:
                stop.set()  # what SIGTERM's handler does
            yield rec

    monkeypatch.setattr(Journal, "read", reading)
    lines = []
    res = watch(stub_predict, INFO, src, out, once=True, handle_signals=False, log=lines.append, stop=stop,
                settle=0.05, poll_interval=0.05)
    assert res["counts"] is None
    assert lines == [f"{out / 'results.jsonl'}: cut off a torn last line (24 bytes)",
                     "stopped while reading the journal (5 line(s) read): nothing judged"], lines
    assert "b.png" not in [r["image"] for r in journal(out)]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["counts"] is None  # (not the counts of 5 lines of 21)


def test_a_frame_replaced_after_it_settled_before_it_was_judged_is_said_and_counted(tmp_path, monkeypatch):
    """A camera that names every frame alike, while the service was busy: the frame that had settled
    was replaced before its turn, and only the next was judged, with no word of the one lost."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "cam.png").write_bytes(png_bytes(1))
    real, replaced = watch_mod.file_sha256, []

    def next_frame_arrives(path):  # the camera's next frame, just before the service reads the first
        if Path(path).name == "cam.png" and not replaced:
            replaced.append(path)
            time.sleep(0.02)  # (a new modification time on any file system's clock)
            Path(path).write_bytes(png_bytes(2, bright=0.9))
        return real(path)

    monkeypatch.setattr(watch_mod, "file_sha256", next_frame_arrives)
    _res, lines = run_once(src, out)
    said = [ln for ln in lines if "changed after it stayed unchanged for the settle time" in ln]
    assert len(said) == 1 and said[0].startswith(f"{src / 'cam.png'}: "), lines
    assert json.loads((out / "status.json").read_text())["replaced_before_judged"] == 1
    recs = journal(out)  # the frame that stayed, judged once it settled
    assert [r["image"] for r in recs] == ["cam.png"]
    assert recs[0]["sha256"] == hashlib.sha256(png_bytes(2, bright=0.9)).hexdigest()
    # its mode changed, not its bytes (a chmod moves the change time only): judged, nothing lost or said
    (src / "other.png").write_bytes(png_bytes(3))
    chmoded = []

    def chmod_once(path):
        if not chmoded:
            chmoded.append(path)
            time.sleep(0.02)  # (a new change time on any file system's clock)
            os.chmod(path, 0o600)
        return real(path)

    monkeypatch.setattr(watch_mod, "file_sha256", chmod_once)
    _res, lines = run_once(src, out)
    assert not any("changed after it stayed" in ln for ln in lines), lines
    assert json.loads((out / "status.json").read_text())["replaced_before_judged"] == 0
    assert [r["image"] for r in journal(out)] == ["cam.png", "other.png"]


def _sent_again(src, out, name: str, data: bytes) -> int:
    """Take ``name`` away from the running service's folder, send it again, and count the lines."""
    before = _count(out)
    (src / name).unlink()
    time.sleep(0.5)  # seen gone: by its event, or by a listing
    (src / name).write_bytes(data)
    return _wait_for(out, before + 1, timeout=10)


@pytest.mark.parametrize("events", [True, False])
def test_a_file_taken_away_while_the_service_runs_and_sent_again_is_judged_again(tmp_path, events):
    """Seen gone by its event, or by the next listing (no events): what was judged under its name
    is forgotten, and the same bytes sent again get a line of their own."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "part.png").write_bytes(png_bytes(1))
    stop = threading.Event()
    t, _, _ = _serve(src, out, stop, use_watchdog=events, rescan_interval=3600 if events else 0.1)
    try:
        assert _wait_for(out, 1) == 1
        assert _sent_again(src, out, "part.png", png_bytes(1)) == 2  # taken away by the line, then sent again
    finally:
        stop.set()
        t.join(timeout=20)
    assert [r["image"] for r in journal(out)] == ["part.png", "part.png"]


def test_a_restart_keeps_in_memory_only_what_was_judged_of_the_files_still_in_the_folder(tmp_path):
    """A line judging an image a second keeps a journal of millions of lines: what a restart reads
    back of it must not grow with it (the done set of files long gone, or the records)."""
    import tracemalloc

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "kept.png").write_bytes(png_bytes(1))
    run_once(src, out)
    first = journal(out)[0]
    lines = [json.dumps({**first, "image": f"gone/{i:06d}.png", "sha256": f"{i:064x}"}) for i in range(20000)]
    with open(out / "results.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")
    seen = {}
    real = watch_mod._recover

    def recover(st, log, present=None, stop=None):
        out_ = real(st, log, present, stop)
        seen.update(done=dict(st.done), total=st.totals.as_dict()["total"])
        return out_

    watch_mod._recover = recover
    try:
        tracemalloc.start()
        _, said = run_once(src, out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        watch_mod._recover = real
    assert seen["done"] == {"kept.png": first["sha256"]} and seen["total"] == 20001
    assert any("20001 earlier result(s)" in line for line in said)
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB traced while reading back 20001 lines"


def test_a_file_whose_writer_set_its_size_first_and_stalled_is_judged_once_finished(tmp_path):
    """An SMB copy or some FTP clients set a file's full size first: stalled past --settle, the
    zeros of its rest decoded as pixels, and the file was judged half written, then again when
    finished. It now waits, as a file that does not decode does, and is judged once, finished."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    data = png_bytes(5, size=64)
    half = len(data) // 2
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, use_watchdog=False, rescan_interval=0.05, settle=0.1)
    try:
        with open(src / "a.png", "wb") as f:
            f.write(data[:half] + bytes(len(data) - half))
        time.sleep(1.5)  # fifteen times --settle, within the grace of 30 s
        assert _count(out) == 0
        assert any("a.png: a PNG without its IEND chunk" in line and "rejected if it stays so" in line for line in lines)
        with open(src / "a.png", "r+b") as f:
            f.seek(half)
            f.write(data[half:])
        assert _wait_for(out, 1) == 1
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=20)
    recs = journal(out)
    assert len(recs) == 1 and recs[0]["sha256"] == hashlib.sha256(data).hexdigest() and recs[0]["result"] != "rejected"


def test_with_once_a_png_cut_off_before_its_end_is_rejected_with_the_reason(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "cut.png").write_bytes(png_bytes(6)[:-8])  # decodes: only the IEND chunk is missing
    run_once(src, out)
    (rec,) = journal(out)
    assert rec["result"] == "rejected" and "IEND" in rec["reason"] and (out / rec["rejected_to"]).is_file()


def test_a_full_results_disk_stops_the_service_with_where_and_how_it_goes_on(tmp_path, monkeypatch):
    """ENOSPC said "[Errno 28] No space left on device" and nothing of which folder, or that a
    restart goes on where the service stopped."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    (src / "b.png").write_bytes(png_bytes(2))
    real = watch_mod._atomic_write

    def full(final, write, sync=True):
        if final.parent.name == "overlays" and final.name.startswith("b"):
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        return real(final, write, sync)

    monkeypatch.setattr(watch_mod, "_atomic_write", full)
    with pytest.raises(WatchError) as caught:
        run_once(src, out, batch_size=1)
    msg = str(caught.value)
    assert msg.startswith(f"{out}: cannot write the results ({out / 'overlays' / 'b_'}") and "No space left" in msg
    assert "start watch again, it goes on where it stopped" in msg and "\n" not in msg
    assert [r["image"] for r in journal(out)] == ["a.png"]
    monkeypatch.setattr(watch_mod, "_atomic_write", real)  # room again: the rest, once
    run_once(src, out)
    assert [r["image"] for r in journal(out)] == ["a.png", "b.png"]


def test_a_link_to_nothing_named_like_an_image_is_named_once(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "cam.png").symlink_to(tmp_path / "gone.png")
    (src / "a.png").write_bytes(png_bytes(1))
    _, lines = run_once(src, out)
    assert [line for line in lines if "cam.png" in line] == [f"skipping {src / 'cam.png'}: a link to nothing (its target is gone)"]
    assert [r["image"] for r in journal(out)] == ["a.png"]


@pytest.mark.parametrize("recursive", [False, True])
def test_a_link_to_a_folder_is_named_once_not_followed(tmp_path, recursive):
    """--recursive passed a link to a folder by in silence: the photos a camera put there waited for ever."""
    src, out, cam = tmp_path / "in", tmp_path / "out", tmp_path / "cam1"
    src.mkdir()
    cam.mkdir()
    (cam / "x.png").write_bytes(png_bytes(2))
    (src / "cam1").symlink_to(cam)
    (src / "a.png").write_bytes(png_bytes(1))
    _, lines = run_once(src, out, recursive=recursive)
    assert [line for line in lines if "cam1" in line] == [
        f"skipping {src / 'cam1'}: a link to a folder, not followed (watch that folder itself)"]
    assert [r["image"] for r in journal(out)] == ["a.png"]
    # one to a folder inside the drop folder: with --recursive its photos are judged where they are
    (src / "sub").mkdir()
    (src / "sub" / "y.png").write_bytes(png_bytes(3))
    (src / "alias").symlink_to(src / "sub")
    _, lines = run_once(src, out, recursive=recursive)
    said = [line for line in lines if "alias" in line]
    if recursive:
        assert said == [] and [r["image"] for r in journal(out)] == ["a.png", "sub/y.png"]
    else:
        assert said == [f"skipping {src / 'alias'}: a link to a folder, not followed"]


@pytest.mark.parametrize("when", ["start", "session"])
def test_a_listing_that_failed_forgets_nothing(tmp_path, monkeypatch, when):
    """A drop folder that could not be listed once (EIO, a stale share) looked empty: what was
    judged of its files was forgotten, and they were judged again at the next listing."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    run_once(src, out)
    real, failed = os.scandir, []

    def flaky(path=".", *a, **k):
        if Path(path) == src and not failed and (when == "start" or len(calls) >= 2):
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, *a, **k)

    calls = []
    real_scan = watch_mod._scan
    monkeypatch.setattr(watch_mod, "_scan", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    monkeypatch.setattr(watch_mod.os, "scandir", flaky)
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, use_watchdog=False, rescan_interval=0.05)
    try:
        deadline = time.time() + 10
        while time.time() < deadline and (not failed or len(calls) < 6):
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=20)
    assert failed and [r["image"] for r in journal(out)] == ["a.png"]


def test_a_rejected_file_left_in_place_is_not_judged_again_when_only_its_change_time_moved(tmp_path, monkeypatch):
    """A bad file whose move to rejected/ failed stays where it is, judged: a chmod (its change
    time) before the next start made it look like a new arrival."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "bad.png").write_bytes(png_bytes(2)[:60])
    real = watch_mod._move

    def refused(s, d, sig=None):
        raise OSError(errno.EACCES, "Permission denied", str(s))

    monkeypatch.setattr(watch_mod, "_move", refused)
    run_once(src, out)
    assert (src / "bad.png").is_file() and len(journal(out)) == 1
    monkeypatch.setattr(watch_mod, "_move", real)
    time.sleep(0.01)
    os.chmod(src / "bad.png", 0o600)  # the change time only
    _, lines = run_once(src, out)
    assert len(journal(out)) == 1 and any("moved" in line and "cut short" in line for line in lines)
    assert not (src / "bad.png").exists() and (out / journal(out)[0]["rejected_to"]).is_file()


def test_a_blank_frame_sent_again_before_the_next_listing_is_judged_again(tmp_path, monkeypatch):
    """The rejected file left the folder with its move: the camera's next blank frame under the
    same name, the same bytes, is a new arrival at once, not only once a listing saw the name gone."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    Image.fromarray(blank).save(src / "frame.png")
    real, sent = watch_mod._move, []

    def move_then_resend(s, d, sig=None):
        real(s, d, sig)
        if not sent:  # the camera's next frame, before any listing could see the name free
            sent.append(1)
            Image.fromarray(blank).save(src / "frame.png")

    monkeypatch.setattr(watch_mod, "_move", move_then_resend)
    run_once(src, out)
    assert sent and [r["result"] for r in journal(out)] == ["rejected", "rejected"]
    assert not (src / "frame.png").exists() and len(list((out / "rejected").iterdir())) == 2


def test_a_file_that_arrives_while_the_journal_is_read_is_judged_in_the_first_round(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    real = watch_mod._recover

    def slow(st, log, present=None, stop=None):
        (src / "early.png").write_bytes(png_bytes(3))  # after the first listing, its event pending
        time.sleep(0.3)
        return real(st, log, present, stop)

    monkeypatch.setattr(watch_mod, "_recover", slow)
    stop = threading.Event()
    t, _, _ = _serve(src, out, stop, rescan_interval=3600)
    try:
        assert _wait_for(out, 1, timeout=5) == 1
    finally:
        stop.set()
        t.join(timeout=20)


def test_the_note_on_earlier_thresholds_names_the_three_lowest_of_however_many():
    records = [{"image": f"{i}.png", "sha256": "0", "result": "pass", "threshold": float(t), "model_version": "v0",
                "score": 0.0} for i, t in enumerate(range(1500, 0, -1))]
    apart = watch_mod._JudgedApart(0.5, "v1")
    for r in records:
        apart.add(r)
    note = apart.note()
    assert "judged at threshold 1 (model v0), threshold 2 (model v0), threshold 3 (model v0) and others" in note
    assert note.startswith("note: 1500 earlier result(s)")


def test_a_bad_file_sent_again_after_rejected_was_emptied_gets_its_own_line(tmp_path):
    """Same bytes, sent while the service was down, after an operator emptied rejected/: taken at
    the start for a move that never finished, and moved away without a line."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    Image.fromarray(blank).save(src / "frame.png")
    run_once(src, out)
    for f in (out / "rejected").iterdir():
        f.unlink()
    time.sleep(0.01)
    Image.fromarray(blank).save(src / "frame.png")
    run_once(src, out)
    assert [r["result"] for r in journal(out)] == ["rejected", "rejected"]


def test_one_entry_that_cannot_be_looked_at_leaves_the_rest_of_the_folder_forgettable(tmp_path):
    """A link in a loop made every listing incomplete: nothing was forgotten again, and a file
    taken away and sent again with the same bytes was never judged."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "loop.png").symlink_to(src / "loop.png")
    (src / "part.png").write_bytes(png_bytes(1))
    stop = threading.Event()
    t, _, _ = _serve(src, out, stop, use_watchdog=False, rescan_interval=0.05)
    try:
        assert _wait_for(out, 1) == 1
        assert _sent_again(src, out, "part.png", png_bytes(1)) == 2
    finally:
        stop.set()
        t.join(timeout=20)


def test_a_share_unmounted_and_mounted_again_reads_what_was_judged_from_the_journal(tmp_path, monkeypatch):
    """An unmounted share looks empty (the folder under it, on the parent's device): its files
    were forgotten, and judged again once it was back. What was judged of a folder now on another
    device is read again from the journal; what leaves it afterwards is forgotten as before."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(1))
    real_stat, unmounted = os.stat, []

    def stat(path, *a, **k):
        st = real_stat(path, *a, **k)
        if unmounted and os.fspath(path) == os.fspath(src):
            return os.stat_result((st.st_mode, st.st_ino + 1, st.st_dev + 1, *tuple(st)[3:]))
        return st

    monkeypatch.setattr(watch_mod.os, "stat", stat)
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, use_watchdog=False, rescan_interval=0.05)
    try:
        assert _wait_for(out, 1) == 1
        unmounted.append(1)
        os.rename(src / "a.png", tmp_path / "a.png")  # the share's files out of sight
        time.sleep(0.5)
        unmounted.clear()
        os.rename(tmp_path / "a.png", src / "a.png")  # mounted again: the same file
        time.sleep(0.8)
        assert _count(out) == 1
        assert any("was (un)mounted: what was judged of the files there now is read again" in line for line in lines)
        assert _sent_again(src, out, "a.png", png_bytes(1)) == 2
    finally:
        stop.set()
        t.join(timeout=20)


def test_a_model_file_replaced_while_watch_runs_is_said_once(tmp_path):
    """A calibrate --overwrite (or a new training) replaced the model file a running watch had
    loaded, and the watch went on judging by the old thresholds without a word: the command's
    check of the file is said at the next listing of the folder, once until it changes."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    calls, lines, stop = [], [], threading.Event()

    def model_changed():
        calls.append(1)
        return None if len(calls) < 3 else "the model changed" if len(calls) < 8 else "the model is gone"

    t = threading.Thread(target=lambda: watch(stub_predict, INFO, src, out, poll_interval=0.02, settle=0.02,
                                              stop=stop, handle_signals=False, use_watchdog=False,
                                              log=lines.append, model_changed=model_changed))
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and len(calls) < 12:
        time.sleep(0.02)
    stop.set()
    t.join(timeout=20)
    assert not t.is_alive() and len(calls) >= 12
    assert lines.count("the model changed") == 1 and lines.count("the model is gone") == 1

    from defect_fast.watch import _model_watcher

    model = tmp_path / "model.pt"
    model.write_bytes(b"one")
    changed = _model_watcher(model)
    assert changed() is None
    os.utime(model, ns=(1, 1))  # touched: the same model
    (tmp_path / "copy.pt").write_bytes(b"one")
    os.replace(tmp_path / "copy.pt", model)  # a copy of the same bytes over it: the same model
    assert changed() is None
    (tmp_path / "new.pt").write_bytes(b"two")
    os.replace(tmp_path / "new.pt", model)  # as an atomic save replaces it
    said = (f"{model}: replaced since watch loaded it (trained or calibrated again?); this watch still judges by the "
            "model it loaded; restart it to load the file there now")
    assert changed() == said and changed() == said  # (watch logs a text once)
    model.unlink()
    assert changed() == f"{model}: removed since watch loaded it; this watch still judges by the model it loaded; " \
                        "restart it to load the file there now"
    model.write_bytes(b"one")  # the loaded model back
    assert changed() is None


def test_an_idle_service_keeps_its_status_fresh_and_names_its_process(tmp_path, monkeypatch):
    """status.json was written only after a batch that judged something: an idle service's and a
    dead one's looked alike (a kill -9 left "running" for ever), and no PID said which process to
    look for."""
    monkeypatch.setattr(watch_mod, "STATUS_EVERY", 0.2)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop = threading.Event()
    t, _results, _lines = _serve(src, out, stop, use_watchdog=False)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not (out / "status.json").exists():
            time.sleep(0.05)
        first = json.loads((out / "status.json").read_text())
        seen = {first["updated"]}
        while time.time() < deadline and len(seen) < 3:  # rewritten while nothing arrives
            time.sleep(0.1)
            seen.add(json.loads((out / "status.json").read_text())["updated"])
    finally:
        stop.set()
        t.join()
    assert first["state"] == "running" and first["pid"] == os.getpid() and first["counts"]["total"] == 0
    assert len(seen) >= 3


def test_many_bad_copies_of_one_frame_name_do_not_look_at_every_earlier_name(tmp_path, monkeypatch):
    """A camera that names every frame alike and sends the same bad frame (a covered lens) made
    each rejection try every count from 2 again, one look at the disk each: 47 ms a rejection at
    5000 copies, growing with their square."""
    out = tmp_path / "out"
    (out / "rejected").mkdir(parents=True)
    st = watch_mod._State(INFO, 0.5, tmp_path, out, journal=None)
    sha = "ab" * 32
    looks = []
    real = os.path.lexists
    monkeypatch.setattr(watch_mod.os.path, "lexists", lambda p: (looks.append(p), real(p))[1])
    names = []
    for _ in range(60):
        looks.clear()
        dest = watch_mod._moved_name(st, "rejected", "frame.png", sha)
        dest.write_bytes(b"x")
        names.append(dest.name)
        assert len(looks) <= 3, len(looks)
    assert names[:4] == ["frame.png", f"frame_{sha[:12]}.png", f"frame_{sha[:12]}_2.png", f"frame_{sha[:12]}_3.png"]
    assert len(set(names)) == 60
    st.moved_count.clear()  # a new start: the counts are found again, once
    assert watch_mod._moved_name(st, "rejected", "frame.png", sha).name == f"frame_{sha[:12]}_60.png"


def test_an_idle_status_write_that_fails_is_said_once_and_the_service_goes_on(tmp_path, monkeypatch):
    """The idle rewrite of status.json went through the batch's stop-on-failure: a disk full for a
    moment while nothing arrived stopped the service, and the next image was not judged."""
    import errno as errno_mod

    monkeypatch.setattr(watch_mod, "STATUS_EVERY", 0.1)
    full = threading.Event()
    full.set()
    real = watch_mod._write_status

    calls = []

    def write_status(st, state, counts=True):
        calls.append(state)
        if full.is_set() and state == "running" and len(calls) > 1:  # the start's own write goes through
            st.status_at = time.monotonic()
            raise OSError(errno_mod.ENOSPC, "No space left on device", str(st.out / "status.json"))
        return real(st, state, counts)

    monkeypatch.setattr(watch_mod, "_write_status", write_status)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop = threading.Event()
    t, _results, lines = _serve(src, out, stop, use_watchdog=False)
    try:
        time.sleep(1.0)  # several failed rewrites while idle
        full.clear()
        (src / "a.png").write_bytes(png_bytes(3, bright=0.3))
        judged = _wait_for(out, 1)
    finally:
        stop.set()
        t.join()
    assert judged == 1 and t is not None
    said = [line for line in lines if "not rewritten" in line]
    assert len(said) == 1 and "No space left on device" in said[0], lines
    assert any("rewritten again" in line for line in lines), lines


def test_a_second_idle_status_failure_after_a_batch_wrote_it_is_said_again(tmp_path, monkeypatch):
    """The failure was said once per service: a disk full again after a batch had written the status
    went unsaid."""
    import errno as errno_mod

    st = watch_mod._State(INFO, 0.5, tmp_path, tmp_path / "out", journal=None)
    (tmp_path / "out").mkdir()
    lines = []
    real = watch_mod._atomic_write
    full = [True]

    def atomic_write(path, write, sync=True):
        if full[0]:
            raise OSError(errno_mod.ENOSPC, "No space left on device", str(path))
        return real(path, write, sync=sync)

    monkeypatch.setattr(watch_mod, "_atomic_write", atomic_write)
    watch_mod._heartbeat(st, lines.append)
    watch_mod._heartbeat(st, lines.append)  # still full: not said twice
    full[0] = False
    watch_mod._write_status(st, "running")  # a batch's write works
    full[0] = True
    watch_mod._heartbeat(st, lines.append)
    assert [line.split(": ", 1)[1][:13] for line in lines] == ["not rewritten", "not rewritten"], lines


def test_names_with_control_characters_are_logged_as_escapes(tmp_path, capsys):
    """A file named with a terminal's escape sequence and a carriage return: the default log prints
    them as escapes, one line per message; the journal keeps the name as it is."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    name = "a\x1b[2Jb\rc.png"
    (src / name).write_bytes(png_bytes(0, bright=1.0))
    (src / "x\nfail y.png").write_bytes(b"not a png")  # a newline: a forged second log line
    (src / "n\x1b[31m.txt").write_text("not an image")
    watch(stub_predict, INFO, src, out, once=True, handle_signals=False, settle=0.05, poll_interval=0.05)
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\r" not in printed
    assert "n\\x1b[31m.txt" in printed and "x\\x0afail y.png" in printed
    assert not any(line.startswith("fail y.png") for line in printed.splitlines())
    assert sorted(r["image"] for r in journal(out)) == sorted([name, "x\nfail y.png"])  # the journal: names as they are


def test_journal_lines_naming_files_outside_the_folders_are_skipped_not_followed(tmp_path):
    """A restart finishes the moves its journal says were cut short: a line edited to name
    ../victim/secret.txt (or an absolute path) as the image and ../ as where it went had the service
    delete that file, or move it, outside both folders."""
    src, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim"
    src.mkdir()
    victim.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))
    run_once(src, out)
    secret, other = victim / "secret.txt", victim / "other.txt"
    secret.write_text("precious\n")
    other.write_text("other\n")
    (out / "rejected").mkdir(exist_ok=True)
    (out / "rejected" / "copy.txt").write_text("precious\n")  # "its copy is complete": the source would go

    def line(path: Path, image: str, **moved) -> str:
        st = path.stat()
        return json.dumps({"image": image, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns, "result": "rejected", "reason": "x", **moved}) + "\n"

    with open(out / "results.jsonl", "a") as f:
        f.write(line(secret, "../victim/secret.txt", rejected_to="rejected/copy.txt"))
        f.write(line(other, str(other), rejected_to="../moved.txt"))
        f.write(line(secret, "x.png", rejected_to="rejected/../../victim/x.txt"))
        f.write(line(secret, ["a.png"], rejected_to="rejected/y.png"))  # (a list: a traceback at start)
    lines = run_once(src, out)[1]
    assert secret.read_text() == "precious\n" and other.read_text() == "other\n"
    assert not (tmp_path / "moved.txt").exists()
    assert not any("removed" in ln or "cut short" in ln for ln in lines), lines
    assert sum(Journal._record(ln.encode()) is not None for ln in (out / "results.jsonl").read_text().splitlines()) == 1


def test_journal_lines_with_a_threshold_score_or_model_of_another_type_are_skipped(tmp_path):
    """A line whose threshold was text (or null, or a list) stopped every start of the service with
    a traceback, where the note on earlier thresholds read it; such lines are skipped as
    unreadable, as are other lines not as watch writes them."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(0, bright=0.3))
    run_once(src, out, threshold=0.1)
    good = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    edits = [{"threshold": "0.5"}, {"threshold": None}, {"threshold": [0.5]}, {"threshold": True},
             {"score": "high"}, {"threshold": 10 ** 400}]  # (too large a float: an OverflowError at every start)
    with open(out / "results.jsonl", "a") as f:
        for i, edit in enumerate(edits):
            f.write(json.dumps({**good, "image": f"x{i}.png", **edit}) + "\n")
    _res, lines = run_once(src, out, threshold=0.2)
    # (the last is cut at opening, as a torn one would be)
    assert any("cut off an unreadable last line" in ln and f"skipped {len(edits) - 1} unreadable line(s)" in ln
               for ln in lines), lines
    assert [ln for ln in lines if ln.startswith("note:")] == [
        "note: 1 earlier result(s) were judged at threshold 0.1 (model v1), not at this session's threshold 0.2 "
        "(model v1) (0 of them would get the other verdict at it); they stand as recorded, new images are judged "
        "at 0.2"]
    # a model version of another type, as an embedding program's ModelInfo may give it, is read back whole
    other = tmp_path / "other"
    for _ in range(2):
        lines = []
        watch(stub_predict, ModelInfo(SIZE, name="stub", version=2, image_threshold=0.5), src, other, once=True,
              handle_signals=False, log=lines.append, settle=0.05, poll_interval=0.05)
        assert not any("unreadable" in ln for ln in lines), lines
    assert [r["model_version"] for r in journal(other)] == [2]


def test_links_in_the_results_folder_are_refused_not_written_through(tmp_path):
    """The journal replaced by a link to a user's file: its repair cut that file's last line, and
    the results went into it; rejected/ replaced by a link: bad files were moved into its target."""
    src, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim"
    src.mkdir()
    victim.mkdir()
    (src / "a.png").write_bytes(png_bytes(0))
    run_once(src, out)
    settings = victim / "settings.txt"  # (another watch's journal, say: its last line torn)
    settings.write_text((out / "results.jsonl").read_text() + '{"image": "b.png", "sha2')
    before = settings.read_text()
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").symlink_to(settings)
    with pytest.raises(WatchError, match="results.jsonl: a symbolic link where watch keeps its journal"):
        run_once(src, out)
    assert settings.read_text() == before
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").write_text(before.rpartition("\n")[0] + "\n")  # its own journal again
    (out / "rejected").mkdir(exist_ok=True)
    (out / "rejected").rmdir()
    (out / "rejected").symlink_to(victim)
    (src / "bad.png").write_bytes(b"not an image")
    with pytest.raises(WatchError, match="rejected: a symbolic link where watch writes a folder of its own"):
        run_once(src, out)
    assert sorted(p.name for p in victim.iterdir()) == ["settings.txt"] and (src / "bad.png").exists()


def test_a_judged_folder_that_is_a_link_is_refused_without_move_judged_too(tmp_path):
    """A restart completes the judged moves its journal says were cut short whatever its options:
    judged/ replaced by a link was refused with --move-judged only, and moved through without it."""
    src, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim"
    src.mkdir()
    (victim / "pass").mkdir(parents=True)
    (victim / "fail").mkdir()
    (src / "a.png").write_bytes(png_bytes(0, bright=0.2))
    run_once(src, out, move_judged=True)
    moved = next((out / "judged").rglob("*.png"))
    os.rename(moved, src / "a.png")  # as a move cut short leaves it (same file, same times)
    for sub in ("pass", "fail"):
        (out / "judged" / sub).rmdir()
    (out / "judged").rmdir()
    (out / "judged").symlink_to(victim)
    with pytest.raises(WatchError, match="judged: a symbolic link where watch writes a folder of its own"):
        run_once(src, out, move_judged=False)
    assert not list(victim.rglob("*.png")) and (src / "a.png").is_file()


@pytest.mark.parametrize("move_judged", [False, True])
def test_a_recursive_watch_leaves_another_watchs_results_folder_alone(tmp_path, move_judged):
    """A --recursive watch of a line's folder judged a camera watch's maps and overlays there as
    photos (every one a fail), set its rejected frames aside as its own, and with --move-judged
    took them away: the camera watch's journal then named files that were gone."""
    line = tmp_path / "line"
    (line / "cam1").mkdir(parents=True)
    (line / "cam1" / "a.png").write_bytes(png_bytes(1))
    (line / "cam1" / "blank.png").write_bytes(png_bytes(2, bright=0.0))
    run_once(line / "cam1", line / "res1")
    theirs = sorted(p.relative_to(line) for p in (line / "res1").rglob("*") if p.is_file())
    assert any(p.parts[0] == "res1" and p.parts[1] == "rejected" for p in theirs)
    _, lines = run_once(line, tmp_path / "all", recursive=True, move_judged=move_judged)
    assert [r["image"] for r in journal(tmp_path / "all")] == ["cam1/a.png"]
    assert sorted(p.relative_to(line) for p in (line / "res1").rglob("*") if p.is_file()) == theirs
    said = [x for x in lines if "res1" in x]
    assert said == [f"skipping {line / 'res1'}: {watch_mod.OUTPUT_FOLDER}"]


@contextlib.contextmanager
def _another_watch_of(folder: Path):
    """Another process holding a shared flock on ``folder``, as a second watch of it does, for the
    block (the process, to name it)."""
    other = _held_by_child(folder, exclusive=False)
    try:
        yield other
    finally:
        other.kill()
        other.wait()


def _held_by_child(folder: Path, exclusive: bool):
    """A child process that holds an flock on ``folder`` (as another watch does) until killed."""
    import subprocess
    import sys

    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(folder)!r}, os.O_RDONLY)\n"
            f"fcntl.flock(fd, fcntl.{'LOCK_EX' if exclusive else 'LOCK_SH'})\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_a_bad_file_stays_in_a_folder_another_watch_shares(tmp_path):
    """Two watches of one folder, two models say: the first to reject a bad frame moved it into
    its own rejected/, and the other never saw it (no line: not every file got a result)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "bad.png").write_bytes(b"not an image")
    (src / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    (src / "a.png").write_bytes(png_bytes(2))
    with _another_watch_of(src) as other:
        _, lines = run_once(src, out)
    by_image = {r["image"]: r for r in journal(out)}
    assert sorted(by_image) == ["a.png", "bad.png", "blank.png"]
    for name in ("bad.png", "blank.png"):
        rec = by_image[name]
        assert rec["result"] == "rejected" and "rejected_to" not in rec
        assert rec["left"] == watch_mod.LEFT_FOR.format(f"PID {other.pid}")
        assert (src / name).is_file()
        assert any(x.startswith(f"rejected {src / name}: ") and x.endswith(f"; left where it is: {rec['left']}")
                   for x in lines)
    assert not any((out / "rejected").iterdir())
    run_once(src, out)  # alone now: what was left is done, not moved nor judged again
    assert len(journal(out)) == 3 and (src / "bad.png").is_file() and not any((out / "rejected").iterdir())
    run_once(src, tmp_path / "out2")  # a watch alone moves them as ever
    assert sorted(p.name for p in (tmp_path / "out2" / "rejected").iterdir()) == ["bad.png", "blank.png"]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_move_judged_leaves_the_images_of_a_sub_folder_another_watch_has(tmp_path):
    """A --recursive --move-judged watch beside a watch of one camera's sub-folder took its images
    away before that one judged them (the drop folder's lock does not see a sub-folder's watch)."""
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "cam1").mkdir(parents=True)
    (src / "cam1" / "a.png").write_bytes(png_bytes(3))
    (src / "b.png").write_bytes(png_bytes(4))
    with _another_watch_of(src / "cam1") as other:
        _, lines = run_once(src, out, recursive=True, move_judged=True)
    by_image = {r["image"]: r for r in journal(out)}
    assert by_image["cam1/a.png"]["left"] == watch_mod.LEFT_FOR.format(f"PID {other.pid}")
    assert "moved_to" not in by_image["cam1/a.png"] and (src / "cam1" / "a.png").is_file()
    assert "left" not in by_image["b.png"] and (out / by_image["b.png"]["moved_to"]).is_file()
    assert not (src / "b.png").exists()
    assert f"{src / 'cam1' / 'a.png'}: left where it is: {by_image['cam1/a.png']['left']}" in lines


def test_what_reading_a_frame_says_is_said_once_a_session(tmp_path):
    """A camera's frames with transparent pixels (or float pixels in no known range) were each
    warned of on standard error: one line per frame for the life of the service."""
    import warnings

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        a = np.dstack([np.random.default_rng(i).integers(0, 200, (SIZE, SIZE, 3), dtype=np.uint8),
                       np.full((SIZE, SIZE), 255, np.uint8)])
        a[:, : SIZE // 4, 3] = 0  # a quarter transparent
        Image.fromarray(a, mode="RGBA").save(src / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, lines = run_once(src, tmp_path / "out")
    said = [x for x in lines if "transparent" in x]
    assert said == [f"warning: {src / '0.png'} (25.0% of it): images like it have transparent pixels, read as the "
                    "colour stored under them: alpha is dropped (said once a session)"]
    assert len(journal(tmp_path / "out")) == 3


def test_a_watch_tells_its_own_drop_folder_lock_from_another_watch_s(tmp_path, monkeypatch):
    """Its own lock was told by its PID: where /proc/locks numbers processes otherwise (a PID
    namespace), a lone watch took its own lock for another watch's and left every bad file."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    monkeypatch.setattr(os, "getpid", lambda: 1)  # the PID a process has in a namespace of its own
    _, lines = run_once(src, tmp_path / "out")
    rec = journal(tmp_path / "out")[0]
    assert rec["rejected_to"] == "rejected/blank.png" and "left" not in rec, lines


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_two_watches_of_one_process_each_record_a_bad_file(tmp_path):
    """Two watch() threads of one program (two models): the first moved a blank frame into its
    rejected/, and the second had no line for it."""
    src = tmp_path / "in"
    src.mkdir()
    stops = [threading.Event(), threading.Event()]
    served = [_serve(src, tmp_path / f"out{i}", stops[i]) for i in (0, 1)]
    time.sleep(0.3)  # both hold their locks
    (src / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    n = [_wait_for(tmp_path / f"out{i}", 1) for i in (0, 1)]
    for stop, (t, _, _) in zip(stops, served):
        stop.set()
        t.join(timeout=20)
    assert n == [1, 1] and (src / "blank.png").is_file()
    for i in (0, 1):
        rec = journal(tmp_path / f"out{i}")[0]
        assert rec["left"] == watch_mod.LEFT_FOR.format("another watch or process") and "rejected_to" not in rec


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_a_watch_of_a_sub_folder_leaves_files_for_a_watch_of_the_folder_above(tmp_path):
    """A watch of IN_DIR/cam1 moved bad frames (and, with --move-judged, judged images) away from
    a --recursive watch of IN_DIR, which never saw them."""
    src = tmp_path / "in"
    (src / "cam1").mkdir(parents=True)
    (src / "cam1" / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    (src / "cam1" / "a.png").write_bytes(png_bytes(2))
    with _another_watch_of(src) as other:
        run_once(src / "cam1", tmp_path / "out", move_judged=True)
    left = {r["image"]: r.get("left") for r in journal(tmp_path / "out")}
    assert left == {"a.png": watch_mod.LEFT_FOR.format(f"PID {other.pid}"),
                    "blank.png": watch_mod.LEFT_FOR.format(f"PID {other.pid}")}
    assert sorted(p.name for p in (src / "cam1").iterdir()) == ["a.png", "blank.png"]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_a_start_does_not_complete_a_cut_short_move_while_another_watch_has_the_folder(tmp_path, monkeypatch):
    """A start completed a rejected file's move cut short by a crash while a second watch, started
    meanwhile, judged the folder: the file went from under it. The next start alone completes it."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    crash_at(monkeypatch, "move", 1)
    with pytest.raises(Crash):
        run_once(src, out)
    monkeypatch.undo()
    with _another_watch_of(src) as other:
        _, lines = run_once(src, out)
    assert (src / "blank.png").is_file() and len(journal(out)) == 1
    assert (f"{src / 'blank.png'}: its move to {out / 'rejected' / 'blank.png'}, cut short before, is not completed "
            f"now: {watch_mod.LEFT_FOR.format(f'PID {other.pid}')}") in lines
    _, lines = run_once(src, out)  # alone: completed, as the line says
    assert not (src / "blank.png").exists() and (out / "rejected" / "blank.png").is_file() and len(journal(out)) == 1


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
@pytest.mark.parametrize("how", ["caller's lock", "..", "symlink"])
def test_a_lone_watch_moves_its_bad_files_however_its_folder_is_named(tmp_path, monkeypatch, how):
    """The command line's lock (taken before watch(), drop_lock False) and IN_DIR given as ".." or
    through a link must not pass for another watch's (".." came again among the folders above)."""
    from defect_fast.watch import DropFolderLock

    real = tmp_path / "data" / "cam1"
    (real / "sub").mkdir(parents=True)
    (real / "blank.png").write_bytes(png_bytes(1, bright=0.0))
    kw: dict = {}
    src = real
    lock = None
    if how == "caller's lock":
        lock = DropFolderLock(real, False, print).acquire()
        kw["drop_lock"] = False
    elif how == "..":
        monkeypatch.chdir(real / "sub")
        src = Path("..")
    else:
        (tmp_path / "mnt").mkdir()
        (tmp_path / "mnt" / "cam1").symlink_to(real, target_is_directory=True)
        src = tmp_path / "mnt" / "cam1"
    try:
        run_once(src, tmp_path / "out", **kw)
    finally:
        if lock is not None:
            lock.release()
    rec = journal(tmp_path / "out")[0]
    assert rec.get("rejected_to") == "rejected/blank.png" and "left" not in rec
    if how == "symlink":  # a watch of the real folder's parent is seen through the link
        (real / "blank2.png").write_bytes(png_bytes(2, bright=0.0))
        with _another_watch_of(tmp_path / "data") as other:
            run_once(src, tmp_path / "out")
        assert journal(tmp_path / "out")[-1]["left"] == watch_mod.LEFT_FOR.format(f"PID {other.pid}")


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells the watches of a folder by Linux's /proc/locks")
def test_a_second_watch_of_a_drop_folder_made_again_is_seen(tmp_path):
    """A drop folder moved away and made again under its name while a watch ran: a second watch of
    the new folder holds the only lock there, which the first took for its own, and both moved
    files away."""
    src = tmp_path / "in"
    src.mkdir()
    st = watch_mod._State(info=INFO, threshold=0.5, in_dir=src, out=tmp_path / "out", journal=None)
    lock = watch_mod.DropFolderLock(src, False, print).acquire()
    try:
        st.own_lock = lock.file
        src.rename(tmp_path / "was")
        src.mkdir()
        assert watch_mod._watched_by_others(st, "a.png") is None  # alone: its lock is on the folder moved away
        st.lock_table = watch_mod._UNREAD
        with _another_watch_of(src) as other:
            assert watch_mod._watched_by_others(st, "a.png") == f"PID {other.pid}"
    finally:
        lock.release()
