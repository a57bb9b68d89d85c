"""Guards at the edge of the tool: output folders, containment, atomic files, strict JSON, run locks
and tensor digests. Argument types, devices and the main() boundary: tests/test_safety_main.py."""
from __future__ import annotations

import hashlib
import json
import shutil
import os
import re
import stat
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from defect_fast.safety import (
    DIGEST_KEY,
    LOCK_NAME,
    MANIFEST_NAME,
    DigestError,
    OutputFolder,
    OutputRefused,
    RunInUse,
    RunLock,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    attach_digest,
    check_out_not_overlapping,
    dump_json_strict,
    load_with_digest,
    safe_output_file,
    save_with_digest,
    state_digest,
    verify_digest,
)

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and 'dir' for folders) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------


def test_output_folder_records_and_clears_only_its_own_files(tmp_path):
    out = OutputFolder.create(tmp_path / "run")
    out.write_text("config.json", "{}")
    out.write_json("maps/a.json", {"x": 1})
    with out.open_atomic("model.bin") as fh:
        fh.write(b"\x00" * 10)
    manifest = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert manifest["files"] == ["config.json", "maps/a.json", "model.bin"] and manifest["dirs"] == ["maps"]

    # the user's own files, beside and inside our folders
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "maps" / "keep.png").write_bytes(b"mine too")
    (tmp_path / "run" / "sub").mkdir()
    (tmp_path / "run" / "sub" / "x").write_text("x")

    with pytest.raises(OutputRefused, match=r"earlier defect-fast output; pass --overwrite"):
        OutputFolder.create(tmp_path / "run")
    again = OutputFolder.create(tmp_path / "run", overwrite=True)
    left = _tree(tmp_path / "run")
    # (the lock file stays: it was held while the folder was cleared, and is never listed or removed)
    assert set(left) == {MANIFEST_NAME, LOCK_NAME, "notes.txt", "maps", "maps/keep.png", "sub", "sub/x"}
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert again.files == set()
    # an unlisted file is never replaced through the folder either
    with pytest.raises(OutputRefused, match=r"notes\.txt: exists and was not written by defect-fast"):
        again.write_text("notes.txt", "overwritten")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_unlisted_names_exactly_what_a_clear_leaves(tmp_path):
    """What a command that clears first and refuses after checks beforehand: a user's empty
    folder and the temporary of a user's file survive the clear, so they are named too (they were
    missed, and demo --overwrite cleared an earlier demo and then refused); the temporaries of
    the folder's own files and of its manifest are removed by the clear, so they are not."""
    out = OutputFolder.create(tmp_path / "o")
    for rel in ("a/x.bin", "a/b/y.bin"):
        with out.open_atomic(out.path / rel) as fh:
            fh.write(b"ours")
    nested = OutputFolder.create(out.path / "a" / "run")  # an output folder inside, with its own manifest
    with nested.open_atomic(nested.path / "m.bin") as fh:
        fh.write(b"ours")
    a = out.path / "a"
    (a / "b" / ".y.bin.abcd1234.tmp").write_bytes(b"killed write of ours")
    (a / "run" / f".{MANIFEST_NAME}.abcd1234.tmp").write_bytes(b"killed write of a manifest")
    (a / "mine").mkdir()  # the user's empty folder
    (a / "b" / "z.txt").write_text("the user's")
    (a / "b" / ".z.txt.abcd1234.tmp").write_text("the user's editor")
    before = sorted(OutputFolder.unlisted(out.path, ["a"]))
    assert before == sorted([a / "mine", a / "b" / "z.txt", a / "b" / ".z.txt.abcd1234.tmp"])
    opened = OutputFolder.open(out.path)
    nested_open = OutputFolder.open(a / "run")
    nested_open.discard()
    opened.clear()
    assert not (a / "run").exists()  # the nested folder went, its manifest's temporary with it
    left = sorted(p for p in a.rglob("*") if p.name != MANIFEST_NAME)
    assert sorted(set(left) - {a / "b"}) == before  # b stays only as the folder of the user's file


def test_folder_without_manifest_refused_even_with_overwrite(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "img.png").write_bytes(b"precious")
    before = _tree(data)
    for overwrite in (False, True):
        with pytest.raises(OutputRefused) as err:
            OutputFolder.create(data, overwrite=overwrite)
        msg = str(err.value)
        assert "\n" not in msg and str(data) in msg and "img.png" in msg and MANIFEST_NAME in msg
    assert _tree(data) == before
    # an empty existing folder is adopted; a file is not a folder
    (tmp_path / "empty").mkdir()
    assert (OutputFolder.create(tmp_path / "empty").path / MANIFEST_NAME).is_file()
    with pytest.raises(OutputRefused, match="not a folder"):
        OutputFolder.create(data / "img.png", overwrite=True)


def test_clear_does_not_follow_a_symlinked_folder(tmp_path):
    out = OutputFolder.create(tmp_path / "o")
    out.write_text("maps/a.png", "ours")
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_text("theirs")
    # the user replaced our maps/ folder with a link to their photos
    (tmp_path / "o" / "maps" / "a.png").unlink()
    (tmp_path / "o" / "maps").rmdir()
    (tmp_path / "o" / "maps").symlink_to(elsewhere)
    OutputFolder.create(tmp_path / "o", overwrite=True)
    assert (elsewhere / "a.png").read_text() == "theirs"


def test_tampered_manifest_cannot_reach_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = OutputFolder.create(tmp_path / "o")
    out.write_text("a.txt", "x")
    m = tmp_path / "o" / MANIFEST_NAME
    data = json.loads(m.read_text())
    data["files"] += ["../victim.txt", str(victim)]
    m.write_text(json.dumps(data))
    OutputFolder.create(tmp_path / "o", overwrite=True)
    assert victim.read_text() == "keep" and not (tmp_path / "o" / "a.txt").exists()
    m.write_text("{not json")
    with pytest.raises(OutputRefused, match="damaged manifest"):
        OutputFolder.create(tmp_path / "o", overwrite=True)
    # entries that are not strings: the command's check read them first (an internal TypeError)
    (tmp_path / "o" / "a.txt").write_text("x")
    for files in ([["a.txt"]], "a.txt", [{"a": 1}]):
        m.write_text(json.dumps({**data, "files": files, "command": None}))
        with pytest.raises(OutputRefused, match="damaged manifest .entries are not strings"):
            OutputFolder.create(tmp_path / "o", overwrite=True, command="predict")
        with pytest.raises(OutputRefused, match="damaged manifest .entries are not strings"):
            OutputFolder.open(tmp_path / "o", lock=True)
        assert OutputFolder.written_by(tmp_path / "o") is None
        assert OutputFolder.unlisted(tmp_path, ["o"]) == [tmp_path / "o" / "a.txt"]  # a damaged manifest lists nothing


def test_discard_undoes_a_failed_start(tmp_path):
    target = tmp_path / "new" / "run"
    out = OutputFolder.create(target, lock=True)
    out.write_text("config.json", "{}")
    out.discard()
    assert not target.exists()
    # in a folder the user already had, only our files go
    (tmp_path / "mine").mkdir()
    out = OutputFolder.create(tmp_path / "mine")
    out.write_text("config.json", "{}")
    (tmp_path / "mine" / "late.txt").write_text("user")
    out.discard()
    assert _tree(tmp_path / "mine") == {"late.txt": hashlib.sha256(b"user").hexdigest(), MANIFEST_NAME: _tree(tmp_path / "mine")[MANIFEST_NAME]}


def test_a_failed_start_that_reserved_a_name_too_long_for_the_file_system_is_undone(tmp_path):
    """audit reserved an overlay name over 255 bytes, failed writing it, and its clean-up then
    failed too (is_symlink raised "File name too long"): the folder kept a manifest listing files
    never written, and a rerun was refused as "earlier defect-fast output"."""
    target = tmp_path / "audit"
    out = OutputFolder.create(target, lock=True, command="audit")
    out.reserve(["audit.json", "overlays/" + "d" * 300 + "_overlay.png"])
    out.mkdir("overlays")
    out.discard()
    assert not target.exists()


