"""The drop-folder service's file-system events: a round looks only at the files they name, a lost
event is caught by the next listing, moved, symlinked and replaced drop folders. The rest of the
service: tests/test_watch.py."""
import os
import threading
import time

from defect_fast import watch as watch_mod
from tests.test_watch import INFO, _serve, _wait_for, journal, png_bytes


def _count_listings(monkeypatch):
    """Counts the listings of the whole drop folder (``_scan`` without a sub-folder root)."""
    calls = []
    real = watch_mod._scan

    def counting(st, recursive, log, root=None):
        if root is None:
            calls.append(time.monotonic())
        return real(st, recursive, log, root)

    monkeypatch.setattr(watch_mod, "_scan", counting)
    return calls


def test_with_events_a_round_looks_only_at_the_files_they_name(tmp_path, monkeypatch):
    """The drop folder is listed once at start; later arrivals are found through their events, so a
    folder full of judged images costs nothing per arrival."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "early.png").write_bytes(png_bytes(1))
    listings = _count_listings(monkeypatch)
    stop = threading.Event()
    t, results, _ = _serve(src, out, stop, rescan_interval=3600)
    assert _wait_for(out, 1) == 1
    for i in range(3):  # a camera: write to a temporary name, then rename into place
        (src / f"c{i}.png.part").write_bytes(png_bytes(10 + i))
        os.replace(src / f"c{i}.png.part", src / f"c{i}.png")
        time.sleep(0.05)
    n = _wait_for(out, 4)
    stop.set()
    t.join(timeout=20)
    assert not t.is_alive() and n == 4
    assert sorted(r["image"] for r in journal(out)) == ["c0.png", "c1.png", "c2.png", "early.png"]
    assert len(listings) == 1  # the start's


def test_a_file_whose_event_was_lost_is_found_by_the_next_listing(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    listings = _count_listings(monkeypatch)
    monkeypatch.setattr(watch_mod._Events, "add", lambda self, *paths: None)  # every event lost
    stop = threading.Event()
    t, _, _ = _serve(src, out, stop, rescan_interval=0.5)
    time.sleep(0.3)
    (src / "quiet.png").write_bytes(png_bytes(2))
    n = _wait_for(out, 1)
    stop.set()
    t.join(timeout=20)
    assert n == 1 and journal(out)[0]["image"] == "quiet.png"
    assert len(listings) >= 2


def test_recursive_events_find_a_folder_moved_in_and_forget_one_moved_away(tmp_path, monkeypatch):
    src, out, staging = tmp_path / "in", tmp_path / "out", tmp_path / "staging"
    src.mkdir()
    (staging / "lot7" / "deep").mkdir(parents=True)
    (staging / "lot7" / "a.png").write_bytes(png_bytes(3))
    (staging / "lot7" / "deep" / "b.png").write_bytes(png_bytes(4))
    listings = _count_listings(monkeypatch)
    stop = threading.Event()
    t, _, _ = _serve(src, out, stop, recursive=True, rescan_interval=3600)
    time.sleep(0.3)
    os.replace(staging / "lot7", src / "lot7")  # a whole folder arrives in one rename: one event
    n = _wait_for(out, 2)
    (src / "lot7" / "c.png").write_bytes(png_bytes(5))  # and a file into it afterwards
    n = _wait_for(out, 3)
    os.replace(src / "lot7", staging / "lot7")  # moved away: nothing of it waits or is judged again
    time.sleep(0.5)
    stop.set()
    t.join(timeout=20)
    assert n == 3 and sorted(r["image"] for r in journal(out)) == ["lot7/a.png", "lot7/c.png", "lot7/deep/b.png"]
    assert len(listings) == 1


def test_event_paths_outside_the_drop_folder_or_temporary_are_not_looked_at(tmp_path):
    src = tmp_path / "in"
    st = watch_mod._State(info=INFO, threshold=0.5, in_dir=src, out=src / "results", journal=None)
    paths = {str(src / "a.png"), str(src / "sub" / "b.png"), str(src / "results" / "maps" / "x.png"),
             str(tmp_path / "elsewhere.png"), str(src / ".c.png"), str(src / "d.png.part"), str(src)}
    assert watch_mod._event_keys(st, paths, recursive=False) == {"a.png"}
    assert watch_mod._event_keys(st, paths, recursive=True) == {"a.png", "sub/b.png"}


def test_a_drop_folder_reached_through_a_symlink_gets_its_events(tmp_path, monkeypatch):
    """inotify on the link itself reported nothing inside: every image waited for the safety-net listing."""
    real, out = tmp_path / "real_drop", tmp_path / "out"
    real.mkdir()
    (tmp_path / "drop").symlink_to(real, target_is_directory=True)
    listings = _count_listings(monkeypatch)
    stop = threading.Event()
    t, _, _ = _serve(tmp_path / "drop", out, stop, rescan_interval=3600)
    time.sleep(0.3)
    (real / "a.png").write_bytes(png_bytes(20))
    n = _wait_for(out, 1, timeout=10)
    stop.set()
    t.join(timeout=20)
    assert n == 1 and len(listings) == 1


def test_a_drop_folder_replaced_under_the_service_is_watched_again(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop = threading.Event()
    lines = []
    t, _, lines = _serve(src, out, stop, rescan_interval=3600)
    time.sleep(0.3)
    os.replace(src, tmp_path / "in_old")  # the camera software rotates its folder
    src.mkdir()
    time.sleep(0.3)
    (src / "b.png").write_bytes(png_bytes(21))
    n = _wait_for(out, 1, timeout=10)
    stop.set()
    t.join(timeout=20)
    assert n == 1 and any("was replaced or removed" in line for line in lines)


def test_recursive_events_pass_over_an_output_folder_made_under_the_drop_folder(tmp_path):
    """A camera watch started beside a --recursive one: the maps it wrote under the drop folder
    arrived as events, and each was judged as a photo."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop = threading.Event()
    t, _, lines = _serve(src, out, stop, recursive=True, rescan_interval=3600)
    time.sleep(0.3)
    (src / "cam1").mkdir()
    (src / "cam1" / "a.png").write_bytes(png_bytes(6))
    assert _wait_for(out, 1) == 1
    other = threading.Event()
    t2, _, _ = _serve(src / "cam1", src / "res1", other)  # its maps and overlays: events under IN_DIR
    deadline = time.time() + 20
    while time.time() < deadline and len(list((src / "res1" / "maps").glob("*.png"))) < 1:
        time.sleep(0.05)
    (src / "cam1" / "b.png").write_bytes(png_bytes(7))
    n = _wait_for(out, 2)
    time.sleep(0.5)  # what else its events bring
    other.set()
    stop.set()
    t2.join(timeout=20)
    t.join(timeout=20)
    assert n == 2 and sorted(r["image"] for r in journal(out)) == ["cam1/a.png", "cam1/b.png"]
    assert len(list((src / "res1" / "maps").glob("*.png"))) == 2  # its own, all there
    assert [x for x in lines if "res1" in x] == [f"skipping {src / 'res1'}: {watch_mod.OUTPUT_FOLDER}"]
