"""watch with ``move_judged``: each judged image leaves the drop folder for OUT/judged/pass|fail/
once its journal line is written, exactly once across crashes, failed moves and restarts."""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from defect_fast import watch as watch_mod
from defect_fast.safety import RunInUse
from defect_fast.watch import Journal

from test_watch import Crash, _held_by_child, crash_at, journal, png_bytes, run_once


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
    # named as their maps are, by their content too: one name sent again is each frame's own across restarts
    assert recs["dark.png"]["moved_to"] == f"judged/pass/dark_{recs['dark.png']['sha256'][:12]}.png"
    assert recs["bright.png"]["moved_to"] == f"judged/fail/bright_{recs['bright.png']['sha256'][:12]}.png"
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
    assert again["image"] == "dark.png" and again["moved_to"] == f"judged/pass/dark_{again['sha256'][:12]}_2.png"
    assert sorted(p.name for p in (out / "judged" / "pass").iterdir()) == \
        sorted(Path(r["moved_to"]).name for r in journal(out) if r["image"] == "dark.png")


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
    crash_at(monkeypatch, where, 2)
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
    (line,) = [r for r in journal(out) if r["image"] == "bright.png"]
    assert (out / line["moved_to"]).read_bytes() == files["bright.png"]
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


def test_a_start_cut_short_before_its_journal_leaves_a_folder_the_next_start_takes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for sub in ("maps", "overlays", "rejected", "judged/pass", "judged/fail"):  # what watch() makes before its journal
        (out / sub).mkdir(parents=True)
    assert run_once(src, out, move_judged=True)[0]["session"]["total"] == 0
    (out / "judged" / "pass" / "mine.txt").write_text("a user's")  # not what a start cut short leaves
    (out / "results.jsonl").unlink()
    with pytest.raises(watch_mod.WatchError, match="holds files watch did not write \\(such as 'judged'\\)"):
        run_once(src, out, move_judged=True)


def _camera_frame(tmp_path: Path, sent: Path) -> Path:
    """A frame the camera keeps (its modification time fixed), copied with its time kept (cp -p)
    to ``sent`` in a new drop folder; returns the kept frame, to send again."""
    kept = tmp_path / "camera.png"
    kept.write_bytes(png_bytes(1, bright=0.3))
    os.utime(kept, ns=(1_600_000_000_000_000_000,) * 2)
    sent.parent.mkdir()
    shutil.copy2(kept, sent)
    return kept


@pytest.mark.parametrize("across", [False, True])
def test_the_same_bytes_sent_again_with_their_time_kept_while_stopped_are_a_new_arrival(tmp_path, monkeypatch, across):
    """cp -p or rsync -t sends a judged frame again, moved away since, with its modification time:
    the restart took it for the judged file whose move had been cut short after its copy (the same
    size, time and bytes), and left it in the folder for good, never judged. Its change time is
    another; its inode may be the first's (a move across file systems frees it for the next file)."""
    if across:  # OUT on another file system: every move a copy, then the original removed
        real = os.replace

        def replace(a, b):
            if Path(a).parent.name == "in":
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real(a, b)

        monkeypatch.setattr(watch_mod.os, "replace", replace)
    src, out = tmp_path / "in", tmp_path / "out"
    kept = _camera_frame(tmp_path, src / "frame.png")
    run_once(src, out, move_judged=True)
    shutil.copy2(kept, src / "frame.png")  # sent again while the service is stopped
    run_once(src, out, move_judged=True)
    recs = journal(out)
    assert len(recs) == 2 and recs[0]["sha256"] == recs[1]["sha256"] and list(src.iterdir()) == []
    assert all((out / r["moved_to"]).is_file() for r in recs) and recs[0]["moved_to"] != recs[1]["moved_to"]