def test_check_touches_nothing_and_open_needs_manifest(tmp_path):
    OutputFolder.check(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputRefused, match="no .*manifest"):
        OutputFolder.open(tmp_path)
    out = OutputFolder.create(tmp_path / "r")
    out.write_text("log.jsonl", "1\n")
    again = OutputFolder.open(tmp_path / "r")
    assert again.files == {"log.jsonl"}
    again.record_many([f"maps/{i}.png" for i in range(3)])  # recorded before they are written
    for i in range(2):
        (tmp_path / "r" / "maps").mkdir(exist_ok=True)
        (tmp_path / "r" / "maps" / f"{i}.png").write_bytes(b"m")
    reread = OutputFolder.open(tmp_path / "r")
    assert reread.files == {"log.jsonl", "maps/0.png", "maps/1.png", "maps/2.png"} and reread.dirs == {"maps"}
    reread.clear()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [MANIFEST_NAME]
    with pytest.raises(ValueError, match="not inside"):
        again.record(tmp_path / "elsewhere.txt")


# --------------------------------------------------------------------------------------------
# Containment and single files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_rel, relation", [("data", "is the input"), ("data/train/run", "lies inside the input"),
                                               ("", "contains the input"), ("link", "is the input"),
                                               ("link/sub", "lies inside the input"), ("data/../data", "is the input")])
def test_out_overlapping_an_input_is_refused(tmp_path, out_rel, relation):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    out = tmp_path / out_rel if out_rel else tmp_path
    with pytest.raises(OutputRefused) as err:
        check_out_not_overlapping(out, [tmp_path.parent / "unrelated-input", tmp_path / "data"])
    msg = str(err.value)
    assert relation in msg and str(tmp_path / "data") in msg and "--out" in msg and "\n" not in msg


def test_out_beside_inputs_and_file_inputs(tmp_path):
    (tmp_path / "data").mkdir()
    img = tmp_path / "data" / "a.png"
    img.write_bytes(b"x")
    check_out_not_overlapping(tmp_path / "out", [tmp_path / "data", img])
    check_out_not_overlapping(tmp_path / "data2", [tmp_path / "data"])  # a name prefix is not containment
    with pytest.raises(OutputRefused, match="is the input"):
        check_out_not_overlapping(img, [img])
    with pytest.raises(OutputRefused, match="contains the input"):
        check_out_not_overlapping(tmp_path / "data", [img])


def test_an_output_at_a_file_an_input_folder_reads_through_a_link_is_refused(tmp_path):
    """DATA/test/spot linked to a folder elsewhere: `evaluate RUN DATA --json elsewhere/006.png
    --overwrite` replaced a test image it had just read with its JSON (only DATA itself was resolved)."""
    elsewhere = tmp_path / "elsewhere" / "spot"
    elsewhere.mkdir(parents=True)
    (elsewhere / "006.png").write_bytes(b"x")
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test" / "spot").symlink_to(elsewhere)
    (tmp_path / "data" / "test" / "loop").symlink_to(tmp_path / "data")  # walked once
    (tmp_path / "data" / "test" / "one.png").symlink_to(tmp_path / "single.png")
    for out, relation in ((elsewhere / "006.png", "lies inside"), (elsewhere / "report", "lies inside"),
                          (tmp_path / "elsewhere", "contains"), (tmp_path / "single.png", "is")):
        with pytest.raises(OutputRefused, match=re.escape(f"{relation} ") + r".* which the input .*data reads through "
                                                r"the link .*(spot|loop|one\.png); choose an output outside"):
            check_out_not_overlapping(out, [tmp_path / "run", tmp_path / "data"])
    check_out_not_overlapping(tmp_path / "elsewhere2", [tmp_path / "data"])


def test_links_an_input_folder_holds_past_what_is_read_or_in_a_loop_are_passed_over(tmp_path):
    """A loop of links anywhere under an input failed every command ("a loop of symbolic links"),
    and a link into a large tree was walked whole on every check: the walk stops at the depth the
    readers read (DATA/test/<class>/file) and passes over what it cannot resolve."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a").symlink_to("b")
    (data / "sub" / "b").symlink_to("a")
    check_out_not_overlapping(tmp_path / "out", [data])
    deep = data / "test" / "class" / "more"
    deep.mkdir(parents=True)
    (deep / "far").symlink_to(tmp_path / "elsewhere")  # level 4: no reader goes there
    check_out_not_overlapping(tmp_path / "elsewhere" / "out", [data])
    (data / "test" / "class" / "near").symlink_to(tmp_path / "elsewhere")  # level 3: read
    with pytest.raises(OutputRefused, match="reads through the link"):
        check_out_not_overlapping(tmp_path / "elsewhere" / "out", [data])


def test_a_file_of_a_folder_defect_fast_wrote_protects_the_folder(tmp_path):
    """A run's model.pt given in place of the run: the run folder is an input too (predict
    runcopy/model.pt ... --out runcopy/pred wrote into the run, while --out beside it was refused);
    a plain image's folder is not (an output beside the images it reads is fine)."""
    run, images = tmp_path / "run", tmp_path / "images"
    run.mkdir()
    images.mkdir()
    (run / MANIFEST_NAME).write_text("{}")
    (run / "model.pt").write_bytes(b"x")
    (images / "a.png").write_bytes(b"x")
    with pytest.raises(OutputRefused, match=r"lies inside the input .*run;"):
        check_out_not_overlapping(run / "pred", [run / "model.pt"])
    check_out_not_overlapping(images / "pred", [images / "a.png"])
    check_out_not_overlapping(tmp_path / "pred", [run / "model.pt", None])


def test_an_output_under_a_file_or_a_folder_it_may_not_write_in_is_refused_before_any_work(tmp_path, monkeypatch):
    """check() touches nothing and is called before the work: it must see what the first mkdir
    would fail on (a file where a folder goes; a folder without write permission)."""
    (tmp_path / "photo.png").write_bytes(b"x")
    for out in ("photo.png/audit", "photo.png/a/b"):
        with pytest.raises(OutputRefused, match=f"^--out {tmp_path / out}: {tmp_path / 'photo.png'} is not a folder$"):
            OutputFolder.check(tmp_path / out, command="audit")
    shut = tmp_path / "shut"
    (shut / "empty").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: Path(path) != shut and real_access(path, mode, *a, **k))
    for out in (shut / "new", shut / "new" / "deeper"):
        with pytest.raises(OutputRefused, match=f"^--out {out}: no permission to write in {shut}$"):
            OutputFolder.check(out, command="audit")
        with pytest.raises(OutputRefused, match=f"no permission to write in {shut}$"):
            safe_output_file(out / "x.json", False)
    with pytest.raises(OutputRefused, match=f"^--out {shut}: no permission to write in {shut}$"):
        OutputFolder.check(shut, command="audit")  # an existing folder: its own permission
    OutputFolder.check(shut / "empty", command="audit")  # writable below it: fine
    assert sorted(x.name for x in tmp_path.iterdir()) == ["photo.png", "shut"]
    # on a read-only mount no permission would help: said as what it is
    real_statvfs = os.statvfs

    class _ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: _ReadOnly() if Path(path) == shut else real_statvfs(path))
    with pytest.raises(OutputRefused, match=re.escape(f"--out {shut / 'new'}: cannot create files in {shut} "
                                                      "(read-only file system)")):
        OutputFolder.check(shut / "new", command="audit")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_folder_nothing_can_be_created_in_is_refused_before_any_work_as_root_too(tmp_path):
    """Root passes the permission bits everywhere, /proc and read-only mounts included: there the
    write failed only after the work (``evaluate --json /proc/m.json``). A file is created and
    removed in the nearest existing folder instead; where that works, nothing is left."""
    for out in (Path("/proc/m.json"), Path("/proc/new/m.json")):
        with pytest.raises(OutputRefused, match=f"^output file {out}: (cannot create files|no permission to write) "
                                                "in /proc"):
            safe_output_file(out, False)
    with pytest.raises(OutputRefused, match="^--out /proc/audit: (cannot create files|no permission to write) in /proc"):
        OutputFolder.check("/proc/audit", command="audit")
    (tmp_path / "out").mkdir()
    safe_output_file(tmp_path / "out" / "m.json", False)
    OutputFolder.check(tmp_path / "new", command="audit")
    OutputFolder.check(tmp_path / "out", command="audit")
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["out"]


