"""watch with ``move_judged``: each judged image leaves the drop folder for OUT/judged/pass|fail/
once its journal line is written, exactly once across crashes, failed moves and restarts."""
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from defect_fast import watch as watch_mod
from defect_fast.watch import Journal

from test_watch import Crash, journal, png_bytes, run_once


def _drop(src: Path) -> dict[str, bytes]:
    src.mkdir()
    files = {"dark.png": png_bytes(0, bright=0.3), "bright.png": png_bytes(1, bright=1.0),  # pass, fail
             "broken.png": png_bytes(2)[:60]}  # rejected
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "notes.txt").write_text("not an image")
    return files


def test_judged_images_go_to_their_verdict_s_folder_and_rejected_ones_to_rejected(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    files = _drop(src)
    res, lines = run_once(src, out, move_judged=True)
    recs = {r["image"]: r for r in journal(out)}
    assert recs["dark.png"]["moved_to"] == "judged/pass/dark.png"
    assert recs["bright.png"]["moved_to"] == "judged/fail/bright.png"
    assert "moved_to" not in recs["broken.png"] and recs["broken.png"]["rejected_to"] == "rejected/broken.png"
    for name, rec in recs.items():
        assert (out / (rec.get("moved_to") or rec["rejected_to"])).read_bytes() == files[name]
    assert sorted(p.name for p in src.iterdir()) == ["notes.txt"]  # only what is no image is left
    assert res["session"]["total"] == 3

    # nothing is judged again; the same name sent again is a new arrival, kept beside the first
    assert run_once(src, out, move_judged=True)[0]["session"]["total"] == 0
    (src / "dark.png").write_bytes(files["dark.png"])
    assert run_once(src, out, move_judged=True)[0]["session"]["total"] == 1
    again = journal(out)[-1]
    assert again["image"] == "dark.png" and again["moved_to"] == f"judged/pass/dark_{again['sha256'][:12]}.png"
    assert sorted(p.name for p in (out / "judged" / "pass").iterdir()) == sorted(["dark.png", Path(again["moved_to"]).name])


def test_without_move_judged_judged_images_stay(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _drop(src)
    run_once(src, out)
    assert sorted(p.name for p in src.iterdir()) == ["bright.png", "dark.png", "notes.txt"]
    assert not (out / "judged").exists() and all("moved_to" not in r for r in journal(out))


@pytest.mark.parametrize("where", ["journal", "move", "copied"])
def test_a_crash_around_a_judged_image_s_move_gives_one_line_and_the_move_at_restart(tmp_path, monkeypatch, where):
    """kill -9 before the line (redone), between the line and the move, or after a copy across file
    systems whose original was not yet removed: the restart completes the move the line names."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(4):
        (src / f"p{i}.png").write_bytes(png_bytes(i, bright=0.3 + 0.2 * i))
    calls = {"n": 0}

    def bomb():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash(where)

    real_append, real_move = Journal.append, watch_mod._move
    if where == "journal":
        def append(self, record):
            bomb()
            return real_append(self, record)

        monkeypatch.setattr(Journal, "append", append)
    elif where == "move":
        def move(a, b, sig=None):
            bomb()
            return real_move(a, b, sig)

        monkeypatch.setattr(watch_mod, "_move", move)
    else:
        def copy_then_crash(a, b, sig=None):
            b.write_bytes(a.read_bytes())
            bomb()
            return real_move(a, b, sig)

        monkeypatch.setattr(watch_mod, "_move", copy_then_crash)
    with pytest.raises(Crash):
        run_once(src, out, move_judged=True)
    monkeypatch.undo()
    _, lines = run_once(src, out, move_judged=True)
    recs = journal(out)
    assert sorted(r["image"] for r in recs) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert list(src.iterdir()) == []
    moved = sorted(str(p.relative_to(out)) for p in (out / "judged").rglob("*.png"))
    assert moved == sorted(r["moved_to"] for r in recs) and len(moved) == 4
    if where != "journal":
        assert any("cut short" in line or "removed" in line for line in lines), lines


def test_a_judged_image_that_cannot_be_moved_is_left_judged_and_moved_at_the_next_start(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    files = _drop(src)
    real = watch_mod._move

    def refuse(path, dest, sig=None):
        if path.name == "bright.png":
            raise OSError(errno.EACCES, "Permission denied", str(path))
        real(path, dest, sig)

    monkeypatch.setattr(watch_mod, "_move", refuse)
    _, lines = run_once(src, out, move_judged=True)
    assert (src / "bright.png").is_file() and any("bright.png" in ln and "left where it is" in ln for ln in lines)
    assert run_once(src, out, move_judged=True)[0]["session"]["total"] == 0  # judged: not again
    monkeypatch.undo()
    run_once(src, out, move_judged=True)
    assert not (src / "bright.png").exists()
    assert (out / "judged" / "fail" / "bright.png").read_bytes() == files["bright.png"]
    assert len(journal(out)) == 3


def test_a_restart_without_move_judged_still_finishes_a_move_its_journal_names(tmp_path, monkeypatch):
    """The line says where the image goes: a move cut short is completed whatever the next start's options."""
    src, out = tmp_path / "in", tmp_path / "out"
    _drop(src)

    real = watch_mod._move

    def crash(a, b, sig=None):
        if b.parent.parent.name == "judged":
            raise Crash("move")
        real(a, b, sig)

    monkeypatch.setattr(watch_mod, "_move", crash)
    with pytest.raises(Crash):
        run_once(src, out, move_judged=True)
    monkeypatch.undo()
    (cut,) = [r for r in journal(out) if "moved_to" in r]
    assert (src / cut["image"]).is_file()
    run_once(src, out)
    assert (out / cut["moved_to"]).is_file() and not (src / cut["image"]).exists()
    assert len(journal(out)) == 3 and json.loads((out / "status.json").read_text())["counts"]["total"] == 3


@pytest.mark.parametrize("judged", [True, False])
def test_a_file_written_again_while_it_is_judged_is_not_moved_under_the_first_one_s_line(tmp_path, monkeypatch, judged):
    """A camera that writes every frame to one name (write, then rename) can replace the file
    after it was read: the move after the journal line took the new frame, never judged, to the
    first one's place (judged/ or rejected/). It is left in the folder and judged on its own."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    first, second = png_bytes(5, bright=0.3) if judged else b"not a png", png_bytes(6, bright=0.35)
    (src / "frame.png").write_bytes(first)
    real = Journal.append

    def append(self, record):
        real(self, record)
        if len(journal(out)) == 1:  # the next frame arrives as the first one's line is written
            (src / "frame.png.tmp").write_bytes(second)
            os.replace(src / "frame.png.tmp", src / "frame.png")

    monkeypatch.setattr(Journal, "append", append)
    _, lines = run_once(src, out, move_judged=True)
    recs = journal(out)
    assert [r["sha256"] for r in recs] == [hashlib.sha256(d).hexdigest() for d in (first, second)], lines
    was, now = (out / (r.get("moved_to") or r["rejected_to"]) for r in recs)
    assert not was.exists()  # the first frame was written over in the folder: its place stays empty
    assert now.read_bytes() == second and list(src.iterdir()) == []
    assert any("changed since it was read" in line for line in lines)