def test_a_name_a_refused_move_was_given_is_not_given_to_another_frame_after_a_restart(tmp_path, monkeypatch):
    """The camera wrote frame.png again as the first frame's line was written: that move was refused
    (the file had changed), and after a restart the second frame was moved to the first line's name."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "frame.png").write_bytes(png_bytes(5, bright=0.3))
    real = Journal.append

    def append(self, record):
        real(self, record)
        if len(journal(out)) == 1:
            (src / "frame.png.tmp").write_bytes(png_bytes(6, bright=0.35))
            os.replace(src / "frame.png.tmp", src / "frame.png")
            raise Crash("kill -9 after the first line")

    monkeypatch.setattr(Journal, "append", append)
    with pytest.raises(Crash):
        run_once(src, out, move_judged=True)
    monkeypatch.undo()
    run_once(src, out, move_judged=True)
    first, second = journal(out)
    assert first["moved_to"] != second["moved_to"] and not (out / first["moved_to"]).exists()
    assert hashlib.sha256((out / second["moved_to"]).read_bytes()).hexdigest() == second["sha256"]


def test_the_same_bytes_sent_again_while_a_share_was_unmounted_are_a_new_arrival(tmp_path, monkeypatch):
    """A share mounted again has what was judged of its files read from the journal: a copy of a
    judged, moved frame sent meanwhile with its time kept was marked done, never judged, left in the
    drop folder (a restart judged it)."""
    import threading
    import time

    from test_watch import _serve, _wait_for

    src, out = tmp_path / "in", tmp_path / "out"
    kept = _camera_frame(tmp_path, src / "a.png")
    real_stat, state = os.stat, {"unmounted": False, "sent": False}

    def stat(path, *a, **k):
        if os.fspath(path) == os.fspath(src):
            if state["sent"]:  # mounted again, holding the copy sent meanwhile
                state.update(sent=False, unmounted=False)
                shutil.copy2(kept, src / "a.png")
            st = real_stat(path, *a, **k)
            if state["unmounted"]:  # the mount point: another device
                return os.stat_result((st.st_mode, st.st_ino + 1, st.st_dev + 1, *tuple(st)[3:]))
            return st
        return real_stat(path, *a, **k)

    monkeypatch.setattr(watch_mod.os, "stat", stat)
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, use_watchdog=False, rescan_interval=0.05, move_judged=True)
    try:
        assert _wait_for(out, 1)
        state["unmounted"] = True
        time.sleep(0.5)
        state["sent"] = True
        _wait_for(out, 2, timeout=5.0)
    finally:
        stop.set()
        t.join(timeout=20)
    recs = journal(out)
    assert len(recs) == 2 and recs[0]["sha256"] == recs[1]["sha256"] and list(src.iterdir()) == [], lines


def test_a_rejected_name_a_refused_move_was_given_is_not_given_to_the_next_bad_frame_after_a_restart(tmp_path,
                                                                                                    monkeypatch):
    """Rejected files keep their plain names: a truncated frame.png written over by the camera
    before its move (refused), then a restart, and the next truncated frame was moved to the name
    the first line had named."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    first, second = png_bytes(5)[:60], png_bytes(6)[:70]  # two frames cut short: rejected
    (src / "frame.png").write_bytes(first)
    real = Journal.append

    def append(self, record):
        real(self, record)
        if len(journal(out)) == 1:
            (src / "frame.png.tmp").write_bytes(second)
            os.replace(src / "frame.png.tmp", src / "frame.png")
            raise Crash("kill -9 after the first line")

    monkeypatch.setattr(Journal, "append", append)
    with pytest.raises(Crash):
        run_once(src, out)
    monkeypatch.undo()
    run_once(src, out)
    first_line, second_line = journal(out)
    assert first_line["rejected_to"] == "rejected/frame.png" != second_line["rejected_to"]
    assert (out / second_line["rejected_to"]).read_bytes() == second and not (out / "rejected" / "frame.png").exists()


@pytest.mark.parametrize("other_moves", [False, True])
def test_a_watch_that_moves_judged_images_shares_its_drop_folder_with_no_other(tmp_path, other_moves):
    """Either watch moving judged images away would leave each image judged and recorded by one of the
    two: refused, naming the other process, before the results folder is made; watches that leave
    them may share the folder (two models, each with its own results)."""
    src = tmp_path / "in"
    _drop(src)
    child = _held_by_child(src, exclusive=other_moves)
    try:
        with pytest.raises(RunInUse, match=rf"{src}: watched by PID {child.pid}.*--move-judged"):
            run_once(src, tmp_path / "out", move_judged=True)
        assert not (tmp_path / "out").exists() and len(list(src.iterdir())) == 4
        if other_moves:
            with pytest.raises(RunInUse, match=rf"watched by PID {child.pid} with --move-judged"):
                run_once(src, tmp_path / "out")
            assert not (tmp_path / "out").exists()
        else:  # both leave judged images where they are
            assert run_once(src, tmp_path / "out")[0]["session"]["total"] == 3
    finally:
        child.kill()
        child.wait()
    # free again (a watch beside the other left the bad file where it was, for it: a line here too)
    assert run_once(src, tmp_path / "out2", move_judged=True)[0]["session"]["total"] == 3
    assert sorted(p.name for p in src.iterdir()) == ["notes.txt"]


def test_the_drop_folder_lock_is_let_go_when_a_watch_ends_or_fails(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    _drop(src)
    lock = watch_mod.DropFolderLock(src, True, print).acquire()
    with pytest.raises(RunInUse, match="watched by another watch"):  # one in this process: no other PID to name
        run_once(src, out, move_judged=True)
    lock.release()

    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(watch_mod, "Journal", fail)
    with pytest.raises(OSError, match="Input/output"):
        run_once(src, out, move_judged=True)
    monkeypatch.undo()
    run_once(src, out, move_judged=True)
    watch_mod.DropFolderLock(src, True, print).acquire().release()  # free after each end: no RunInUse


def test_the_holders_named_are_other_processes_seen_in_proc_locks(tmp_path, monkeypatch):
    """A holder in another PID namespace (a container sharing the folder) is listed as PID 0: not named."""
    import io

    src = tmp_path / "in"
    src.mkdir()
    st = os.stat(src)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    table = (f"1: FLOCK  ADVISORY  WRITE 0 {key} 0 EOF\n2: FLOCK  ADVISORY  READ  4242 {key} 0 EOF\n"
             f"3: FLOCK  ADVISORY  READ  {os.getpid()} {key} 0 EOF\n4: POSIX  ADVISORY  WRITE 77 {key} 0 EOF\n"
             f"5: FLOCK  ADVISORY  WRITE 99 00:00:1 0 EOF\n")
    monkeypatch.setattr(watch_mod, "open", lambda *a, **k: io.StringIO(table), raising=False)
    fd = os.open(src, os.O_RDONLY)
    try:
        assert watch_mod._flock_holders(fd) == [4242]
    finally:
        os.close(fd)