def test_the_file_made_to_see_a_folder_writable_is_no_file_of_anyone(tmp_path, monkeypatch):
    """Where the file system has no unnamed files the check makes a named one: a concurrent check
    of the same empty folder, or a probe a kill left, must not count it as a user's file."""
    import defect_fast.safety as safety

    out = tmp_path / "out"
    out.mkdir()
    (out / ".defect_fast-probe-k1ll3d").write_bytes(b"")  # left by a process killed in its check
    OutputFolder.check(out, command="audit")
    if hasattr(os, "O_TMPFILE"):
        monkeypatch.delattr(os, "O_TMPFILE")
    made = []
    real = safety.tempfile.mkstemp
    monkeypatch.setattr(safety.tempfile, "mkstemp", lambda **kw: made.append(kw) or real(**kw))
    safe_output_file(out / "m.json", False)
    OutputFolder.check(out / "sub", command="audit")
    assert len(made) == 2 and sorted(x.name for x in out.iterdir()) == [".defect_fast-probe-k1ll3d"]


def test_safe_output_file(tmp_path):
    p = tmp_path / "m.json"
    assert safe_output_file(p, False) == p
    p.write_text("old")
    with pytest.raises(OutputRefused, match=r"m\.json: file exists; pass --overwrite"):
        safe_output_file(p, False)
    assert safe_output_file(p, True) == p
    with pytest.raises(OutputRefused, match="is a folder"):
        safe_output_file(tmp_path, True)
    img = tmp_path / "input.png"
    img.write_bytes(b"x")
    with pytest.raises(OutputRefused, match="is the input"):
        safe_output_file(img, True, inputs=[img])
    with pytest.raises(OutputRefused, match="not a folder"):
        safe_output_file(img / "x.json", True)
    assert p.read_text() == "old" and img.read_bytes() == b"x"
    for name in (f"{tmp_path}/newdir/", f"{tmp_path}/newdir/.", f"{tmp_path}/newdir/.."):  # a file "newdir" was written
        with pytest.raises(OutputRefused, match="names a folder; give a file name"):
            safe_output_file(name, False)
    assert not (tmp_path / "newdir").exists()


def test_safe_output_file_refuses_a_name_its_temporary_cannot_have(tmp_path):
    """A legal name of 242 to 255 bytes (--json, report --out) failed at the write, after all the
    work: its temporary (".<name>.<8 characters>.tmp") is 14 bytes longer. Refused up front; the
    longest that fits is written."""
    from defect_fast.safety import atomic_write_json

    with pytest.raises(OutputRefused, match=r"its name is 250 bytes long; at most 241 fit .*give a shorter name$"):
        safe_output_file(tmp_path / ("J" * 245 + ".json"), False)
    assert list(tmp_path.iterdir()) == []
    longest = safe_output_file(tmp_path / ("J" * 236 + ".json"), False)
    atomic_write_json(longest, {"ok": 1})
    assert json.loads(longest.read_text()) == {"ok": 1}
    with pytest.raises(OutputRefused, match="at most 241 fit"):  # a folder not made yet: its file system's limit
        safe_output_file(tmp_path / "new" / ("é" * 125 + ".json"), False)
    # past 255 bytes the file system's own refusal came first, naming neither the option nor the limit
    with pytest.raises(OutputRefused, match=r"^--json .*: its name is 305 bytes long; at most 241 fit"):
        safe_output_file(tmp_path / ("J" * 300 + ".json"), False, what="--json")


def test_safe_output_file_never_replaces_a_device_pipe_or_a_link_to_one(tmp_path):
    """--overwrite put a plain file in place of a named pipe, a device node or a link to one
    (/dev/stdout: as root, the system's); the advice "pass --overwrite" led there."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    null = tmp_path / "null"
    null.symlink_to(os.devnull)  # a link to a device, as /dev/stdout is to a terminal or pipe
    for target in (fifo, null):
        for overwrite in (False, True):
            with pytest.raises(OutputRefused, match=f"{target.name}: is not a regular file .* not even with --overwrite"):
                safe_output_file(target, overwrite)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and null.is_symlink()
    plain = tmp_path / "plain.json"  # a link to a plain file too: the link would be replaced, not the file
    plain.write_text("x")
    (tmp_path / "link.json").symlink_to(plain)
    with pytest.raises(OutputRefused, match="is a symbolic link"):
        safe_output_file(tmp_path / "link.json", True)


def test_safe_output_file_never_replaces_another_command_s_output(tmp_path):
    """--overwrite of a single output file (report, evaluate --json, export) replaced a trained
    run's model.pt or a predict folder's scores.json with its own; what another command's output
    folder lists, its manifest and lock included, is refused."""
    run = OutputFolder.create(tmp_path / "run", command="train")
    run.write_bytes("model.pt", b"weights")
    run.write_bytes("sub/stage.pt", b"stage")
    (run.path / "notes.json").write_text("mine")  # not written by defect-fast: --overwrite may replace it
    for name in ("model.pt", "sub/stage.pt", MANIFEST_NAME):
        with pytest.raises(OutputRefused, match=rf"is part of the output of 'defect-fast train' in .*run, which "
                                                r"--overwrite never replaces; choose another name"):
            safe_output_file(run.path / name, True)
    assert safe_output_file(run.path / "notes.json", True) == run.path / "notes.json"
    assert (run.path / "model.pt").read_bytes() == b"weights"
    # by where the write lands: through a link and "..", the run's file, not a "run" beside the link
    (tmp_path / "deep").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "deep")
    with pytest.raises(OutputRefused, match="is part of the output"):
        safe_output_file(tmp_path / "link" / ".." / "run" / "model.pt", True)
    # an unreadable manifest: what it lists is unknown, so nothing under it is replaced
    (run.path / MANIFEST_NAME).write_text("{damaged")
    with pytest.raises(OutputRefused, match=r"lies in .*run, whose \.defect_fast-manifest\.json cannot be read"):
        safe_output_file(run.path / "notes.json", True)


def test_safe_output_file_refuses_a_name_another_command_has_reserved(tmp_path):
    """A name a working command's folder lists but has not written yet (predict's scores.json,
    reserved at its start) passed the check: evaluate --json wrote there and said so, and predict
    replaced it at its end. It is refused, as the written file is."""
    folder = OutputFolder.create(tmp_path / "out", command="predict", lock=True)
    folder.reserve(["scores.json", "maps/a.png"])
    for name in ("scores.json", "maps/a.png"):
        for overwrite in (False, True):
            with pytest.raises(OutputRefused, match=r"is part of the output of 'defect-fast predict' in .*out \(not "
                                                    r"written yet, or removed since\): that command writes it, and its "
                                                    r"--overwrite clears it, so it is not this one's to take; choose"):
                safe_output_file(folder.path / name, overwrite, what="--json")
    assert safe_output_file(folder.path / "mine.json", False) == folder.path / "mine.json"  # a name it does not list
    folder.release()
    # below a manifest that cannot be read, a new name is free (what it lists is unknown, not this name)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text('{"format": "x"}')
    assert safe_output_file(bad / "new.json", False) == bad / "new.json"


def test_a_name_reserved_while_the_work_ran_is_not_taken(tmp_path, monkeypatch):
    """A predict that reserved a report's or an export's name while they worked (after their
    check) then replaced the file they wrote at its end: the name is checked again as it is taken."""
    out = tmp_path / "p"
    page = out / "scores.json"
    real = os.fsync
    predict = OutputFolder.create(out, command="predict", lock=True)  # (an --overwrite of its folder, say)
    started = []

    def fsync(fd):  # the predict reserves its names during this write, after every check
        if not started:
            started.append(True)
            predict.reserve(["scores.json"])
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputRefused, match=r"scores.json: is part of the output of 'defect-fast predict' .*not written, "
                                            "choose another name"):
        atomic_write_json(page, {"a": 1}, replace=False)
    assert not page.exists() and sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, MANIFEST_NAME])
    predict.write_json("scores.json", {"predict": 1})  # written by then: said as its file, not as a name to come
    with pytest.raises(OutputRefused) as err:
        atomic_write_json(page, {"a": 1}, unlisted=True)
    assert "is part of the output of 'defect-fast predict'" in str(err.value) and "not written yet" not in str(err.value)
    assert json.loads(page.read_text()) == {"predict": 1}
    predict.release()


def test_a_name_taken_without_hard_links_leaves_no_empty_file_when_stopped(tmp_path, monkeypatch):
    """On a file system without hard links the name is taken by an exclusive create and a rename;
    a stop (Ctrl-C) or a failure between the two left an empty file at the output's name, and the
    next run was refused as "file exists"."""
    target = tmp_path / "c.json"

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    real_replace = os.replace

    def stopped(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"a": 1}, replace=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", real_replace)
    atomic_write_json(target, {"a": 2}, replace=False)  # the fallback takes a free name
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_atomic_open_without_replace_keeps_a_file_that_appears_during_the_write(tmp_path):
    """A write checked free at its start and renamed over the name at its end replaced a file
    another process put there meanwhile (two evaluate --json, two exports, a report beside an
    evaluate, without --overwrite). With replace=False the finished file only takes a free name."""
    p = tmp_path / "metrics.json"
    with pytest.raises(FileExistsError) as info:
        with atomic_open(p, "w", replace=False) as fh:
            fh.write("mine")
            p.write_text("theirs")  # another process, during the work
    assert info.value.filename == str(p) and "appeared there" in str(info.value)
    assert p.read_text() == "theirs"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left
    fresh = tmp_path / "fresh.json"
    atomic_write_json(fresh, {"a": 1}, replace=False)
    assert json.loads(fresh.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError):
        atomic_write_json(fresh, {"a": 2}, replace=False)
    assert json.loads(fresh.read_text()) == {"a": 1}
    atomic_write_json(fresh, {"a": 3})  # replace=True (the default): as before
    assert json.loads(fresh.read_text()) == {"a": 3}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as fh:
            fh.write(b"half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "one"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]  # no temp file left
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    old_mask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "g.txt", "x")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o640  # as open() would, not mkstemp's 0600


def test_a_disk_that_fills_at_the_flush_is_named_by_the_file_asked_for(tmp_path, monkeypatch):
    """A full disk often shows only at fsync (or the flush), in an OSError without a file name: the
    command printed "[Errno 28] No space left on device", naming no file."""
    import errno

    from defect_fast import safety

    p = tmp_path / "checkpoint.pt"
    atomic_write_text(p, "one")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safety.os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(p, "two")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(p)
    assert safety._user_message(info.value, ()) == f"{p}: No space left on device"
    assert p.read_text() == "one" and sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    # and at the flush of the buffered bytes, which the close repeated outside the naming
    real_fdopen = safety.os.fdopen

    def onto_a_full_disk(fd, mode, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, **kwargs)

    monkeypatch.setattr(safety.os, "fdopen", onto_a_full_disk)
    with pytest.raises(OSError) as info:
        atomic_write_text(p, "two")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(p)
    assert p.read_text() == "one" and sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint.pt"]
    # and at a write larger than the buffer, inside the with block (torch.save's, export's)
    with pytest.raises(OSError) as info:
        with atomic_open(p) as fh:
            fh.write(b"x" * (1 << 20))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(p)
    assert p.read_text() == "one" and sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_symbolic_link_loop_or_an_unknown_user_is_a_usage_error_naming_the_path(tmp_path, monkeypatch):
    """Path.resolve raises RuntimeError for both on some Pythons (a bug's traceback in run_main)."""
    from defect_fast.safety import UsageError, real_path

    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    for out, inputs, named in (("loop", ["data"], "loop"), ("loop/maps", ["data"], "loop/maps"), ("out", ["loop"], "loop")):
        with pytest.raises(UsageError, match=f"^{named}: is a loop of symbolic links$"):
            check_out_not_overlapping(out, inputs)
    with pytest.raises(UsageError, match="^~no-such-user-here/data: names no user on this machine$"):
        real_path("~no-such-user-here/data", expand_user=True)
    # ~ is left as given where the path is opened as given (a quoted '~/x' is a folder named ~)
    assert real_path("~/x") == tmp_path / "~" / "x"
    assert real_path("~/x", expand_user=True) == Path("~/x").expanduser().resolve()


def test_atomic_write_into_a_folder_that_takes_no_file_names_the_file_asked_for(tmp_path, monkeypatch):
    """The temporary file it could not create is not what the user asked for: the error names the
    target and its folder (as the command line prints it, one line)."""
    import errno

    from defect_fast.safety import _user_message

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.onnx.x1y2.tmp"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "out.onnx", "x")
    assert _user_message(info.value, ()) == f"{tmp_path / 'out.onnx'}: cannot create a file in {tmp_path} (Permission denied)"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------


def test_dump_json_strict():
    import numpy as np

    obj = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (np.float32(0.25), torch.tensor(2.0)),
           "d": np.array([1, 2]), "p": Path("x/y"), "ok": True}
    text = dump_json_strict(obj)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert json.loads(text) == {"a": None, "b": [1.5, None, None], "c": [0.25, 2.0], "d": [1, 2], "p": "x/y", "ok": True}
    with pytest.raises(ValueError, match=r"^a: nan cannot"):
        dump_json_strict(obj, nan="raise")
    with pytest.raises(ValueError, match=r"^b\[1\]: inf cannot"):
        dump_json_strict({"b": obj["b"]}, nan="raise")
    with pytest.raises(TypeError, match="object"):
        dump_json_strict({"x": object()})


def test_atomic_write_json_is_strict(tmp_path):
    p = atomic_write_json(tmp_path / "t.json", {"threshold": float("nan")})
    assert "NaN" not in p.read_text() and json.loads(p.read_text()) == {"threshold": None}


# --------------------------------------------------------------------------------------------
# Run lock
# --------------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from defect_fast.safety import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_overwrite_never_replaces_another_command_s_output(tmp_path):
    run = OutputFolder.create(tmp_path / "run", command="train")
    run.write_bytes("model.pt", b"weights")
    run.release()
    for command in ("predict", "diagnose", "watch", "demo"):
        with pytest.raises(OutputRefused, match=r"output of 'defect-fast train', which \w+ never replaces"):
            OutputFolder.create(tmp_path / "run", overwrite=True, command=command)
        with pytest.raises(OutputRefused, match="output of 'defect-fast train'"):
            OutputFolder.open(tmp_path / "run", command=command)
    assert (tmp_path / "run" / "model.pt").read_bytes() == b"weights"
    again = OutputFolder.create(tmp_path / "run", overwrite=True, command="train")  # its own command may
    assert not (tmp_path / "run" / "model.pt").exists() and again.command == "train"
    # manifests written before they named their command: a run's files or a journal say whose they are
    legacy = tmp_path / "legacy"
    for name, owner in (("checkpoint.pt", "train"), ("results.jsonl", "watch"), ("scores.json", None)):
        legacy.mkdir()
        (legacy / name).write_text("x")
        (legacy / MANIFEST_NAME).write_text(json.dumps({"format": "defect_fast-output-manifest", "version": 1,
                                                        "files": [name], "dirs": []}))
        assert OutputFolder.written_by(legacy) == owner
        if owner is not None:
            with pytest.raises(OutputRefused, match=f"defect-fast {owner}"):
                OutputFolder.check(legacy, overwrite=True, command="predict")
        else:
            OutputFolder.check(legacy, overwrite=True, command="predict")
        shutil.rmtree(legacy)


def test_overwrite_takes_the_lock_before_clearing(tmp_path):
    out = OutputFolder.create(tmp_path / "pred", command="predict")
    out.write_text("scores.json", "{}")
    proc = _start_holder(tmp_path / "pred")  # another process working in the folder (a running predict, watch...)
    try:
        with pytest.raises(RunInUse):  # refused even without lock=True: nothing is removed under it
            OutputFolder.create(tmp_path / "pred", overwrite=True, command="predict")
        assert (tmp_path / "pred" / "scores.json").read_text() == "{}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cleared = OutputFolder.create(tmp_path / "pred", overwrite=True, command="predict")
    assert not (tmp_path / "pred" / "scores.json").exists() and cleared.lock is None  # released once cleared


def test_lock_refuses_second_holder_and_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _start_holder(run)
    try:
        with pytest.raises(RunInUse) as err:
            RunLock(run).acquire()
        assert err.value.pid == proc.pid
        assert str(err.value).startswith(f"{run} is in use by PID {proc.pid}")
        with pytest.raises(RunInUse):  # the same refusal through an output folder, before any removal
            OutputFolder.create(run, overwrite=True, lock=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(run) as lock:  # the kernel released the dead holder's lock
        assert lock.held and (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunInUse, match=f"PID {os.getpid()}"):
            RunLock(run).acquire()  # a second lock in the same process is refused too
    assert not lock.held
    RunLock(run).acquire().release()


def test_the_lock_file_never_reads_empty_to_a_process_it_refuses(tmp_path, monkeypatch):
    """A start refused by a holder read the holder's PID from the lock file; the holder emptied it
    before writing its PID, and a releasing holder emptied it too, so a start refused at those
    moments said "in use by another process". The PID is written over the earlier one, then the
    rest cut, and left at release."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("1234567890123\n")  # an earlier holder's (longer) PID
    seen = []
    real_pwrite, real_ftruncate = os.pwrite, os.ftruncate

    def pwrite(fd, data, offset):
        seen.append((run / LOCK_NAME).read_text())
        return real_pwrite(fd, data, offset)

    def ftruncate(fd, length):
        seen.append((run / LOCK_NAME).read_text())
        return real_ftruncate(fd, length)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    lock = RunLock(run).acquire()
    seen.append((run / LOCK_NAME).read_text())
    lock.release()
    seen.append((run / LOCK_NAME).read_text())
    assert seen and all(text.strip() for text in seen), seen
    assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_holder_is_never_named_by_a_pid_that_has_exited(tmp_path):
    """The PID is left in the lock file at release (and a holder killed with -9 leaves its own): a
    start refused between a new holder's lock and its write of its PID read the earlier holder's,
    and named a process that had exited as the one to wait for. A PID of no living process is
    said as "another process"."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _start_holder(run)
    try:
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        (run / LOCK_NAME).write_text(gone.stdout)  # as the new holder finds it before writing its own
        with pytest.raises(RunInUse, match=f"{run} is in use by another process; wait") as err:
            RunLock(run).acquire()
        assert err.value.pid is None
        (run / LOCK_NAME).write_text("0\n")  # no process's (os.kill(0, ...) would signal this process's group)
        with pytest.raises(RunInUse, match="in use by another process"):
            RunLock(run).acquire()
        (run / LOCK_NAME).write_text(f"{proc.pid}\n")  # its own: named
        with pytest.raises(RunInUse, match=f"in use by PID {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_lock_file_removed_between_its_open_and_its_lock_is_not_held(tmp_path, monkeypatch):
    """A holder that removes the lock file as it lets go (a failed start's discard) left a process
    that had opened it holding a lock on a file no longer there, and a third process then locked a
    new one beside it: two holders. The lock is now taken on the file at the path."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    real_flock, calls = fcntl.flock, []

    def removed_first(fd, op):
        calls.append(op)
        if len(calls) == 1:
            (run / LOCK_NAME).unlink()  # as the holder's release(remove=True) does
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    lock = RunLock(run).acquire()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2 and (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunInUse):
            RunLock(run).acquire()
    finally:
        lock.release()

    def always_removed(fd, op):  # a program that deletes it again and again: an error, not a hang
        (run / LOCK_NAME).unlink(missing_ok=True)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", always_removed)
    with pytest.raises(OutputRefused, match="removed or replaced at each of 100 attempts"):
        RunLock(run).acquire()


# --------------------------------------------------------------------------------------------
# Digests
# --------------------------------------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model_name": "x", "model_config": {"width": 4},
            "model_state": {"w": torch.randn(8, 8, generator=g), "b": torch.zeros(8, dtype=torch.float64),
                            "n": torch.tensor(3), "h": torch.ones(2, dtype=torch.bfloat16)},
            "opt": [{"step": torch.tensor(5.0)}, (1, 2.5, None)]}


def test_state_digest_covers_dtype_shape_bytes_and_keys():
    base = state_digest(_state())
    assert base == state_digest(_state())
    reordered = _state()
    reordered["model_state"] = dict(reversed(list(reordered["model_state"].items())))
    assert state_digest(reordered) == base  # key order does not matter
    variants = []
    s = _state(); s["model_state"]["w"][3, 4] += 1e-6; variants.append(s)
    s = _state(); s["model_state"]["w"] = s["model_state"]["w"].reshape(4, 16); variants.append(s)
    s = _state(); s["model_state"]["b"] = s["model_state"]["b"].to(torch.float32); variants.append(s)
    s = _state(); s["model_state"]["w2"] = s["model_state"].pop("w"); variants.append(s)
    s = _state(); s["model_config"]["width"] = 5; variants.append(s)
    s = _state(); s["opt"][1] = (1, 2.5, 0); variants.append(s)
    digests = {state_digest(v) for v in variants}
    assert len(digests) == len(variants) and base not in digests
    # a non-contiguous view hashes like its contiguous copy
    w = torch.arange(12.0).reshape(3, 4)
    assert state_digest({"t": w.t()}) == state_digest({"t": w.t().contiguous()})
    with pytest.raises(TypeError, match="cannot digest"):
        state_digest({"x": object()})


def test_saved_file_with_flipped_bytes_is_detected(tmp_path):
    path = save_with_digest(_state(), tmp_path / "model.pt")
    obj = load_with_digest(path, required_keys=("model_name", "model_config"))
    assert torch.equal(obj["model_state"]["w"], _state()["model_state"]["w"])
    # flip 64 bytes inside the stored weight tensor (found by its exact bytes in the zip)
    raw = bytearray(path.read_bytes())
    w = _state()["model_state"]["w"].numpy().tobytes()
    at = raw.find(w)
    assert at > 0
    for i in range(at + 32, at + 96):
        raw[i] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DigestError) as err:
        load_with_digest(damaged)
    assert str(damaged) in str(err.value) and "digest mismatch" in str(err.value)


def test_foreign_older_and_broken_files_are_clear_errors(tmp_path):
    old = tmp_path / "old.pt"
    torch.save(_state(), old)  # no digest: an older or foreign file
    with pytest.raises(DigestError, match=r"old\.pt: no tensor digest .* it is not read; train again with this "
                                          r"version$"):  # (no defect-fast reads it, to save it again)
        load_with_digest(old)
    assert verify_digest(torch.load(old, weights_only=True), old, allow_missing=True) is False
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(DigestError, match=r"foreign\.pt: not a defect_fast file .*missing model_config"):
        load_with_digest(foreign, required_keys=("model_config",))
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(DigestError, match="holds a list"):
        load_with_digest(listed)
    for name, data in (("empty.pt", b""), ("junk.pt", b"garbage" * 9)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DigestError, match=f"{name}: not a defect_fast model or checkpoint file"):
            load_with_digest(tmp_path / name)
    trunc = tmp_path / "trunc.pt"
    good = save_with_digest(_state(), tmp_path / "good.pt").read_bytes()
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(DigestError, match=r"trunc\.pt"):
        load_with_digest(trunc)
    with pytest.raises(DigestError, match="no such file"):
        load_with_digest(tmp_path / "missing.pt")
    # a device reads for ever and a FIFO waits for a writer for ever: both refused at once, by name
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    for special in (fifo, Path(os.devnull)):
        with pytest.raises(DigestError, match=f"{re.escape(str(special))}: is not a regular file"):
            load_with_digest(special)
    assert attach_digest(_state())[DIGEST_KEY]["hex"] == state_digest(_state())
    # programs such as export writes, given back as a model: said what they are, in one line and
    # without torch's warning (torch.load would advise on TorchScript, or call the .pt2 corrupted)
    import warnings
    import zipfile

    lin = torch.nn.Linear(2, 2)
    torch.jit.save(torch.jit.script(lin), tmp_path / "m.ts")
    torch.export.save(torch.export.export(lin, (torch.zeros(1, 2),)), tmp_path / "m.pt2")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("other/readme.txt", "x")
    for name, said in (("m.ts", "a TorchScript program"), ("m.pt2", "a torch.export program"),
                       ("other.zip", "a zip archive without the data torch.save writes")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DigestError) as info:
                load_with_digest(tmp_path / name)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / name}: not a defect_fast model or checkpoint file: {said}"), text
        assert "\n" not in text


def test_writing_undoes_a_failed_start_and_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder.create(out, lock=True, command="predict")
    with pytest.raises(KeyboardInterrupt):
        with folder.writing():
            folder.write_text("a.txt", "half")
            raise KeyboardInterrupt
    assert not out.exists() and folder.lock is None  # its own start undone, lock released
    folder = OutputFolder.create(out, lock=True, command="predict")
    with folder.writing():
        folder.write_text("a.txt", "done")
    assert (out / "a.txt").read_text() == "done" and folder.lock is None
    again = OutputFolder.create(out, overwrite=True, lock=True, command="predict")
    (out / "mine.txt").write_text("user")
    with pytest.raises(ValueError):
        with again.writing():
            again.write_text("b.txt", "half")
            raise ValueError("stop")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mine.txt"]


def test_a_damaged_archive_is_a_one_line_error_wherever_the_damage_is(tmp_path):
    """One byte changed in a model file's zip directory escaped as UnicodeDecodeError (a name that
    is not UTF-8), NotImplementedError (an unknown compression) or BadZipFile: an "internal error"
    on the command line, and past an embedding program's ``except RunError``."""
    from defect_fast.safety import DigestError, load_with_digest, save_with_digest

    good = save_with_digest({"w": torch.arange(64.0), "name": "x"}, tmp_path / "good.pt")
    raw = good.read_bytes()
    bad = tmp_path / "bad.pt"
    escaped = {}
    for off in [*range(0, 120), *range(len(raw) - 700, len(raw))]:
        for flip in (0xFF, 0x80, 0x01):
            b = bytearray(raw)
            b[off] ^= flip
            bad.write_bytes(b)
            try:
                load_with_digest(bad)
            except DigestError as exc:
                assert "\n" not in str(exc) and str(bad) in str(exc)
            except Exception as exc:  # noqa: BLE001 - what the test is about
                escaped.setdefault(type(exc).__name__, off)
    assert not escaped, escaped


def test_a_start_that_loses_the_race_for_a_new_folder_removes_nothing(tmp_path, monkeypatch):
    """Two starts on one new folder: the other makes it and takes its lock between this one's
    checks and its mkdir. The loser is refused and leaves the holder's folder and lock file as
    they are (it once removed both, and a third start then took the lock beside the holder)."""
    out = tmp_path / "run"
    real_mkdir, holder = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        if self == out and not holder:
            real_mkdir(self)
            holder.append(RunLock(out).acquire())
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with pytest.raises(RunInUse):
        OutputFolder.create(out, lock=True, command="train")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert holder[0].held and (out / LOCK_NAME).is_file()
    with pytest.raises(RunInUse):  # the lock is still the holder's alone
        RunLock(out).acquire()
    holder[0].release()


def test_a_link_named_as_the_lock_file_is_never_followed(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("ten years of inspection notes")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(target)
    with pytest.raises(OutputRefused, match="not empty"):  # the link is the user's entry, not the tool's
        OutputFolder.create(out, lock=True, command="train")
    with pytest.raises(OutputRefused, match="symbolic link"):
        RunLock(out).acquire()
    assert target.read_text() == "ten years of inspection notes"


def test_a_model_file_that_cannot_be_read_is_not_called_damaged(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "model.pt"
    save_with_digest({"w": torch.zeros(2)}, path)
    real_open = os.open

    def no_permission(file, *args, **kwargs):  # as for another user's file with mode 600 (root reads any)
        if isinstance(file, (str, bytes, os.PathLike)) and Path(os.fsdecode(file)) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(DigestError, match=r"model\.pt: cannot be read \(Permission denied\)"):
        load_with_digest(path)
    monkeypatch.setattr(os, "open", real_open)
    assert torch.equal(load_with_digest(path)["w"], torch.zeros(2))


def test_a_value_the_safe_load_refuses_is_refused_when_saved(tmp_path):
    """numpy's float64 is a float, so it was digested and saved; the weights_only load then called
    the file unsafe. It is refused at the save, naming its key, with nothing written."""
    import numpy as np

    path = tmp_path / "model.pt"
    with pytest.raises(TypeError, match=r"calibration\.rho: cannot digest a float64"):
        save_with_digest({"calibration": {"rho": np.float64(0.5)}}, path)
    assert not path.exists()
    save_with_digest({"calibration": {"rho": 0.5, "n": 3, "ok": True}}, path)
    assert load_with_digest(path)["calibration"] == {"rho": 0.5, "n": 3, "ok": True}


def test_a_start_that_loses_the_race_to_a_command_without_a_lock_clears_nothing(tmp_path, monkeypatch):
    """The winner (predict takes no lock) made the folder and wrote its output between this start's
    checks and its mkdir: checked again, this start is refused (it took the lock and cleared it)."""
    out = tmp_path / "pred"
    real_mkdir, done = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        if self == out and not done:
            done.append(1)
            monkeypatch.setattr(Path, "mkdir", real_mkdir)
            OutputFolder.create(out, command="predict").write_text("scores.csv", "the other start's results\n")
            monkeypatch.setattr(Path, "mkdir", racing_mkdir)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with pytest.raises(OutputRefused, match="earlier defect-fast output; pass --overwrite"):
        OutputFolder.create(out, command="predict")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert (out / "scores.csv").read_text() == "the other start's results\n"


def test_a_start_that_loses_the_race_to_a_training_is_told_the_folder_is_in_use(tmp_path, monkeypatch):
    """Two trainings started at once into a new folder: the loser was told to pass --overwrite
    (which would then clear the winner's files under it, were it not refused in turn), not that the
    folder is in use, and by which process."""
    out = tmp_path / "run"
    real_mkdir, winner = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        if self == out and not winner:
            monkeypatch.setattr(Path, "mkdir", real_mkdir)
            winner.append(OutputFolder.create(out, command="train", lock=True))
            winner[0].write_text("config.json", "{}")
            monkeypatch.setattr(Path, "mkdir", racing_mkdir)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    try:
        with pytest.raises(RunInUse, match=f"{re.escape(str(out))} is in use by PID {os.getpid()}"):
            OutputFolder.create(out, command="train", lock=True)
        monkeypatch.setattr(Path, "mkdir", real_mkdir)
        assert winner[0].lock.still_held() and (out / "config.json").read_text() == "{}"
    finally:
        winner[0].release()


def test_a_dangling_link_at_the_output_file_is_not_replaced_silently(tmp_path):
    from defect_fast.safety import safe_output_file

    (tmp_path / "out.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(OutputRefused, match="is a symbolic link"):
        safe_output_file(tmp_path / "out.json", overwrite=False)


def test_a_link_to_a_file_at_the_output_is_never_replaced_by_a_plain_file(tmp_path):
    """--json link.json --overwrite renamed its file over the link, which went while its target
    stayed; /dev/stdout, with stdout sent to a file, is such a link: it was replaced in /dev."""
    from defect_fast.safety import safe_output_file

    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("target.json")
    for overwrite in (False, True):  # said at once, not "pass --overwrite" first
        with pytest.raises(OutputRefused, match=r"link\.json: is a symbolic link \(to target\.json\), which is never "
                                             r"replaced, not even with --overwrite"):
            safe_output_file(tmp_path / "link.json", overwrite=overwrite, flag="--overwrite")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "{}"


def test_reserve_refuses_a_users_dangling_link(tmp_path):
    folder = OutputFolder.create(tmp_path / "o")
    (tmp_path / "o" / "model.pt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputRefused, match="not written by defect-fast"):
        folder.reserve(["model.pt"])


def test_discard_keeps_an_empty_folder_the_user_made(tmp_path):
    (tmp_path / "o").mkdir()
    folder = OutputFolder.create(tmp_path / "o")
    folder.write_text("a.txt", "x")
    folder.discard()
    assert (tmp_path / "o").is_dir() and not (tmp_path / "o" / "a.txt").exists()


def test_output_names_differing_only_in_case_get_a_number_whatever_the_order():
    """On a case-blind file system "b_map.png" and "B_map.png" are one file: the later of two images
    whose names differ in case only gets a number, also when it is the upper-case one."""
    from defect_fast.safety import output_stems

    assert output_stems([Path("x/b.png"), Path("y/B.png")]) == ["b", "B_2"]
    assert output_stems([Path("y/B.png"), Path("x/b.png")]) == ["B", "b_2"]


def test_a_stem_of_exactly_the_limit_is_kept_as_it_is():
    from defect_fast.safety import MAX_OUTPUT_STEM, short_stem

    exact = "a" * MAX_OUTPUT_STEM
    assert short_stem(exact, MAX_OUTPUT_STEM) == exact
    longer = short_stem(exact + "b", MAX_OUTPUT_STEM)
    assert longer != exact + "b" and len(longer.encode()) <= MAX_OUTPUT_STEM


def test_a_folder_that_can_be_entered_but_not_written_is_refused(tmp_path, monkeypatch):
    """Write permission is what a new output needs in its nearest existing folder (not only entry)."""
    shut = tmp_path / "shut"
    shut.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (not (Path(path) == shut and mode & os.W_OK))
                        and real_access(path, mode, *a, **k))
    with pytest.raises(OutputRefused, match=f"no permission to write in {shut}$"):
        safe_output_file(shut / "x.json", False)
    with pytest.raises(OutputRefused, match=f"no permission to write in {shut}$"):
        OutputFolder.check(shut / "new", command="audit")


def test_a_false_alarm_rate_must_lie_strictly_between_0_and_1():
    import argparse

    from defect_fast.safety import rate

    assert rate("0.05") == 0.05 and rate("0.999") == 0.999
    for bad in ("1", "1.0", "0", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            rate(bad)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_model_file_is_written_waits_for_the_file(tmp_path, monkeypatch, signum):
    """Ctrl-C or SIGTERM inside torch.save reached its zip writer: an internal RuntimeError, or an
    abort as it wrote on into the closed file. The file is now written whole, then the signal
    takes its course (here: the handler the caller had)."""
    import torch

    from defect_fast.safety import load_with_digest, save_with_digest

    real_save, came = torch.save, []

    def interrupted_save(obj, fh, *a, **k):
        signal.raise_signal(signum)  # in the middle of the write
        return real_save(obj, fh, *a, **k)

    def handler(s, _frame):
        came.append((s, (tmp_path / "model.pt").is_file()))
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    old = signal.signal(signum, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_with_digest({"w": torch.ones(3)}, tmp_path / "model.pt")
    finally:
        signal.signal(signum, old)
    assert came == [(signum, True)]  # once, after the file was in place
    assert torch.equal(load_with_digest(tmp_path / "model.pt")["w"], torch.ones(3))
    assert signal.getsignal(signum) is old


def test_a_write_whose_rename_and_cleanup_both_fail_names_the_file_asked_for(tmp_path, monkeypatch):
    """In a folder made read-only mid-write the rename failed, then the removal of the temporary
    failed too, and that second error, naming the temporary, replaced the first."""
    import errno

    from defect_fast.safety import atomic_open

    def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(a[0]))

    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError) as err:
        with atomic_open(tmp_path / "model.pt") as fh:
            fh.write(b"x")
    assert err.value.filename == str(tmp_path / "model.pt") and err.value.errno == errno.EACCES


def test_a_folder_a_command_is_writing_in_is_said_to_be_in_use_not_to_hold_earlier_output(tmp_path):
    """Two trainings started at once into one new folder: the one that lost was told to pass
    --overwrite, while the other trained there (the check saw its manifest, not its lock); an
    --overwrite of a folder in use did all its work before it was refused."""
    from defect_fast.safety import RunInUse

    out = tmp_path / "run"
    folder = OutputFolder.create(out, lock=True, command="train")
    folder.write_json("config.json", {})
    before = (out / LOCK_NAME).read_bytes()
    with pytest.raises(RunInUse, match=f"is in use by PID {os.getpid()}"):
        OutputFolder.check(out, command="train")
    assert (out / LOCK_NAME).read_bytes() == before  # the check changed nothing
    # an --overwrite too is told before its work (it did all of it, then failed at the clearing)
    with pytest.raises(RunInUse, match=f"is in use by PID {os.getpid()}"):
        OutputFolder.check(out, overwrite=True, command="train")
    folder.release()
    with pytest.raises(OutputRefused, match="folder holds earlier defect-fast output; pass --overwrite"):
        OutputFolder.check(out, command="train")
    OutputFolder.check(out, overwrite=True, command="train")  # free: may be replaced


def test_an_unfinished_output_folder_is_said_to_be_unfinished(tmp_path):
    """A predict killed partway left maps without scores.json; the next run was told only that
    the folder "holds earlier defect-fast output", as a finished one is."""
    out = tmp_path / "p"
    folder = OutputFolder.create(out, lock=True, command="predict")
    folder.reserve(["maps/a.png", "maps/b.png", "scores.json"])
    folder.write_bytes("maps/a.png", b"png")
    folder.release()  # as a kill -9 leaves it (the kernel drops the lock)
    with pytest.raises(OutputRefused, match=r"holds earlier defect-fast output \(unfinished: 2 of the 3 files it lists "
                                            r"are missing, as a command stopped before it wrote them leaves it, or "
                                            r"removed since\); pass --overwrite"):
        OutputFolder.check(out, command="predict")
    (out / "maps/b.png").write_bytes(b"png")
    with pytest.raises(OutputRefused, match=r"\(unfinished: 1 of the 3 files it lists is missing"):
        OutputFolder.check(out, command="predict")
    run = OutputFolder.create(tmp_path / "run", command="train", lock=True)
    run.reserve(["checkpoint.pt", "model.pt"])
    run.write_json("config.json", {})
    run.release()  # killed before its first checkpoint
    with pytest.raises(OutputRefused, match=r"holds earlier defect-fast output \(unfinished: 2 of the 3 files"):
        OutputFolder.check(run.path, command="train")
    (run.path / "model.pt").write_bytes(b"weights")  # a finished run: its checkpoint removed, still listed
    with pytest.raises(OutputRefused, match=r"holds earlier defect-fast output; pass --overwrite"):
        OutputFolder.check(run.path, command="train")
    for name in ("maps/b.png", "scores.json"):  # finished
        (out / name).write_bytes(b"x")
    with pytest.raises(OutputRefused, match=r"holds earlier defect-fast output; pass --overwrite"):
        OutputFolder.check(out, command="predict")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_the_in_use_check_does_not_wait_on_a_fifo_at_the_lock_file_s_name(tmp_path):
    """The check opened the lock file for reading: a FIFO there held the open for ever."""
    import threading

    out = tmp_path / "run"
    folder = OutputFolder.create(out, command="train")
    folder.write_json("config.json", {})
    os.mkfifo(out / LOCK_NAME)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(OutputRefused, OutputFolder.check, out,
                                                                  command="train")), daemon=True)
    t.start()
    t.join(timeout=20)
    assert done, "the check waited on the FIFO"


@pytest.mark.parametrize("existing", [False, True])
def test_a_start_whose_manifest_does_not_fit_on_the_disk_leaves_nothing(tmp_path, monkeypatch, existing):
    """A disk too full for the first manifest left the folder behind with its lock file (and then
    a start with another folder name, or the same after making room, found a folder of its)."""
    import errno

    out = tmp_path / "run"
    if existing:
        out.mkdir()  # an empty folder of the user's: it stays, empty

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / MANIFEST_NAME))

    monkeypatch.setattr(OutputFolder, "_write_manifest", full)
    with pytest.raises(OSError, match="No space left"):
        OutputFolder.create(out, lock=True, command="train")
    assert (list(out.iterdir()) == []) if existing else not out.exists()
    monkeypatch.undo()
    OutputFolder.create(out, lock=True, command="train").release()  # room made: the same start goes on


def test_a_file_written_to_in_place_while_it_is_loaded_gets_the_digest_of_what_was_loaded(tmp_path, monkeypatch):
    """The file's SHA-256 (a model's version in watch's journal and export's description) was taken,
    then the file loaded through the same handle: a copy written over it in place (cp, same inode)
    in between gave the first version's digest to the second version's weights."""
    import defect_fast.safety as safety
    from defect_fast.safety import load_file_with_digest, save_with_digest

    a, b = tmp_path / "model.pt", tmp_path / "b.pt"
    save_with_digest({"w": torch.zeros(3)}, a)
    save_with_digest({"w": torch.ones(3)}, b)
    real, calls = safety._sha256_of, []

    def hashed_then_rewritten(fh):
        sha = real(fh)
        if not calls:
            shutil.copyfile(b, a)  # in place: the open file is truncated and written again
        calls.append(sha)
        return sha

    monkeypatch.setattr(safety, "_sha256_of", hashed_then_rewritten)
    monkeypatch.setattr(safety, "_LOAD_PAUSE", 0.0)
    obj, sha = load_file_with_digest(a)
    assert torch.equal(obj["w"], torch.ones(3)) and sha == hashlib.sha256(b.read_bytes()).hexdigest()
    assert len(calls) == 2  # read again once
    # a copy half written when it is loaded reads as a damaged file: read again too, once it is whole
    save_with_digest({"w": torch.zeros(3)}, a)
    calls.clear()

    def hashed_then_cut(fh):
        sha = real(fh)
        if not calls:
            with open(a, "r+b") as f:  # in place, as a cp that has written half the file so far
                f.truncate(a.stat().st_size // 2)
        elif len(calls) == 1:
            shutil.copyfile(b, a)  # (the copy done: whole by the next read)
        calls.append(sha)
        return sha

    monkeypatch.setattr(safety, "_sha256_of", hashed_then_cut)
    obj, sha = load_file_with_digest(a)
    assert torch.equal(obj["w"], torch.ones(3)) and sha == hashlib.sha256(b.read_bytes()).hexdigest()
    assert len(calls) == 3  # cut short, then written during the second read: whole at the third

    def always_rewritten(fh):
        sha = real(fh)
        os.utime(a, ns=(len(calls), len(calls)))
        calls.append(sha)
        return sha

    monkeypatch.setattr(safety, "_sha256_of", always_rewritten)
    with pytest.raises(safety.DigestError, match=r"model\.pt: changed while it was read, 3 times .*try again once "
                                                 r"it is complete$"):
        load_file_with_digest(a)
    # cut short by a writer at work, then still short at the next read: a copy not done, not a damaged file
    save_with_digest({"w": torch.zeros(3)}, a)
    calls.clear()

    def cut_once(fh):
        sha = real(fh)
        if not calls:
            with open(a, "r+b") as f:
                f.truncate(a.stat().st_size // 2)
        calls.append(sha)
        return sha

    monkeypatch.setattr(safety, "_sha256_of", cut_once)
    with pytest.raises(safety.DigestError, match=r"model\.pt: changed while it was read"):
        load_file_with_digest(a)
    assert len(calls) == 2
    # a damaged file that nothing writes is said as such at once
    calls.clear()
    monkeypatch.setattr(safety, "_sha256_of", lambda fh: (calls.append(1), real(fh))[1])
    with open(a, "r+b") as f:
        f.truncate(a.stat().st_size // 2)
    with pytest.raises(safety.DigestError, match=r"model\.pt: not a defect_fast model or checkpoint file \(not a torch "
                                                 r"archive: truncated, a copy still being written"):
        load_file_with_digest(a)
    assert len(calls) == 1


def test_control_characters_in_messages_are_written_as_escapes():
    from defect_fast.safety import one_line, printable

    assert printable("a\x1b[2Jb\rc\x7f\x9b\td\ne é") == "a\\x1b[2Jb\\x0dc\\x7f\\x9b\td\ne é"
    # a carriage return no longer splits a message (it read as two lines joined by "; ")
    assert one_line("img\r.png: not an image\n  second") == "img\\x0d.png: not an image second"
    assert one_line("cl.exe failed:\r\n  line 2\r\n") == "cl.exe failed: line 2"  # a Windows tool's line ends
    assert printable("a\nb\tc", newlines=False) == "a\\x0ab\tc"



def test_an_output_folder_writes_through_no_symbolic_link_of_its_own_folders(tmp_path):
    """An earlier output's maps/ replaced by a link to another folder: predict --overwrite (or a
    resume) wrote the new maps there, outside the output folder."""
    out = OutputFolder.create(tmp_path / "pred")
    out.mkdir("maps")
    out.write_bytes("maps/a.png", b"map")
    (tmp_path / "pred" / "maps" / "a.png").unlink()
    (tmp_path / "pred" / "maps").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pred" / "maps").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputRefused, match="maps: a symbolic link where defect-fast writes a folder of its own"):
        out.mkdir("maps")
    with pytest.raises(OutputRefused, match="maps: a symbolic link where defect-fast writes a folder of its own"):
        out.write_bytes("maps/a.png", b"map")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_file_nested_too_deeply_is_refused_in_one_line(tmp_path):
    """A model file holding a dict nested thousands deep (no file this tool writes) ended in a
    RecursionError in the digest check: an "internal error" with a traceback."""
    import sys

    from defect_fast.safety import DIGEST_KEY

    state = _state()
    deep = inner = {}
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    state["note"] = deep
    state[DIGEST_KEY] = {"algorithm": "sha256", "hex": "0" * 64}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30000)
    try:
        torch.save(state, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(DigestError, match="nested too deeply to be a file defect-fast wrote"):
        load_with_digest(tmp_path / "deep.pt")


def test_a_system_without_posix_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    """Windows has no fcntl: every command that writes a folder ended in "internal error
    (ModuleNotFoundError) ... this is a bug"."""
    from defect_fast.watch import DropFolderLock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl: ImportError
    said = f"{tmp_path}: not locked: this system has no POSIX file locks (fcntl)"
    for lock in (lambda: RunLock(tmp_path).acquire(), lambda: RunLock(tmp_path).check_free(),
                 lambda: DropFolderLock(tmp_path, False, print).acquire()):
        with pytest.raises(OutputRefused, match=re.escape(said) + r".* need a POSIX system \(Linux, macOS\)$"):
            lock()
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Python before 3.13 on Windows has no os.fchmod: Detector.save and every atomic write failed."""
    monkeypatch.delattr(os, "fchmod")
    atomic_write_text(tmp_path / "a.txt", "kept\n")
    assert (tmp_path / "a.txt").read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_single_file_write_removes_the_temporaries_killed_writes_of_it_left(tmp_path):
    """A save killed midway (kill -9) leaves a hidden temporary of the file's size beside it; every
    later write left them there, one more a crash."""
    import time

    from defect_fast import safety as safety_mod

    old = time.time() - 2 * safety_mod.STALE_TEMPORARY_SECONDS
    left = tmp_path / ".model.pt.k3x_9qzw.tmp"  # a write of model.pt killed an hour and more ago
    kept = {tmp_path / ".model.pt.a1b2c3d4.tmp": old + safety_mod.STALE_TEMPORARY_SECONDS * 1.9,  # being written
            tmp_path / ".other.pt.k3x_9qzw.tmp": old,  # another file's
            tmp_path / ".model.pt.notes.tmp": old,  # not a temporary's name
            tmp_path / "model.pt.k3x_9qzw.tmp": old}
    for p, t in [(left, old), *kept.items()]:
        p.write_bytes(b"partial")
        os.utime(p, (t, t))
    with atomic_open(tmp_path / "model.pt", "wb", unlisted=True) as fh:
        fh.write(b"whole")
    assert not left.exists() and all(p.read_bytes() == b"partial" for p in kept)
    assert (tmp_path / "model.pt").read_bytes() == b"whole"
    left.write_bytes(b"partial")
    os.utime(left, (old, old))
    with atomic_open(tmp_path / "model.pt", "wb") as fh:  # an output folder's file: its folder cleans up
        fh.write(b"again")
    assert left.exists()
