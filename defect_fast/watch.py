"""A drop-folder service: every image a camera drops gets exactly one pass/fail result.

:func:`watch` runs a predict function on the images that arrive in ``IN_DIR`` and keeps, in
``OUT_DIR``::

    results.jsonl          the journal: one JSON line per image (the record of what is done); its
                           "regions" are :func:`~defect_fast.calibration.defect_regions`, boxes
                           x0, y0, x1, y1 inclusive, in the photo's pixels: the
                           :data:`MAX_REGIONS` of highest peak, "regions_total" counting them all
                           when there are more. They locate the defect on a failed image;
                           the verdict ("result") is the image threshold's, and a passing
                           image lists regions too (the pixel threshold is set for 0.1 % of
                           defect-free pixels, not for the verdict; ``--threshold`` and
                           ``--far`` move the verdict only, and a failed image may list none)
    maps/<name>_map.png    grey anomaly map per image, at the image's own size (``maps``,
                           ``--maps``: "all", or "failed" images only, or "none"; a line without
                           them names none, "map" and "overlay" null)
    overlays/<name>_overlay.png   the map over the image, at its own size (as its map)
    rejected/              bad files, moved here (never deleted); their reason is in the journal;
                           blank frames (one colour throughout: a camera fault) too, never judged
    judged/pass/, judged/fail/   with ``move_judged`` (``--move-judged``) only: each judged image,
                           moved here by its verdict once its journal line is written (the line's
                           "moved_to"; ``<name>_<12 hex digits>`` as its map is named, with
                           its extension; images judged before without the option stay)
    status.json            last image, counts, images/s, threshold and where it came from, model,
                           the service's "pid" and "updated" time (rewritten atomically after each
                           batch, and when idle at the whole-folder listings once
                           :data:`STATUS_EVERY` seconds have passed: at most 30 s + --poll apart,
                           or 30 s + --rescan with file-system events; a dashboard tells a dead or
                           hung service by an "updated" older than that, with a margin)

``<name>`` is the image's path relative to ``IN_DIR`` ("/" -> "__", no extension; one longer
than :data:`MAX_STEM_BYTES` bytes shortened, with 8 hex digits of the whole) plus the first 12
hex digits of its content's SHA-256, so a redo writes the same files.

When a file counts as complete: its name is not a temporary one (dotfiles, ``*.tmp``, ``*.part``,
``*.partial``, ``*.crdownload``, ``*.download``, ``*.swp``, ``*~``), it has an image extension, and
its size, modification and change times stayed the same for ``settle`` seconds across two scans (slow
copies keep changing; write-then-rename writers show the final name only when it is complete). A
writer that pauses longer than ``settle`` in the middle of a file is taken as done; a file that
then does not decode (a truncated photo), or decodes but has not been written to its end (a PNG
before its IEND chunk; a PNG or JPEG whose writer set its full size first, whose rest is zeros:
:func:`~defect_fast.data.io.unfinished_image`), waits, unchanged, ``max(30, 10 * settle)`` seconds more
(as an empty file does; not with ``--once``) before it is rejected and moved to ``rejected/``: a
writer that goes on within that time changes it, and it is judged once complete. A file a writer
changes while it is copied to ``rejected/`` across file systems stays where it is. A file that cannot
be opened for reading (permissions) is skipped, with a message, until it changes; an entry that
cannot even be looked at (a link in a loop or into a folder the service may not read, a
sub-folder it may not list) is skipped with a message, once. A photo too large to decode in the
memory at hand is rejected like a bad file. Arrival is noticed
through the ``watchdog`` package when it is installed (inotify and friends), with a scan every
``poll_interval`` seconds as the fallback (see below for what a scan looks at).

Exactly once, also across ``kill -9``: a result is done when its journal line is. Per image the
map and overlay are written to temporary names, fsynced and renamed into place *before* its
journal line is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced. At
start the journal is read back (a torn last line, which only a crash in the middle of that write
can leave, is cut off, and so is a last line that is no record though it ends in its newline),
the set of done (path, SHA-256) pairs of the files in ``IN_DIR`` is rebuilt from it (read one
line at a time: what the service holds grows with the folder, and the bad files whose move
failed, not with the journal; a file is taken as gone only where a listing could look, and a
folder now on another device (a share unmounted, or mounted again) has what was judged of its
files read again from the journal; one made again on the same device is a new folder), and leftover
temporary files are removed. An image whose line is missing is redone and overwrites its own map
and overlay; one whose line exists is never redone while it stays in the folder (rewritten with
the bytes it was last judged with, or touched, it is the same image). A file that left the folder (taken away by
the line, or moved to ``rejected/``) and comes again under its name is a new arrival, judged
again with a line of its own: a camera that names every frame alike, or counts from 0 again
after a reboot, sends the same name, and a blank frame even the same bytes. Bad files: the journal line (with the reason)
comes first, then the move to ``rejected/``, and so for a judged image's move to ``judged/`` with
``move_judged``; a move cut short by a crash is completed at start (whatever that start's options:
the line named where the file goes).
A file is judged as it stands once settled: one rewritten sooner than ``settle`` (and the time the
service takes to reach it) after its last version is judged at the version that stays; one changed
after it settled, before it was judged (a whole frame, of other bytes), is said in a line and
counted in ``status.json`` (``replaced_before_judged``, this session's), so a camera that names
every frame alike must leave each frame longer than that, or give each a name of its own.
One process per ``OUT_DIR`` (:class:`defect_fast.safety.RunLock`, an ``flock`` released by the
kernel when the process dies). Watches of one ``IN_DIR`` with results folders of their own may run
side by side, unless one of them moves judged images away (``move_judged``): each image would be
judged and recorded by only one of them, and the second start is refused (:class:`DropFolderLock`).
Side by side, each records every file, bad ones too: a bad file is left in ``IN_DIR`` (its line's
"left" says why, and no "rejected_to"; remove it by hand once every watch has its line), as one
moved into a watch's ``rejected/`` is not there for the other; so is a judged image that
``move_judged`` would move while a watch of its sub-folder, or of a folder above, runs. Who else
watches is read from Linux's ``/proc/locks``: any ``flock`` on those folders counts (a watch of a
folder above, recursive or not; an uploader's ``flock DIR rsync ...``), and elsewhere the files are
moved as ever.

SIGTERM and SIGINT (Ctrl-C) finish the image in hand (the rest of its batch is left for the next
start), write the status and return; during a start's reading of the journal, at once (the
status's "counts" null: not all of it was read).

Judged images stay in ``IN_DIR`` unless ``move_judged`` moves them to ``OUT_DIR/judged/``. With file-system events, a round
looks only at the paths the events name and at the files waiting to settle; the whole folder is
listed at start, when more than ``MAX_EVENT_PATHS`` paths arrive between two rounds, and every
``rescan_interval`` seconds (a safety net for missed events: a file whose event was lost waits at
most that long). Without events (no ``watchdog``, ``--once``, or the system's watch limit reached)
every round lists and stats every file. A listing's cost, and the memory of what was judged, grow
with the files left in the folder (50,000 files: a listing of 874 ms, in which nothing is judged;
``benchmarks/bench_watch_scan.py``): a line should move judged images out (``move_judged``) or archive
them elsewhere (their journal lines name them). The outputs grow with every image too (a map and
an overlay an image, unless ``--maps failed`` or ``none``; a journal line, which a start reads
through; and the moved images): a line starts a new ``OUT_DIR`` now and then, with
``move_judged`` (images left in ``IN_DIR`` would be judged again into the new one).

Command line (:func:`add_parser`, :func:`command`)::

    defect-fast watch RUN IN_DIR --out OUT_DIR [--once] [--batch-size 8] [--poll 1] [--rescan 60] [--settle S]
                      [--threshold T | --far RATE] [--recursive] [--move-judged] [--maps all|failed|none]
                      [--device auto]

``OUT_DIR`` is an output folder with a manifest (:class:`defect_fast.safety.OutputFolder`): new,
empty, or one an earlier ``watch`` wrote (its journal is resumed); any other folder is refused, and
``OUT_DIR`` may not overlap ``IN_DIR`` or the run (:func:`watch` itself, for embedding, refuses a
non-empty folder that holds no journal of its own). The image threshold is the model file's
(:func:`defect_fast.calibration.stored_thresholds`) unless ``--threshold`` gives one or ``--far``
asks for another false-alarm rate (set from the run's held-back scores).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import signal
import stat as stat_mod
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch

from .calibration import ModelInfo, defect_regions, threshold_text
from .data.io import (IMAGE_EXTENSIONS, DataError, blank_images, error_kind, few_levels_message, note_once,
                      outside_proportions, read_image_at_both_sizes)
from .maps import resize_map
from .safety import (LOCK_NAME, MANIFEST_NAME, OutputFolder, OutputRefused, RunInUse, RunLock, UserError,
                     check_out_not_overlapping,
                     far_errors, file_sha256, link_on_the_way, posix_locks, printable, short_stem, stat_signature)

__all__ = ["IGNORED_SUFFIXES", "DropFolderLock", "Journal", "WatchError", "add_parser", "command", "is_temporary_name",
           "output_name", "watch"]

JOURNAL = "results.jsonl"
JOURNAL_START = b'{"image":'
STATUS = "status.json"
#: At least this many seconds between two writes of status.json by an idle service (at its
#: whole-folder listings: every --rescan seconds with file-system events, else every --poll): its
#: "updated" time tells an idle service from a dead or hung one, and its "pid" which process to
#: look for.
STATUS_EVERY = 30.0
MAPS, OVERLAYS, REJECTED = "maps", "overlays", "rejected"
#: Where ``move_judged`` (``--move-judged``) puts a judged image, by its verdict.
JUDGED_ROOT = "judged"
JUDGED = {"pass": f"{JUDGED_ROOT}/pass", "fail": f"{JUDGED_ROOT}/fail"}
TMP_PREFIX = ".tmp-"
#: :attr:`_State.lock_table` before this batch read ``/proc/locks`` (:func:`_watched_by_others`).
_UNREAD: Any = object()
#: A journal line's "left" where its file was not moved out of the folder as it would have been (to
#: rejected/, or with ``move_judged`` to judged/): another watch of the folder judges it too.
LEFT_FOR = ("{} holds this folder or one above it, as a second watch does, and may judge the file too, so it stays "
            "here for it; remove it by hand once every watch that judges it has its line")
#: Seconds between listings of the whole drop folder while file-system events arrive (``--rescan``).
RESCAN_INTERVAL = 60.0
#: Event paths kept between two rounds; beyond that the folder is listed instead.
MAX_EVENT_PATHS = 10_000
#: Shortest wait (s) between looks at a file still settling.
MIN_WAIT = 0.05
#: Seconds (at least; ``10 * settle`` when longer) that an empty file, or one that does not decode,
#: must stay unchanged before it is judged as it is: a writer that stalled may still be at it.
MIN_GRACE = 30.0
#: Name endings (lower case) of files still being written; never picked up.
IGNORED_SUFFIXES: tuple[str, ...] = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")

PredictFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


class WatchError(UserError, RuntimeError):
    """The service cannot start (missing drop folder, no threshold): one line, exit status 2."""


def is_temporary_name(name: str) -> bool:
    """Whether a file name marks a file still being written (or hidden): never processed."""
    low = name.lower()
    return name.startswith(".") or low.endswith(IGNORED_SUFFIXES)


#: Most regions a journal line lists (those of highest peak; a noisy map has thousands).
MAX_REGIONS = 50

#: Which judged images get a map and an overlay (``--maps``): every one, the failed ones, none.
MAPS_FOR = ("all", "failed", "none")

#: The journal's reason for a blank frame (:func:`~defect_fast.data.io.blank_images`, at the
#: model's size, as predict and the readers check it): a camera fault, with nothing on it to judge;
#: a reconstruction reproduces a flat frame near the training images' grey level, and its score
#: would pass it.
BLANK_REASON = "a blank frame, one colour throughout (a failed exposure, a covered lens?): nothing to inspect"
#: Standard deviation (grey levels) of a photo, blank at the model's size, above which its reason
#: adds that the photo itself varies (a weave finer than the model resolves): more than a dark
#: frame's sensor noise, a grey level or two.
DETAIL_SPREAD = 4.0

#: Longest stem (in UTF-8 bytes) an output or rejected file's name keeps: with the temporary
#: name's prefix (".tmp-<pid>-") and the longest ending ("_<12 hex>_overlay.png") it stays well
#: under the 255 bytes most file systems allow in one name.
MAX_STEM_BYTES = 160


def _flat_name(key: str) -> tuple[str, str]:
    """(an image's relative path without its extension, "/" -> "__", shortened past
    :data:`MAX_STEM_BYTES` by :func:`~defect_fast.safety.short_stem`; the extension, with its dot)."""
    stem = key.rsplit(".", 1)[0] if "." in Path(key).name else key
    return short_stem(stem.replace("/", "__"), MAX_STEM_BYTES), key[len(stem):]


def output_name(key: str, sha256: str) -> str:
    """Stem of an image's outputs: its relative path without extension, "/" -> "__", + 12 hex digits
    (a path longer than :data:`MAX_STEM_BYTES` shortened by :func:`~defect_fast.safety.short_stem`)."""
    return f"{_flat_name(key)[0]}_{sha256[:12]}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def _atomic_write(final: Path, write: Callable[[Path], None], sync: bool = True) -> None:
    """write(tmp) then rename over ``final``; tmp lives beside it and keeps its extension."""
    tmp = final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")
    try:
        write(tmp)
        if sync:
            _fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


class Journal:
    """The append-only results journal (one JSON object per line).

    Opening it cuts off a torn last line (or completes it with its newline when it is a whole
    JSON object; a last line that ends with its newline but is no record, which a power loss can
    leave when a long line's earlier block was not written, is cut off as well); :meth:`read`
    then gives every record back, one at a time, with what a restart needs of it
    (:data:`KEPT_FIELDS`).

    Attributes:
        repaired: a one-line description of what was repaired at opening, and of the lines
            :meth:`read` skipped once it has run ("" when nothing).
    """

    #: What a restart reads back of each line: the done set, the counts, the unfinished moves of
    #: rejected (and, with ``move_judged``, judged) files and the note on earlier thresholds (with the verdicts this one would change).
    #: A line's regions and file names are not kept, and no line is kept after it is read: a
    #: journal of millions of lines must still open in little memory.
    KEPT_FIELDS = ("image", "sha256", "size", "mtime_ns", "ctime_ns", "result", "rejected_to", "moved_to",
                   "threshold", "model_version", "score")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.repaired = ""
        if self.path.is_symlink():  # (its repair cut, and its lines went into, the file it pointed at)
            raise WatchError(f"{self.path}: a symbolic link where watch keeps its journal; remove it or choose another "
                             "results folder")
        if self.path.exists():
            with open(self.path, "r+b") as f:
                self.repaired = self._repair_tail(f)
                if self.repaired:
                    f.flush()
                    os.fsync(f.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def read(self) -> Iterator[dict[str, Any]]:
        """The records written so far, in order, with :data:`KEPT_FIELDS` only, read one line at a
        time (the file may be far larger than memory should hold); unreadable lines are skipped,
        and counted in :attr:`repaired` once the last is read."""
        bad = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = self._record(line)
                if rec is None:
                    bad += 1
                    continue
                yield {k: rec[k] for k in self.KEPT_FIELDS if k in rec}
        if bad:
            self.repaired = "; ".join(filter(None, (self.repaired, f"skipped {bad} unreadable line(s)")))

    @staticmethod
    def _record(line: bytes) -> dict[str, Any] | None:
        """The record of one line (None: not JSON, or not a record as watch writes one: a restart
        moves and removes files by the paths a line names, and a line edited to name ``../`` or
        an absolute path had it delete or move files anywhere)."""
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not (isinstance(rec, dict) and _inside(rec.get("image")) and isinstance(rec.get("sha256"), str)):
            return None
        if rec.get("result", "rejected") not in ("pass", "fail", "rejected"):
            return None
        for key, kinds in (("size", int), ("mtime_ns", int), ("ctime_ns", int), ("threshold", (int, float)),
                           ("score", (int, float))):  # (a threshold given as null stopped every start)
            if key in rec and (not isinstance(rec[key], kinds) or isinstance(rec[key], bool)):
                return None
        for key in ("threshold", "score"):  # read as floats: an integer of 400 digits overflowed
            if isinstance(rec.get(key), int) and abs(rec[key]) > sys.float_info.max:
                return None
        for key, folders in (("rejected_to", (REJECTED,)), ("moved_to", tuple(JUDGED.values()))):
            to = rec.get(key)
            if to is not None and not (isinstance(to, str) and to.rpartition("/")[0] in folders
                                       and _inside(to.rpartition("/")[2]) and "/" not in to.rpartition("/")[2]):
                return None
        return rec

    def _repair_tail(self, f) -> str:
        """Repair the end of the open file ``f`` (see the class docstring); what was done, or ""."""
        size = f.seek(0, os.SEEK_END)
        # the last two line starts: read back from the end in blocks until two newlines are seen
        block, pos, tail = 1 << 16, size, b""
        while pos > 0 and tail.count(b"\n") < (2 if tail.endswith(b"\n") else 1):
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        cut = tail.rfind(b"\n") + 1
        last = tail[cut:]
        if last:  # no newline at the end: a whole record gets its newline, anything else is cut
            rec = self._record(last)
            if rec is not None:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                return "completed the newline of its last line"
            f.truncate(pos + cut)
            return f"cut off a torn last line ({len(last)} bytes)"
        if not tail:
            return ""
        start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
        line = tail[start:]
        if line.strip() and self._record(line) is None and (start > 0 or pos == 0):
            f.truncate(pos + start)
            return f"cut off an unreadable last line ({len(line)} bytes)"
        return ""

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line: a single write on the O_APPEND descriptor, then fsync."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a full disk: leave a torn line for the next start to cut
            raise OSError(errno.ENOSPC, f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._fd)  # not kept in memory: a service running for months would hold them all

    def close(self) -> None:
        os.close(self._fd)


#: A file's signature: (size, mtime_ns, ctime_ns). The change time cannot be set by a copy that
#: keeps the modification time (``cp -p``, archives), so a replacement of the same size and
#: modification time is still seen. Journal lines written before it was recorded give (size, mtime_ns).
Signature = tuple[int, ...]


def _same_signature(done: Signature | None, sig: Signature) -> bool:
    """Whether ``sig`` is the signature recorded as judged (an older record without ctime_ns matches
    on size and mtime_ns)."""
    return done is not None and tuple(sig[:len(done)]) == tuple(done)


@dataclass
class _Pending:
    signature: Signature
    since: float


@dataclass
class _Counts:
    passed: int = 0
    failed: int = 0
    rejected: int = 0

    def add(self, result: str) -> None:
        if result == "pass":
            self.passed += 1
        elif result == "fail":
            self.failed += 1
        else:
            self.rejected += 1

    def as_dict(self) -> dict[str, int]:
        return {"pass": self.passed, "fail": self.failed, "rejected": self.rejected,
                "total": self.passed + self.failed + self.rejected}


@dataclass
class _State:
    info: ModelInfo
    threshold: float
    in_dir: Path
    out: Path
    journal: Journal
    threshold_source: str | None = None  # what set the threshold (status.json)
    # what was judged of the files in IN_DIR: key -> the content (sha256) last judged under that name,
    # and its signature; a key leaves with its file (a file sent again after is a new arrival), so
    # that memory follows the folder, not the journal
    done: dict[str, str] = field(default_factory=dict)
    done_sig: dict[str, Signature] = field(default_factory=dict)
    # (device, inode) of IN_DIR ("") and of its sub-folders as last listed: a folder now on another
    # device (un)mounted since has its done set read again from the journal, not its files taken as gone
    folder_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    totals: _Counts = field(default_factory=_Counts)
    session: _Counts = field(default_factory=_Counts)
    busy_s: float = 0.0
    last: dict[str, Any] | None = None
    rate: float = 0.0
    started: str = field(default_factory=_now_iso)
    warned_ext: set[str] = field(default_factory=set)
    unreadable: dict[str, Signature] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # entries that cannot be looked at -> why (named once)
    # a file that did not decode waits this long unchanged before it is rejected (a stalled writer)
    grace: float = 0.0
    undecodable: dict[str, tuple[Signature, float]] = field(default_factory=dict)  # key -> (signature, first seen)
    few_levels_said: bool = False  # a 16-bit image of few grey levels is named once a session
    notes_said: set[str] = field(default_factory=set)  # the kinds of note_once said this session
    own_lock: tuple[int, int, int] | None = None  # the folder of this watch's DropFolderLock (by it, or its caller)
    lock_table: Any = _UNREAD  # /proc/locks as this batch read it (_watched_by_others)
    proportions_said: bool = False  # an image far from the training images' proportions too
    # names in rejected/ (and judged/) the journal gives to files whose move failed (the name is theirs:
    # another file moved to it would be taken at a restart for the first's completed copy); a moved
    # file holds its own
    moved_names: set[str] = field(default_factory=set)
    # candidates in IN_DIR: key -> (path, size, mtime_ns, ctime_ns)
    known: dict[str, tuple[Path, int, int, int]] = field(default_factory=dict)
    # rejected/ (judged/) name -> the count its next copy tries first: one frame name's many bad copies
    # (a covered lens, all alike) tried every count from 2 again, each a look at the disk
    moved_count: dict[str, int] = field(default_factory=dict)
    move_judged: bool = False  # judged images go to OUT/judged/pass|fail/ after their journal line
    maps: str = "all"  # the judged images that get a map and an overlay (MAPS_FOR)
    status_at: float = -math.inf  # time.monotonic() of the last status.json
    status_failed: bool = False  # the idle rewrite of status.json failed (said once until it works again)
    replaced: int = 0  # whole frames changed after they settled, before they were judged (this session)


def _lock(out: Path) -> RunLock:
    """The folder's :class:`RunLock`; :class:`~defect_fast.safety.RunInUse` names the PID holding it."""
    return RunLock(out).acquire()


class DropFolderLock:
    """An ``flock`` on the drop folder itself (nothing is written there), held while a watch runs:
    shared by watches that leave judged images where they are, exclusive for one that moves them
    (``move_judged``). Two watches with their own results folders may judge one folder (two models,
    say), but a watch that moves judged images away takes them from under any other, and the images
    would each be judged by one of the two and recorded in one results folder only: that second
    start is refused (:class:`~defect_fast.safety.RunInUse`, naming the other process where Linux's
    ``/proc/locks`` shows it). The kernel drops the lock when its process ends.

    The lock is on the folder as it is at start, not on its sub-folders (a watch of ``IN_DIR/a``
    beside a ``--recursive`` one of ``IN_DIR`` is not refused: each leaves the files the other
    judges too where they are, :func:`_watched_by_others`) nor on a folder made again in its
    place, and it holds among the processes of one machine: on a network share (NFS, SMB) Linux
    locks a folder for this machine only, so watches on two machines are not seen; where the
    file system refuses the lock, the watch goes on without it and says so."""

    def __init__(self, folder: Path, move_judged: bool, log: Callable[[str], None]):
        self.folder, self.move_judged, self.log = Path(folder), move_judged, log
        self._fd: int | None = None
        self._file: tuple[int, int, int] | None = None

    def acquire(self) -> "DropFolderLock":
        fcntl = posix_locks(self.folder)

        def unlocked(exc: OSError) -> "DropFolderLock":
            self.log(f"{self.folder}: not locked ({exc.strerror or exc}), so a second watch of it would not be refused")
            return self

        try:
            fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:  # e.g. a folder only listable, not readable: the listing says what is wrong
            return unlocked(exc)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.move_judged else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = _flock_holders(fd)
            os.close(fd)
            who = f"PID {pids[0]}" if len(pids) == 1 else \
                f"PIDs {', '.join(map(str, pids))}" if pids else "another watch"
            if self.move_judged:
                raise RunInUse(f"{self.folder}: watched by {who}; --move-judged would take the images it judges away "
                               "from it, so each would be judged and recorded by one of the two; stop it first, or "
                               "watch without --move-judged", pids[0] if len(pids) == 1 else None) from None
            raise RunInUse(f"{self.folder}: watched by {who} with --move-judged, which takes each image it judges "
                           "away from the folder, so each would be judged and recorded by one of the two; stop it "
                           "first", pids[0] if len(pids) == 1 else None) from None
        except OSError as exc:  # a share that cannot lock folders
            os.close(fd)
            return unlocked(exc)
        self._fd, self._file = fd, _lock_file_id(os.fstat(fd))
        with _HELD_LOCK:
            _HELD[self._file] = _HELD.get(self._file, 0) + 1
        return self

    @property
    def file(self) -> tuple[int, int, int] | None:
        """The folder it holds the lock on (:func:`_lock_file_id`); None when it holds none (not
        acquired, released, or refused by the file system)."""
        return self._file if self._fd is not None else None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops an flock with the last descriptor of its open file
            self._fd = None
            with _HELD_LOCK:
                _HELD[self._file] -= 1
                if not _HELD[self._file]:
                    del _HELD[self._file]


#: The :class:`DropFolderLock` s this process holds, by their folder (:func:`_lock_file_id`): how
#: many. A watch tells its own lock from another watch's in ``/proc/locks`` by them, not by its PID
#: (the file names processes as the namespace of its mount numbers them, and two watches of one
#: process by one PID).
_HELD: dict[tuple[int, int, int], int] = {}
_HELD_LOCK = threading.Lock()


def _lock_file_id(s: os.stat_result) -> tuple[int, int, int]:
    """A file as ``/proc/locks`` names it: (device major, device minor, inode)."""
    return os.major(s.st_dev), os.minor(s.st_dev), s.st_ino


def held_drop_lock(folder: Path) -> tuple[int, int, int] | None:
    """The folder (:func:`_lock_file_id`) of the :class:`DropFolderLock` this process holds on
    ``folder``; None where it holds none (a caller of :func:`watch` with ``drop_lock`` False, as the
    command line is, holds one)."""
    try:
        here = _lock_file_id(os.stat(folder))
    except OSError:
        return None
    with _HELD_LOCK:
        return here if _HELD.get(here, 0) > 0 else None


def _flock_holders(fd: int) -> list[int]:
    """The PIDs that hold an ``flock`` on the file open as ``fd``, other than this process, as
    Linux's ``/proc/locks`` lists them (empty where it cannot be read)."""
    table = _flock_table() or {}
    return sorted({pid for pid in table.get(_lock_file_id(os.fstat(fd)), ()) if pid not in (0, os.getpid())})


def _flock_table() -> dict[tuple[int, int, int], list[int]] | None:
    """Every ``flock`` held, as Linux's ``/proc/locks`` lists them: file (:func:`_lock_file_id`) ->
    the PID of each lock on it (0: one in another PID namespace, a container sharing the folder);
    None where it cannot be read."""
    table: dict[tuple[int, int, int], list[int]] = {}
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" first
                parts = line.split()
                if len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                major, minor, inode = parts[5].split(":")
                table.setdefault((int(major, 16), int(minor, 16), int(inode)), []).append(int(parts[4]))
    except (OSError, ValueError):
        return None
    return table


def _watched_by_others(st: "_State", key: str) -> str | None:
    """Who else may judge ``key``'s file, as :class:`DropFolderLock` shows it: a lock on IN_DIR
    besides this watch's own, or on a folder above it (a watch there, recursive or not: the lock
    does not tell), by its path or its real path, or on a sub-folder on the way to the file (a watch
    of that sub-folder). "PID n", "PIDs n, m" or "another watch or process" (of this process, or of
    another PID namespace); None where none does, or where Linux's ``/proc/locks`` cannot tell. Moved away, the
    file would not be there for such a watch. (Any ``flock`` on those folders counts: one an
    uploader takes, ``flock DIR rsync ...``, too.)"""
    if st.lock_table is _UNREAD:  # read once a batch
        st.lock_table = _flock_table()
    table = st.lock_table
    if not table:
        return None
    parts = key.split("/")
    folders = [*Path(os.path.abspath(st.in_dir)).parents, *Path(os.path.realpath(st.in_dir)).parents,
               *(st.in_dir.joinpath(*parts[:i]) for i in range(len(parts)))]
    seen: set[tuple[int, int, int]] = set()
    others, pids = 0, set()
    for folder in folders:
        try:
            file = _lock_file_id(os.stat(folder))
        except OSError:
            continue
        if file in seen:
            continue
        seen.add(file)
        held = table.get(file, [])
        mine = 1 if file == st.own_lock else 0  # (the folder locked: IN_DIR as it was at start)
        if len(held) > mine:
            others += len(held) - mine
            pids.update(held)
    if not others:
        return None
    named = sorted(p for p in pids if p not in (0, os.getpid()))
    return "another watch or process" if not named else f"PID {named[0]}" if len(named) == 1 else \
        f"PIDs {', '.join(map(str, named))}"


def _print_line(msg: str) -> None:
    """A log line on standard output, now: a file name's control characters, newline too, as
    escapes (one held a terminal's escape sequences, or forged a line of its own)."""
    print(printable(msg, newlines=False), flush=True)


def _signature(path: Path) -> Signature:
    return stat_signature(os.stat(path))


def _move(src: Path, dest: Path, sig: Signature | None = None) -> None:
    """Rename, or copy + fsync + rename + unlink across file systems (never loses the file). With
    ``sig`` (size, mtime_ns, ctime_ns as judged), a file that no longer has it is left where it is
    (an OSError): one a camera wrote again under its name after it was read is a new frame, not
    judged yet, not to be moved under the first one's line; and a copy is put in place and the
    source removed only when the source still has it after the copy: a file a writer went on with
    is not cut off in the copy while the rest goes into the removed file."""
    if sig is not None and not _same_signature(sig, _signature(src)):
        raise OSError(errno.EBUSY, "it changed since it was read (written again under its name)", str(src))
    try:
        os.replace(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise

    def copy(tmp: Path) -> None:
        shutil.copy2(src, tmp)
        if sig is not None and not _same_signature(sig, _signature(src)):
            raise OSError(errno.EBUSY, "it changed while it was copied (a writer is still at it)", str(src))

    _atomic_write(dest, copy)
    _fsync_path(dest.parent, directory=True)  # the copy's name is on disk before the source goes (a power cut)
    src.unlink()


def _mark_done(st: _State, key: str, sha: str, sig: Signature | None) -> None:
    st.done[key] = sha
    if sig is not None:
        st.done_sig[key] = sig
    else:
        st.done_sig.pop(key, None)


def _forget(st: _State, keys: Iterable[str]) -> None:
    """Drop what was judged under ``keys``, whose files left IN_DIR: one sent again is judged again."""
    for key in keys:
        st.done.pop(key, None)
        st.done_sig.pop(key, None)


class _JudgedApart:
    """A note when earlier pass/fail results of a resumed journal were judged at another image
    threshold or by another model file than this session's ("" when none were): they stand as
    they were (an image already judged is not judged again), so a line audit should know.
    Gathered one record at a time (:meth:`add`; the journal is read once), said by :meth:`note`."""

    def __init__(self, threshold: float, version: str):
        self.threshold, self.version = threshold, version
        self.other = self.same = self.flips = 0
        self.seen: set[tuple[float, str]] = set()  # the four smallest: three are named, "and others" after

    def add(self, r: Mapping[str, Any]) -> None:
        if r.get("result") not in ("pass", "fail") or (r.get("threshold") == self.threshold
                                                       and r.get("model_version") == self.version):
            return
        self.other += 1
        if "threshold" in r:
            self.seen.add((float(r["threshold"]), str(r.get("model_version"))))
            if len(self.seen) > 4:
                self.seen.remove(max(self.seen))
        # whose verdict this threshold changes: only where the score is this model's
        if r.get("model_version") == self.version and isinstance(r.get("score"), (int, float)):
            self.same += 1
            self.flips += (float(r["score"]) > self.threshold) != (r["result"] == "fail")

    def note(self) -> str:
        if not self.other:
            return ""
        seen, threshold = sorted(self.seen), self.threshold
        how = ", ".join(f"threshold {t:.6g} (model {v})" for t, v in seen[:3]) + (" and others" if len(seen) > 3 else "")
        changed = (f" ({self.flips} of them would get the other verdict at it)" if self.same and self.same == self.other
                   else f" ({self.flips} of the {self.same} by this model would get the other verdict at it)"
                   if self.same else "")
        return (f"note: {self.other} earlier result(s) were judged at {how}, not at this session's threshold "
                f"{threshold_text(threshold)} (model {self.version}){changed}; they stand as recorded, new images are "
                f"judged at {threshold_text(threshold)}")


def _recover(st: _State, log: Callable[[str], None], keep: Callable[[str], bool] | None = None,
             stop: threading.Event | None = None) -> tuple[int, str]:
    """Rebuild the counts from the journal, and the done set of the files in IN_DIR (the keys
    ``keep`` holds: :meth:`_Listing.holds`; None: every key the journal names); finish cut-short
    moves; drop temp files. Returns how many records the journal holds and
    :class:`_JudgedApart`'s note on them; with ``stop`` set, at once (how many were read)."""
    apart = _JudgedApart(st.threshold, st.info.version)
    n = 0
    for rec in st.journal.read():
        if stop is not None and stop.is_set():  # (a journal of millions of lines is read for seconds)
            return n, ""
        n += 1
        apart.add(rec)
        key = rec["image"]
        sig = _record_signature(rec)
        st.totals.add(rec.get("result", "rejected"))
        if not _moved_away(rec, sig):
            if keep is None or keep(key):  # (a line without its file's times: by its content)
                _mark_done(st, key, rec["sha256"], sig)
            continue
        # a rejected file (or, with move_judged, a judged one) was moved away: one at its name is a
        # new arrival, unless it is the very file judged (its size and modification time: a chmod
        # moves only the change time), whose move was cut short, or failed
        _forget(st, [key])
        moved_to = _moved_to(rec)
        src, dest = st.in_dir / key, st.out / moved_to
        if not src.is_file():
            continue
        try:
            now = _signature(src)
            if not _still_the_judged_file(src, now, rec, sig):
                if not os.path.lexists(dest):  # its move refused (written again meanwhile): the name stays the
                    st.moved_names.add(moved_to)  # line's, not the new frame's (at most one a file in the folder)
                continue  # other bytes, or sent again since: a new arrival
            copied = dest.is_file() and file_sha256(dest) == rec["sha256"]
        except OSError:
            continue
        try:
            if copied and _same_signature(sig, now):  # a move across file systems cut short after its copy
                src.unlink()
                log(f"removed {src}: its copy in {dest} was complete (the move was cut short before)")
            elif copied:  # its copy is in rejected/ (judged/) and this file's change time moved: the same
                # bytes sent again with their time kept (cp -p, rsync -t; its inode may be the first's,
                # freed by a move across file systems), a new arrival (a move cut short then chmod'ed gets
                # a second line: never none)
                continue
            elif not os.path.lexists(dest) and (others := _watched_by_others(st, key)) is not None:
                st.moved_names.add(moved_to)  # (its line names it: a later start alone completes the move)
                _mark_done(st, key, rec["sha256"], now)
                log(f"{src}: its move to {dest}, cut short before, is not completed now: {LEFT_FOR.format(others)}")
            elif not os.path.lexists(dest):  # it never left
                _move(src, dest, now)
                log(f"moved {src} to {dest} (the move was cut short before)")
            else:  # its name in rejected/ (judged/) holds another file: judged, left in place
                st.moved_names.add(moved_to)
                _mark_done(st, key, rec["sha256"], now)
        except OSError as exc:  # e.g. no permission in the drop folder: judged, left in place
            st.moved_names.add(moved_to)
            _mark_done(st, key, rec["sha256"], now)
            log(f"cannot move {rec.get('result', 'rejected')} {src} to {dest} ({exc.strerror or exc}); left where it is")
    ours = re.compile(re.escape(TMP_PREFIX) + r"\d+-")  # as _atomic_write names them: a user's ".tmp-notes" stays
    for sub in (MAPS, OVERLAYS, REJECTED, *JUDGED.values(), "."):
        folder = st.out / sub
        for p in folder.glob(f"{TMP_PREFIX}*"):
            if ours.match(p.name):
                p.unlink(missing_ok=True)
    return n, apart.note()


def _check_out(out: Path) -> None:
    """Refuse an ``out_dir`` that holds anything but what watch writes, unless it is a results folder
    of watch (its journal) or the command line's output folder (its manifest, checked there): the
    service rewrites status.json and repairs results.jsonl, and must not do it to a user's files."""
    if not out.is_dir() or (out / MANIFEST_NAME).is_file():
        return
    journal = out / JOURNAL
    if journal.is_file():
        with open(journal, "rb") as f:
            head = f.read(len(JOURNAL_START))
        if head in (b"", JOURNAL_START):  # every line watch writes begins so (_base_record)
            return
        raise WatchError(f"{journal}: not a journal watch wrote (its first line is no result): choose a new or "
                         "empty results folder")
    def empty(folder: str, inside: Iterable[str] = ()) -> bool:  # holding only empty folders named ``inside``
        return all(e.name in inside and e.is_dir(follow_symlinks=False) and empty(e.path) for e in os.scandir(folder))

    own = {MAPS, OVERLAYS, REJECTED, JUDGED_ROOT, LOCK_NAME}  # what a start cut short before its journal leaves
    judged = {Path(sub).name for sub in JUDGED.values()}
    other = [e.name for e in os.scandir(out)
             if e.name not in own or (e.name != LOCK_NAME and (not e.is_dir() or not empty(
                 e.path, judged if e.name == JUDGED_ROOT else ())))]
    if other:
        raise WatchError(f"{out}: the results folder holds files watch did not write (such as {sorted(other)[0]!r}) "
                         f"and no {JOURNAL}: choose a new or empty folder")


def _entry(st: _State, path: Path, stat: os.stat_result,
           log: Callable[[str], None]) -> tuple[Path, int, int, int] | None:
    """(path, size, mtime_ns, ctime_ns) of a regular file in IN_DIR that is an image candidate, else None
    (a file with another extension is named once per extension)."""
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        if ext not in st.warned_ext:
            st.warned_ext.add(ext)
            log(f"ignoring files ending in {ext or '(no extension)'!r} such as {path} (not an image extension)")
        return None
    return path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


#: Why a folder of defect-fast's outputs inside IN_DIR is not looked into (its maps and overlays are no
#: camera's frames; nor are another watch's rejected/ and judged/ files, which it keeps).
OUTPUT_FOLDER = "a defect-fast output folder (another watch's, a run's or predict's), not watched"


def _output_folder(folder: Path | str) -> bool:
    """Whether ``folder`` holds defect-fast's marks of an output folder: its manifest or its lock."""
    return os.path.lexists(os.path.join(folder, MANIFEST_NAME)) or os.path.lexists(os.path.join(folder, LOCK_NAME))


def _in_output_folder(st: _State, key: str, looked: dict[str, bool]) -> Path | None:
    """The folder of defect-fast's outputs under IN_DIR that ``key`` is or lies in (None: none):
    each folder on the way from IN_DIR, IN_DIR itself not included (the user chose to watch it).
    ``looked``: what a round found of each folder so far (the files waiting to settle are looked
    at every round)."""
    parts = key.split("/")
    for i in range(1, len(parts) + 1):
        rel = "/".join(parts[:i])
        if rel not in looked:
            folder = st.in_dir / rel
            looked[rel] = _output_folder(folder) and os.path.realpath(folder) != os.path.realpath(st.out)  # (its own)
        if looked[rel]:
            return st.in_dir / rel
    return None


def _skipping(st: _State, path: Path, exc: OSError | str, log: Callable[[str], None]) -> None:
    """Name an entry of IN_DIR the service cannot (or does not) look at, and goes on without,
    once per reason."""
    why = exc if isinstance(exc, str) else exc.strerror or str(exc)
    key = str(path)
    if st.skipped.get(key) != why:
        if len(st.skipped) >= MAX_EVENT_PATHS:  # a bound on what a long-running service remembers
            st.skipped.clear()
        st.skipped[key] = why
        log(f"skipping {path}: {why}")


class _Listing(NamedTuple):
    """What a listing of IN_DIR (or a sub-folder) found: the candidates, key -> (path, size,
    mtime_ns, ctime_ns); the keys of folders and entries it could not look at (what lies there
    may still be there; "" for IN_DIR itself); and the (device, inode) of each folder it listed."""

    found: dict[str, tuple[Path, int, int, int]]
    failed: set[str]
    folders: dict[str, tuple[int, int]]

    def holds(self, key: str) -> bool:
        """Whether ``key`` may still be there: found, or under something that could not be looked at."""
        return key in self.found or (bool(self.failed) and _under_any(key, self.failed))


def _under_any(key: str, folders: set[str] | dict[str, Any]) -> bool:
    """Whether ``key`` is one of ``folders`` or lies under one ("" is IN_DIR): its own path and
    each folder above it are looked up, not every folder (a journal of millions of lines)."""
    if "" in folders or key in folders:
        return True
    parts = key.split("/")
    return any("/".join(parts[:i]) in folders for i in range(1, len(parts)))


def _scan(st: _State, recursive: bool, log: Callable[[str], None], root: Path | None = None) -> _Listing:
    """Candidate files in IN_DIR (or its sub-folder ``root``): see :class:`_Listing`."""
    found: dict[str, tuple[Path, int, int, int]] = {}
    failed: set[str] = set()
    folders: dict[str, tuple[int, int]] = {}
    out_resolved, in_resolved = st.out.resolve(), st.in_dir.resolve()
    top = st.in_dir if root is None else root

    def rel(p: Path | str) -> str:
        r = Path(p).relative_to(st.in_dir).as_posix()
        return "" if r == "." else r

    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            ident = os.stat(folder)
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            if folder == top:  # the folder itself: unknown, not empty
                failed.add(rel(folder))
            continue  # (a sub-folder gone since it was listed)
        except OSError as exc:  # e.g. a sub-folder the service may not list: the rest goes on
            _skipping(st, Path(folder), exc, log)
            failed.add(rel(folder))
            continue
        folders[rel(folder)] = (ident.st_dev, ident.st_ino)
        for e in entries:
            if is_temporary_name(e.name):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    if Path(e.path).resolve() == out_resolved:
                        continue
                    if _output_folder(e.path):  # another watch's results beside this one's, say
                        _skipping(st, Path(e.path), OUTPUT_FOLDER, log)
                        continue
                    if recursive:
                        stack.append(Path(e.path))
                    else:  # a photo put there would wait for ever unseen: said once
                        _skipping(st, Path(e.path), "a sub-folder, not watched (--recursive watches them)", log)
                    continue
                if not e.is_file():
                    if e.is_symlink() and not os.path.exists(e.path) and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                        _skipping(st, Path(e.path), "a link to nothing (its target is gone)", log)
                    elif e.is_symlink() and e.is_dir():  # its photos would wait for ever unseen: said once
                        target = Path(e.path).resolve()
                        inside = target == in_resolved or in_resolved in target.parents
                        if target != out_resolved and not (inside and recursive):  # (else: seen where it is)
                            _skipping(st, Path(e.path), "a link to a folder, not followed"
                                      + ("" if inside else " (watch that folder itself)"), log)
                    continue
                s = e.stat()
            except FileNotFoundError:
                continue
            except OSError as exc:  # a link in a loop or into a folder it may not read: skipped, named once
                _skipping(st, Path(e.path), exc, log)
                failed.add(rel(e.path))
                continue
            path = Path(e.path)
            entry = _entry(st, path, s, log)
            if entry is not None:
                found[rel(path)] = entry
    return _Listing(found, failed, folders)


def _after_listing(st: _State, listing: _Listing, log: Callable[[str], None]) -> None:
    """After a listing of the whole of IN_DIR: what was judged of files it no longer holds is
    forgotten; under a folder now on another device than at the last listing (a share
    (un)mounted: it looked empty, and its files, back, are the ones judged before), what was
    judged is read again from the journal instead. A folder made again on the same device is a
    new one: what it holds is judged as any arrival."""
    mounted = {r for r, ident in listing.folders.items() if r in st.folder_ids and st.folder_ids[r][0] != ident[0]}
    # folders gone from the listing are forgotten with their identity: made again, they are new
    st.folder_ids = {r: ident for r, ident in st.folder_ids.items() if _under_any(r, listing.failed)}
    st.folder_ids.update(listing.folders)
    _forget(st, [k for k in st.done if not listing.holds(k) or (mounted and _under_any(k, mounted))])
    if mounted:
        _done_from_journal(st, listing, mounted)
        first = min(mounted)
        log(f"{st.in_dir / first if first else st.in_dir} was (un)mounted: what was judged of the files there now is "
            "read again from the journal")


def _done_from_journal(st: _State, listing: _Listing, folders: set[str]) -> None:
    """What was judged of the files ``listing`` holds under ``folders``, read again from the
    journal (as a start reads it)."""
    for rec in st.journal.read():
        key = rec["image"]
        if not (listing.holds(key) and _under_any(key, folders)):
            continue
        sig = _record_signature(rec)
        if not _moved_away(rec, sig):
            _mark_done(st, key, rec["sha256"], sig)
            continue
        _forget(st, [key])  # moved away: one there now is a new arrival, unless the very file never left
        entry = listing.found.get(key)
        if entry is not None:
            with contextlib.suppress(OSError):
                now = tuple(entry[1:])
                if _still_the_judged_file(entry[0], now, rec, sig) and not _sent_again(st, rec, sig, now):
                    _mark_done(st, key, rec["sha256"], now)


def _inside(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside the folder it is joined to: text, not
    absolute, no ``..`` (nor empty, ``.``, or NUL)."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def _record_signature(rec: Mapping[str, Any]) -> Signature | None:
    if "size" not in rec or "mtime_ns" not in rec:
        return None
    return (rec["size"], rec["mtime_ns"], rec["ctime_ns"]) if "ctime_ns" in rec else (rec["size"], rec["mtime_ns"])


def _subfolders(move_judged: bool) -> tuple[str, ...]:
    """The folders of OUT_DIR a watch writes into (``judged/`` ones with ``move_judged`` only)."""
    return (MAPS, OVERLAYS, REJECTED, *(JUDGED.values() if move_judged else ()))


def _moved_to(rec: Mapping[str, Any]) -> str | None:
    """Where ``rec``'s file was moved, relative to OUT_DIR: ``rejected/...`` for a rejected file,
    ``judged/pass|fail/...`` for a judged one (``move_judged``); None where it stayed."""
    return rec.get("rejected_to") if rec.get("result") == "rejected" else rec.get("moved_to")


def _moved_away(rec: Mapping[str, Any], sig: Signature | None) -> bool:
    """Whether ``rec``'s file was moved out of IN_DIR (a line without its file's times, ``sig``
    None, is done by its content, as before they were recorded)."""
    return bool(_moved_to(rec)) and sig is not None


def _sent_again(st: _State, rec: Mapping[str, Any], sig: Signature, now: Signature) -> bool:
    """Whether a file of ``rec``'s judged bytes, size and time whose change time moved (``now``)
    is those bytes sent again (``cp -p``, ``rsync -t``) while their copy lies where ``rec`` moved
    them: a new arrival, as :func:`_recover` takes it. OSError when the copy cannot be read."""
    dest = st.out / _moved_to(rec)
    return not _same_signature(sig, now) and dest.is_file() and file_sha256(dest) == rec["sha256"]


def _still_the_judged_file(path: Path, now: Signature, rec: Mapping[str, Any], sig: Signature) -> bool:
    """Whether the file at ``path`` (its signature ``now``) is the one ``rec`` judged: its size,
    modification time and content (a chmod moves only the change time). OSError when it cannot be read."""
    return tuple(now[:2]) == tuple(sig[:2]) and file_sha256(path) == rec["sha256"]


def _event_keys(st: _State, paths: set[str], recursive: bool) -> set[str]:
    """The keys (paths relative to IN_DIR) of event paths that can hold candidates: not outside
    IN_DIR, not in OUT_DIR, not in a sub-folder unless ``recursive``, no temporary name on the way."""
    keys = set()
    # resolved, as the observer watches the resolved folder (a symlinked IN_DIR, macOS's real paths)
    # and as _scan compares OUT_DIR; an event path is taken as given below the folder
    base = os.path.realpath(st.in_dir)
    out = os.path.realpath(st.out)
    for p in paths:
        p = os.path.abspath(p)
        if p == out or p.startswith(out + os.sep) or not p.startswith(base + os.sep):
            continue
        key = Path(os.path.relpath(p, base)).as_posix()
        parts = key.split("/")
        if (len(parts) > 1 and not recursive) or any(is_temporary_name(part) for part in parts):
            continue
        keys.add(key)
    return keys


def _update(st: _State, keys: set[str], recursive: bool, log: Callable[[str], None]) -> set[str]:
    """Bring ``st.known`` up to date for ``keys`` only (what events named, and the files waiting to
    settle): each is stat'ed, a folder (``recursive``) is listed; returns the keys to look at."""
    looked = set()
    marked: dict[str, bool] = {}
    for key in keys:
        path = st.in_dir / key
        inside = _in_output_folder(st, key, marked) if recursive else None
        if inside is not None:  # (a file written there, or the folder itself once its marks are in)
            _skipping(st, inside, OUTPUT_FOLDER, log)
            st.known.pop(key, None)
            looked.add(key)
            continue
        try:
            lst = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            lst = None
        except OSError as exc:  # there, but not to be looked at now: what was judged of it is kept
            _skipping(st, path, exc, log)
            st.known.pop(key, None)
            looked.add(key)
            continue
        if lst is None or stat_mod.S_ISDIR(lst.st_mode):  # gone (a file or a folder), or a folder
            was_file = st.known.pop(key, None) is not None
            gone = {key}
            # a folder moved away or in (not a known file gone): what was known under it, what is there now
            if recursive and not (lst is None and was_file):
                prefix = key + "/"
                for k in [k for k in st.known if k.startswith(prefix)]:
                    del st.known[k]
                    looked.add(k)
                    gone.add(k)
                if lst is not None and path.resolve() != st.out.resolve():
                    sub = _scan(st, recursive, log, root=path)
                    st.known.update(sub.found)
                    looked.update(sub.found)
                    gone = {k for k in gone if not sub.holds(k)}
            _forget(st, gone)
            looked.add(key)
            continue
        try:
            s = os.stat(path)  # a link is followed, as the folder scan does
        except (FileNotFoundError, NotADirectoryError):
            s = None
        except OSError as exc:  # there, but not to be looked at now: what was judged of it is kept
            _skipping(st, path, exc, log)
            st.known.pop(key, None)
            looked.add(key)
            continue
        entry = _entry(st, path, s, log) if s is not None and stat_mod.S_ISREG(s.st_mode) else None
        if entry is None:
            st.known.pop(key, None)
            _forget(st, [key])
        else:
            st.known[key] = entry
        looked.add(key)
    return looked


def _ready(st: _State, keys, settle: float) -> list[str]:
    """Update the pending table for ``keys``; those of files in ``st.known`` stable for ``settle`` s and
    not known to be done."""
    now = time.monotonic()
    ready = []
    known = st.known
    for key in keys:
        entry = known.get(key)
        if entry is None:  # gone
            st.pending.pop(key, None)
            continue
        sig = entry[1:]
        if _same_signature(st.done_sig.get(key), sig) or st.unreadable.get(key) == sig:
            st.pending.pop(key, None)
            continue
        p = st.pending.get(key)
        if p is None or p.signature != sig:
            st.pending[key] = _Pending(sig, now)
            continue
        bad = st.undecodable.get(key)
        if bad is not None and bad[0] == sig and now - bad[1] < st.grace:  # waits for the rest of the file
            continue
        if now - p.since >= settle and (sig[0] > 0 or now - p.since >= st.grace):  # an empty file waits its grace
            ready.append(key)
    for key in [k for k in st.pending if k not in known]:
        del st.pending[key]
    for key in [k for k in st.undecodable if k not in known]:
        del st.undecodable[key]
    for key in [k for k in st.unreadable if k not in known]:
        del st.unreadable[key]
    ready.sort(key=lambda k: (known[k][2], k))
    return ready


def _base_record(st: _State, key: str, path: Path, sha: str, sig: Signature) -> dict[str, Any]:
    # "image" first: every journal line then begins with JOURNAL_START, which _check_out looks for
    # "path" absolute: a journal is read by other programs, from other working folders than the service's
    return {"image": key, "path": os.path.abspath(path), "sha256": sha, "size": sig[0], "mtime_ns": sig[1], "ctime_ns": sig[2],
            "model": st.info.name, "model_version": st.info.version, "time": _now_iso()}


def _moved_name(st: _State, folder: str, key: str, sha: str, plain: bool = True) -> Path:
    """Where a file moved out of IN_DIR goes: OUT/``folder``/ (``rejected`` or a :data:`JUDGED`
    folder) under its relative path ("/" -> "__", as :func:`output_name`), with its content's 12
    hex digits when that name is taken (always, ``plain`` False: a judged image, named as its map
    is, so that a camera sending one name again gives each frame its own name across restarts
    too), and a count after them when that is taken too (files of one name and content in several
    sub-folders): never over a file kept there, nor at a name the journal gave another file (one
    whose move failed)."""
    stem, suffix = _flat_name(key)
    base = f"{stem}_{sha[:12]}{suffix}"
    counted = f"{folder}/{base}"
    names = itertools.chain([(None, f"{stem}{suffix}")] if plain else [], [(None, base)],
                            ((n, f"{stem}_{sha[:12]}_{n}{suffix}") for n in itertools.count(st.moved_count.get(counted, 2))))
    for n, name in names:
        dest = st.out / folder / name
        if not os.path.lexists(dest) and dest.relative_to(st.out).as_posix() not in st.moved_names:
            if n is not None:
                st.moved_count[counted] = n + 1
            return dest
    raise AssertionError("unreachable: the counts do not end")


def _reject(st: _State, key: str, path: Path, sha: str, sig: Signature, reason: str, log) -> None:
    others = _watched_by_others(st, key)
    rec = _base_record(st, key, path, sha, sig)
    rec.update(result="rejected", reason=reason)
    if others is not None:  # each watch of the folder records it: moved into this one's rejected/, not the other's
        rec["left"] = LEFT_FOR.format(others)
    else:
        dest = _moved_name(st, REJECTED, key, sha)
        rec["rejected_to"] = dest.relative_to(st.out).as_posix()
        st.moved_names.add(rec["rejected_to"])
    st.journal.append(rec)
    st.totals.add("rejected")
    st.session.add("rejected")
    st.last = {"image": key, "result": "rejected", "reason": reason, "time": rec["time"]}
    if others is not None:
        _mark_done(st, key, sha, sig)
        log(f"rejected {path}: {reason}; left where it is: {rec['left']}")
        return
    failed = _move_away(st, key, path, sig, dest)
    if failed is not None:  # judged all the same: the line is written, the other images go on
        _mark_done(st, key, sha, sig)  # (still there: not judged again)
        log(f"rejected {path}: {reason} (cannot move it to {dest}: {failed.strerror or failed}; left where it is)")
        return
    log(f"rejected {path}: {reason} (moved to {dest})")


def _move_away(st: _State, key: str, path: Path, sig: Signature, dest: Path) -> OSError | None:
    """Move a file whose journal line names ``dest`` there (:func:`_move`); gone from the folder, it
    is forgotten (a file sent again under its name is a new arrival) and ``dest`` no longer held for
    it. Returns the error when it stays where it is (its name stays held: the line names it)."""
    try:
        _move(path, dest, sig)
    except OSError as exc:
        return exc
    _forget(st, [key])
    st.moved_names.discard(dest.relative_to(st.out).as_posix())
    return None


def _verdict(st: _State, score: Any) -> str:
    """An image's result by its score: it fails above the image threshold."""
    return "fail" if float(score) > st.threshold else "pass"


def _process(st: _State, keys: list[str], predict_fn: PredictFn,
             log: Callable[[str], None], stop: threading.Event | None = None) -> int:
    """Read, judge and record one batch; returns how many images got a result. With ``stop`` set,
    the images whose outputs are not written yet are left for the next start (big photos take
    seconds each: a batch of them must not outlast a service manager's stop timeout)."""
    from .visualize import save_map, save_overlay

    t0 = time.perf_counter()
    good: list[tuple[str, Path, str, Signature, torch.Tensor, torch.Tensor]] = []
    n_done = 0
    st.lock_table = _UNREAD  # who else watches: read again for this batch
    for key in keys:
        path, *rest = st.known[key]
        sig = tuple(rest)
        try:
            sha = file_sha256(path)
        except FileNotFoundError:
            st.pending.pop(key, None)
            continue
        except OSError as exc:  # not readable: try again once it changes
            st.pending.pop(key, None)
            st.unreadable[key] = sig
            log(f"cannot read {path} ({exc}); skipped until it changes")
            continue
        if st.done.get(key) == sha:  # same content already judged (e.g. touched, or journal lacked size)
            st.done_sig[key] = sig
            st.pending.pop(key, None)
            log(f"{path}: the same content as when it was judged before; not judged again")
            continue
        try:
            few: list = []
            notes: list = []  # (transparent pixels, float pixels in no known range: said once a session, as below)
            # the model's input, and the photograph
            img, photo = read_image_at_both_sizes(path, st.info.image_size, few_levels=few, notes=notes)
            err = None
            for line in note_once(notes, st.notes_said):
                log(f"warning: {line} (said once a session)")
            # a 12-bit camera's frames in 16-bit files: said once, not per image (a black frame, all 0, is no
            # camera's bit depth: it is rejected as blank below, and leaves the advice for such frames)
            if few and few[0][1] > 0 and not st.few_levels_said:
                st.few_levels_said = True
                log(f"warning: {few_levels_message(few, 1, path)} (said once a session)")
            stretched = None if st.proportions_said else outside_proportions(
                [(photo.shape[-1], photo.shape[-2])], [path], st.info.extra.get("trained_proportions"), path.parent)
            if stretched:
                st.proportions_said = True
                log(f"warning: {stretched} (said once a session)")
        except DataError as exc:
            img, photo, err = None, None, str(exc)
        except MemoryError:  # this photo only, as for its map below: set aside with a reason
            img, photo, err = None, None, "too large: no memory to decode it"
        except Exception as exc:  # noqa: BLE001 - a reader's bug on one odd file: that file is set aside with
            # the reason, the line goes on (raised, it stopped the service at every start on the same file)
            img, photo, err = None, None, f"cannot be read (internal error {error_kind(exc)}: {exc})"
        try:
            now_sig = _signature(path)
        except OSError:  # gone, or no longer reachable: looked at again if it comes back
            st.pending.pop(key, None)
            continue
        if now_sig != sig:  # changed since it settled: judged once it settles again
            st.pending.pop(key, None)
            # a whole frame (it decoded) whose bytes changed (its size or modification time; a chmod moves the
            # change time only) is not judged: a camera that names every frame alike lost a frame
            if err is None and tuple(now_sig[:2]) != tuple(sig[:2]):
                st.replaced += 1
                log(f"{path}: changed after it stayed unchanged for the settle time, before it was judged; judged "
                    "once it settles again (where a camera names every frame alike, the frame it replaced is not "
                    "judged: leave frames longer than --settle and the judging take, or give each a name of its own)")
            continue
        reason = None
        if err is not None:
            reason = err.replace(f"{path}: ", "")
            # a writer that stalled mid-file may go on (an empty file has waited its grace in _ready)
            if st.grace > 0 and sig[0] > 0:
                bad = st.undecodable.get(key)
                if bad is None or bad[0] != sig:
                    st.undecodable[key] = (sig, time.monotonic())
                    log(f"{path}: {reason}; rejected if it stays so, unchanged, for {st.grace:.0f} s (a writer may "
                        "not have finished it)")
                    continue
                if time.monotonic() - bad[1] < st.grace:
                    continue
        elif bool(blank_images(img.unsqueeze(0))[0]):  # nothing the model sees: never a pass, at once
            reason = BLANK_REASON
            spread = float(photo.float().flatten(1).std(1).max())  # per channel: a solid colour does not vary
            if spread >= DETAIL_SPREAD:  # a fine weave, not only a camera fault, can be that
                reason += (f" at the model's {st.info.image_size} px; the photo itself varies (standard deviation "
                           f"{spread:.3g} grey levels): if that is the part, its detail is finer than the model "
                           "resolves (a model trained at a larger --image-size may see it)")
        st.pending.pop(key, None)
        st.undecodable.pop(key, None)
        if reason is not None:
            _reject(st, key, path, sha, sig, reason, log)
            n_done += 1
        else:
            good.append((key, path, sha, sig, img, photo))
    if good:
        out = predict_fn(torch.stack([g[4] for g in good]))
        maps, scores = out["maps"].detach().float().cpu(), out["scores"].detach().float().cpu()
        if maps.shape[0] != len(good) or scores.shape[0] != len(good):
            raise RuntimeError(f"predict function returned {maps.shape[0]} maps / {scores.shape[0]} scores for {len(good)} images")
        scale = st.info.scale()
        written, photo_maps = [], []
        for (key, path, sha, sig, _img, photo), m, s in zip(good, maps, scores):
            if stop is not None and stop.is_set() and written:
                log(f"stopping: {len(good) - len(written)} image(s) of this batch left for the next start")
                break
            # this photo only is set aside, with its reason; the rest of the batch goes on
            reason = None
            if not (bool(torch.isfinite(m).all()) and math.isfinite(float(s))):  # never a pass, never a journal error
                reason = "the model gives a NaN or infinite map or score for this image (its weights or statistics " \
                         "are not usable)"
            else:
                name = output_name(key, sha)
                map_path, ov_path = st.out / MAPS / f"{name}_map.png", st.out / OVERLAYS / f"{name}_overlay.png"
                if st.maps == "none" or (st.maps == "failed" and _verdict(st, s) == "pass"):
                    map_path = ov_path = None
                try:
                    m = resize_map(m, tuple(photo.shape[-2:]))  # (its regions are in the photo's pixels)
                    if map_path is not None:
                        _atomic_write(map_path, lambda tmp, m=m: save_map(m, tmp, scale))
                        _atomic_write(ov_path, lambda tmp, m=m, photo=photo: save_overlay(photo, m, tmp, scale))
                except MemoryError:
                    for p in (map_path, ov_path):
                        if p is not None:
                            p.unlink(missing_ok=True)
                    h, w = photo.shape[-2:]
                    reason = f"too large: no memory for its map{' and overlay' if map_path is not None else ''} at {w}x{h}"
            if reason is not None:
                _reject(st, key, path, sha, sig, reason, log)
                n_done += 1
                written.append(None)
                photo_maps.append(None)
                continue
            written.append((map_path, ov_path))
            photo_maps.append(m)
        for sub in (MAPS, OVERLAYS):  # the renames are durable before any journal line names them
            _fsync_path(st.out / sub, directory=True)
        for (key, path, sha, sig, _, _), m, s, files in zip(good, photo_maps, scores, written):
            if files is None:
                continue
            map_path, ov_path = files
            score = float(s)
            result = _verdict(st, score)
            regions = defect_regions(m, st.info.pixel_threshold, max_regions=None) \
                if st.info.pixel_threshold is not None else []
            rec = _base_record(st, key, path, sha, sig)
            if len(regions) > MAX_REGIONS:  # a line that lists some says how many there are
                rec["regions_total"] = len(regions)
            rec.update(result=result, score=score, threshold=st.threshold, regions=regions[:MAX_REGIONS],
                       map_size=list(m.shape[-2:][::-1]),  # (width, height) of the map and its region boxes: the photo's
                       map=None if map_path is None else map_path.relative_to(st.out).as_posix(),
                       overlay=None if ov_path is None else ov_path.relative_to(st.out).as_posix())
            # the line names where the image goes before it goes: a move cut short is completed at start
            # (a watch of a sub-folder beside this --recursive one judges it too: it stays for it)
            others = _watched_by_others(st, key) if st.move_judged else None
            dest = _moved_name(st, JUDGED[result], key, sha, plain=False) if st.move_judged and others is None else None
            if dest is not None:
                rec["moved_to"] = dest.relative_to(st.out).as_posix()
                st.moved_names.add(rec["moved_to"])
            elif others is not None:
                rec["left"] = LEFT_FOR.format(others)
                log(f"{path}: left where it is: {rec['left']}")
            st.journal.append(rec)
            _mark_done(st, key, sha, sig)
            st.totals.add(result)
            st.session.add(result)
            st.last = {"image": key, "result": result, "score": score, "time": rec["time"]}
            n_done += 1
            failed = _move_away(st, key, path, sig, dest) if dest is not None else None
            if failed is not None:  # judged all the same (still there: not judged again); tried again at start
                log(f"{result} {path}: cannot move it to {dest} ({failed.strerror or failed}); left where it is")
    dt = time.perf_counter() - t0
    if n_done:
        st.busy_s += dt
        st.rate = n_done / dt if dt > 0 else 0.0
        c = st.totals
        log(f"{n_done} image(s) in {dt:.2f} s ({st.rate:.1f} images/s) | pass {c.passed}  fail {c.failed}  "
            f"rejected {c.rejected} | waiting {len(st.pending)}")
    return n_done


#: A results folder that cannot take more (full, over quota, read-only, failing): the service
#: stops, and says where and how it goes on (the files it reads are each set aside on their own).
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def _output_failures_stop(out: Path) -> Iterator[None]:
    """An OSError of :data:`_OUTPUT_ERRNOS` in the block stops the service: a WatchError naming
    the file, and how the service goes on."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise WatchError(f"{out}: cannot write the results{where}: {exc.strerror or exc}; stopped, with every result so "
                         "far in the journal: make room (or mend the folder) and start watch again, it goes on where it "
                         "stopped") from exc


def _heartbeat(st: _State, log: Callable[[str], None]) -> None:
    """status.json rewritten while idle. A write that fails (a disk full for a while, the folder
    gone) is said once (again after any write has worked since) and tried again at the next: only
    a batch's results, which cannot be kept otherwise, stop the service."""
    failed = st.status_failed
    try:
        _write_status(st, "running")
    except OSError as exc:
        if not failed:
            log(f"{st.out / STATUS}: not rewritten ({exc.strerror or exc}); tried again every {STATUS_EVERY:g} s or more "
                "while no image arrives")
        st.status_failed = True
    else:
        if failed:
            log(f"{st.out / STATUS}: rewritten again")


def _status_or_stop(st: _State, state: str, out: Path, counts: bool = True) -> None:
    """:func:`_write_status`; a results folder that cannot take it stops the service, saying so."""
    with _output_failures_stop(out):
        _write_status(st, state, counts)


def _write_status(st: _State, state: str, counts: bool = True) -> None:
    """status.json; ``counts`` False: the journal's counts are not known (null), its reading cut short."""
    processed = st.session.passed + st.session.failed + st.session.rejected
    st.status_at = time.monotonic()
    status = {
        "state": state, "pid": os.getpid(), "in_dir": str(st.in_dir), "out_dir": str(st.out), "started": st.started,
        "updated": _now_iso(),
        "model": st.info.name, "model_version": st.info.version, "threshold": st.threshold,
        "threshold_source": st.threshold_source, "pixel_threshold": st.info.pixel_threshold,
        "counts": st.totals.as_dict() if counts else None, "session": st.session.as_dict(),
        "images_per_s": round(processed / st.busy_s, 3) if st.busy_s > 0 else None,
        "last_batch_images_per_s": round(st.rate, 3), "waiting": len(st.pending), "last": st.last,
        "replaced_before_judged": st.replaced,
    }
    _atomic_write(st.out / STATUS, lambda tmp: tmp.write_text(json.dumps(status, indent=2)), sync=False)
    st.status_failed = False  # written: a later failure is said again


class _Events:
    """Paths named by file-system events since the last round, filled by the observer's thread."""

    def __init__(self, wake: threading.Event):
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._overflow = False
        self.wake = wake

    def add(self, *paths: str) -> None:
        with self._lock:
            if len(self._paths) >= MAX_EVENT_PATHS:  # a flood: one listing of the folder is cheaper
                self._overflow = True
                self._paths.clear()
            elif not self._overflow:
                self._paths.update(paths)
        self.wake.set()

    def take(self) -> tuple[set[str], bool]:
        """(the paths, whether some were dropped) since the last call."""
        with self._lock:
            paths, overflow = self._paths, self._overflow
            self._paths, self._overflow = set(), False
        return paths, overflow


# Events that say nothing about a file's content or presence: our own reads open and close every
# image, and a folder is "modified" whenever a file in it is created (its files have their own events).
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of ``folder``, None when it is gone: a watch belongs to one folder, not its name."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _start_observer(in_dir: Path, recursive: bool, events: _Events, log: Callable[[str], None]):
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        log("watchdog is not installed: scanning the folder every poll interval")
        return None

    class _Collect(FileSystemEventHandler):
        def on_any_event(self, event):  # noqa: D401 - note the paths it names
            if event.event_type in _QUIET_EVENTS or (event.is_directory and event.event_type == "modified"):
                return
            dest = getattr(event, "dest_path", "")
            events.add(*(os.fsdecode(p) for p in ((event.src_path, dest) if dest else (event.src_path,))))

    try:
        observer = Observer()
        # the resolved folder: inotify would watch a symlink itself, and report nothing inside
        observer.schedule(_Collect(), os.path.realpath(in_dir), recursive=recursive)
        observer.start()
    except Exception as exc:  # e.g. inotify watch limit reached
        log(f"file-system events unavailable ({type(exc).__name__}: {exc}): scanning the folder every poll interval")
        return None
    return observer


def watch(
    predict_fn: PredictFn,
    meta: ModelInfo | Mapping[str, Any],
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    once: bool = False,
    batch_size: int = 8,
    poll_interval: float = 1.0,
    rescan_interval: float = RESCAN_INTERVAL,
    settle: float | None = None,
    threshold: float | None = None,
    recursive: bool = False,
    use_watchdog: bool = True,
    stop: threading.Event | None = None,
    handle_signals: bool = True,
    log: Callable[[str], None] | None = None,
    lock: bool = True,
    model_changed: Callable[[], str | None] | None = None,
    move_judged: bool = False,
    drop_lock: bool = True,
    maps: str = "all",
) -> dict[str, Any]:
    """Judge every image dropped into ``in_dir``; results in ``out_dir`` (see the module docstring).

    Args:
        predict_fn: uint8 images [N, 3, S, S] -> {"maps": float [N, S, S], "scores": float [N], ...}
            (e.g. ``Detector.predict``); runs on the model's device, N <= ``batch_size``.
        meta: :class:`~defect_fast.calibration.ModelInfo` (or a dict of its fields): image size S,
            model name and version, image and pixel thresholds, map scale.
        in_dir: the drop folder (must exist).
        out_dir: results folder (created; may hold the results of earlier runs: they are resumed;
            another non-empty folder is refused).
        once: process what is in ``in_dir`` (waiting for files still being written) and return.
        batch_size: images per predict call.
        poll_interval: seconds between scans when idle (events from watchdog wake it earlier).
        rescan_interval: while watchdog's events arrive, seconds between listings of the whole
            folder (a safety net for missed events); between them only the paths that events
            name, and the files waiting to settle, are looked at.
        settle: seconds a file's size and mtime must stay unchanged (default: ``poll_interval``).
        threshold: image threshold; overrides ``meta.image_threshold`` (one of them is required).
        recursive: also watch sub-folders (``out_dir`` inside ``in_dir`` is skipped, and so is any
            folder of defect-fast's outputs there, named once: :data:`OUTPUT_FOLDER`).
        use_watchdog: False scans only.
        stop: set it to stop after the image in hand (for embedding; signals set it too).
        handle_signals: install SIGTERM/SIGINT handlers (main thread only) for the run.
        log: where progress lines go (default: print, flushed).
        lock: take ``out_dir``'s :class:`~defect_fast.safety.RunLock` for the run (False: the
            caller holds it, as the command line does).
        model_changed: called at each listing of the whole folder; a text it returns (the model
            file replaced since it was loaded, as the command line checks) is logged, once until
            it returns another.
        move_judged: move each judged image out of ``in_dir`` into ``out_dir``/judged/pass/ or
            judged/fail/ once its journal line is written (the line's "moved_to" names where; a
            move that fails leaves it in place, judged, and is tried again at the next start).
        drop_lock: take ``in_dir``'s :class:`DropFolderLock` for the run (False: the caller holds
            it, as the command line does: one lock of its own for each watch, which tells it from
            another watch's by it).
        maps: the judged images that get a map and an overlay (:data:`MAPS_FOR`): "all", "failed"
            (a passing image's line then names none: "map" and "overlay" are null) or "none"; a
            line lists its regions either way.

    Returns:
        {"counts": totals over the journal {"pass", "fail", "rejected", "total"} (None: stopped
        while the journal was read), "session": the same for this run, "images_per_s": float |
        None, "journal": path}.

    Raises:
        WatchError: ``in_dir`` missing, ``out_dir`` holding files watch did not write, or no threshold.
        RunInUse: ``out_dir`` is in use by another process, or ``in_dir`` by another watch that
            ``move_judged`` (this one's or the other's) would take images from (both are
            :class:`~defect_fast.safety.UserError`).
        Errors of ``predict_fn`` propagate (after the results so far are recorded).
    """
    log = log or _print_line
    info = meta if isinstance(meta, ModelInfo) else ModelInfo(**dict(meta))
    thr = threshold if threshold is not None else info.image_threshold
    if thr is None:
        raise WatchError("no image threshold: the model holds no calibration; give one (--threshold)")
    if not math.isfinite(float(thr)):  # NaN: every image a pass; either way, no journal line could hold it
        raise WatchError(f"image threshold {thr!r}: not a finite number")
    if not (isinstance(info.image_size, int) and info.image_size >= 1):  # else every image is set aside
        raise WatchError(f"image size {info.image_size!r}: the model's input side must be a positive integer")
    if maps not in MAPS_FOR:
        raise WatchError(f"maps must be one of {', '.join(MAPS_FOR)}, got {maps!r}")
    if batch_size < 1 or poll_interval <= 0 or not rescan_interval > 0:
        raise WatchError(f"batch_size must be >= 1, poll_interval and rescan_interval > 0 "
                         f"(got {batch_size}, {poll_interval}, {rescan_interval})")
    settle = poll_interval if settle is None else settle
    in_dir, out = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise WatchError(f"{in_dir}: the folder to watch does not exist or is not a folder")
    if os.path.realpath(out) == os.path.realpath(in_dir):
        raise WatchError(f"{out}: the results folder must not be the folder to watch")
    if Path(os.path.realpath(out)) in Path(os.path.realpath(in_dir)).parents:  # its own maps would come in as images
        raise WatchError(f"{in_dir}: the folder to watch lies inside the results folder {out}")
    _check_out(out)
    held = contextlib.ExitStack()  # the locks taken, let go last to first
    try:
        if drop_lock:  # before OUT_DIR is made
            drop = DropFolderLock(in_dir, move_judged, log).acquire()
            held.callback(drop.release)
        own_lock = drop.file if drop_lock else held_drop_lock(in_dir)  # (the command line's, taken before)
        # every folder watch may write or move into, judged/ too without move_judged (a restart completes the
        # moves its journal says were cut short, whatever its options): none may be a link (bad files were
        # moved into, maps written in, its target)
        for sub in _subfolders(True):
            step = link_on_the_way(out, sub)
            if step is not None:
                raise WatchError(f"{step}: a symbolic link where watch writes a folder of its own; remove it or "
                                 "choose another results folder")
        for sub in _subfolders(move_judged):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if lock:
            held.callback(_lock(out).release)
        journal = Journal(out / JOURNAL)
    except BaseException:
        held.close()
        raise
    source = "given to watch()" if threshold is not None else info.extra.get("threshold_source")
    st = _State(info=info, threshold=float(thr), threshold_source=source, in_dir=in_dir, out=out, journal=journal,
                grace=0.0 if once else max(MIN_GRACE, 10 * settle), move_judged=move_judged, maps=maps,
                own_lock=own_lock)
    stop = stop or threading.Event()
    wake = threading.Event()
    old_handlers: dict[int, Any] = {}
    observer = events = None
    recovered = False  # the counts read from the journal are whole (status.json's "counts", else null)
    try:
        if handle_signals and threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                if not stop.is_set():
                    log(f"{signal.Signals(signum).name}: finishing the image in hand, then stopping")
                stop.set()
                wake.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # one the process started ignoring stays so
                    old_handlers[sig] = signal.signal(sig, on_signal)
        watched = None  # (device, inode) of the folder the observer was started on
        if use_watchdog and not once:
            events = _Events(wake)
            watched = _identity(in_dir)
            observer = _start_observer(in_dir, recursive, events, log)
        # the first listing, after the observer started (what comes after it has its events): the
        # done set is of the files in the folder only (one judged and gone since is not kept)
        listing = _scan(st, recursive, log)
        st.known, st.folder_ids = listing.found, dict(listing.folders)
        listed = time.monotonic()
        n_records, judged_apart = _recover(st, log, listing.holds, stop)
        recovered = not stop.is_set()
        if not recovered:  # while the journal was read: nothing judged, and no counts of half of it
            if journal.repaired:  # (done at its opening: the next start has nothing left to say)
                log(f"{journal.path}: {journal.repaired}")
            _status_or_stop(st, "stopped", out, counts=False)
            log(f"stopped while reading the journal ({n_records} line(s) read): nothing judged")
            return {"counts": None, "session": st.session.as_dict(), "images_per_s": None, "journal": str(journal.path)}
        if journal.repaired:
            log(f"{journal.path}: {journal.repaired}")
        c = st.totals
        log(f"watching {in_dir} -> {out} | model {info.name} {info.version} | threshold {threshold_text(st.threshold)} | "
            f"{n_records} earlier result(s): pass {c.passed} fail {c.failed} rejected {c.rejected}")
        if judged_apart:
            log(judged_apart)
        _status_or_stop(st, "running", out)
        first = True
        model_said: str | None = None  # what model_changed said last (said once)
        while not stop.is_set():
            if events is not None and _identity(in_dir) != watched:  # renamed away or removed: the watch went with it
                if observer is not None:
                    observer.stop()
                    observer.join(timeout=5)
                watched = _identity(in_dir)
                observer = None if watched is None else _start_observer(in_dir, recursive, events, log)
                log(f"{in_dir} was replaced or removed: " + ("watching the new folder" if observer is not None
                                                             else "scanning it every poll interval"))
                listed = -float("inf")
            live = events is not None and observer is not None
            paths, overflow = events.take() if live else (set(), True)
            if first and not (live and overflow):  # the start's listing, and what came while the journal was read
                keys = set(st.known) | (_update(st, _event_keys(st, paths, recursive), recursive, log) if paths else set())
                first = False
            elif first or overflow or time.monotonic() - listed >= rescan_interval:  # the whole folder
                first = False
                listed = time.monotonic()
                if model_changed is not None:
                    text = model_changed()
                    if text and text != model_said:
                        log(text)
                    model_said = text
                listing = _scan(st, recursive, log)
                st.known = listing.found
                keys = st.known.keys()
                _after_listing(st, listing, log)
                if time.monotonic() - st.status_at >= STATUS_EVERY:  # a heartbeat: an idle service is not a dead one
                    _heartbeat(st, log)
            else:  # only what events named, and what waits to settle
                keys = _update(st, _event_keys(st, paths, recursive) | set(st.pending), recursive, log)
            ready = _ready(st, keys, settle)
            for i in range(0, len(ready), batch_size):
                with _output_failures_stop(out):
                    done_now = _process(st, ready[i:i + batch_size], predict_fn, log, stop)
                if done_now:
                    _status_or_stop(st, "running", out)
                if stop.is_set():
                    break
            if stop.is_set() or (once and not ready and not st.pending):
                break
            if not ready:  # (--settle 0 must not turn the wait for a file into a busy loop)
                # at most the longest wait the platform takes (a poll of 1e10 s overflowed its time_t)
                # and at least MIN_WAIT: --poll 1e-300 spun a third of a core on an empty folder
                wake.wait(min(max(min(poll_interval, settle) if st.pending else poll_interval, MIN_WAIT),
                              threading.TIMEOUT_MAX))
                wake.clear()
        _status_or_stop(st, "stopped", out)
        s = st.session
        log(f"stopped: this run pass {s.passed} fail {s.failed} rejected {s.rejected}; "
            f"journal {journal.path} holds {st.totals.as_dict()['total']} result(s)")
    except BaseException as exc:  # a dashboard must not show a dead service as running
        with contextlib.suppress(Exception):
            st.last = {**(st.last or {}), "error": f"{type(exc).__name__}: {exc}"[:500]}
            _write_status(st, "error", counts=recovered)
        raise
    finally:
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        journal.close()
        held.close()
    processed = st.session.as_dict()["total"]
    return {"counts": st.totals.as_dict(), "session": st.session.as_dict(),
            "images_per_s": processed / st.busy_s if st.busy_s > 0 else None, "journal": str(journal.path)}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Register ``defect-fast watch`` on the CLI's sub-parsers (``command`` as its function)."""
    from .safety import add_threshold_options, device_arg, input_path, nonneg_float, output_path, positive_float, positive_int

    w = subparsers.add_parser(
        "watch", help="judge every image dropped into a folder: a results journal, maps and overlays",
        description="A long-running service for a camera drop folder: each complete image gets one line in "
                    "OUT_DIR/results.jsonl (and its map and overlay, as --maps says) (exactly once, also across kill -9 and restarts); bad "
                    "files are moved to OUT_DIR/rejected/ with the reason in the journal; OUT_DIR/status.json holds "
                    "the counts. SIGTERM or Ctrl-C finishes the image in hand and stops (the rest of its batch "
                    "waits for the next start).")
    w.add_argument("run", type=input_path, help="run folder (or model.pt)")
    w.add_argument("in_dir", type=input_path, help="the drop folder to watch")
    w.add_argument("--out", required=True, type=output_path, help="results folder (new, empty, or one an earlier watch wrote: it is resumed)")
    w.add_argument("--once", action="store_true", help="process what is in the folder, then exit (for cron and tests)")
    w.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default 8; on a CPU at most what one model chunk of patches holds)")
    w.add_argument("--poll", type=positive_float, default=1.0, help="seconds between folder scans (default 1)")
    w.add_argument("--rescan", type=positive_float, default=RESCAN_INTERVAL,
                   help="with file-system events (watchdog): seconds between listings of the whole folder, a safety "
                        "net for missed events; between them only the files events name are looked at "
                        f"(default {RESCAN_INTERVAL:g})")
    w.add_argument("--settle", type=nonneg_float, default=None,
                   help="seconds a file's size and time must stay unchanged before it is read (default: --poll); "
                        f"a file that then does not decode is rejected after {MIN_GRACE:g} s more unchanged, or "
                        "10 x --settle when longer (an upload may have stalled; with --once, at once)")
    add_threshold_options(w, "fails")
    w.add_argument("--recursive", action="store_true",
                   help="also watch sub-folders (a link to a folder is named once, not followed; a folder of "
                        "defect-fast's outputs, another watch's results say, is named once, not looked into)")
    w.add_argument("--move-judged", action="store_true",
                   help="move each judged image out of the drop folder into OUT/judged/pass/ or OUT/judged/fail/ "
                        "once its result is in the journal (its line's \"moved_to\"; named NAME_<12 hex digits of "
                        "its content>, as its map): the images it judges leave the drop folder (default: judged "
                        "images stay where they are)")
    w.add_argument("--maps", choices=MAPS_FOR, default="all",
                   help="the judged images whose map and overlay are written to OUT/maps/ and OUT/overlays/: all "
                        "(default), failed (a passing image's line names none) or none. Written for every image, "
                        "they fill a disk in time on a line")
    w.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    w.set_defaults(func=command)


def _open_out(out: Path, inputs: list, shown: str | os.PathLike) -> OutputFolder:
    """OUT_DIR as a locked output folder: created, or reopened when an earlier watch wrote it."""
    if (out / MANIFEST_NAME).is_file() and out.is_dir():
        folder = OutputFolder.open(out, lock=True, command="watch")
        if folder.files and JOURNAL not in folder.files:
            folder.release()
            raise OutputRefused(f"--out {shown}: holds the output of another defect-fast command, not of watch; "
                                "choose another folder")
        return folder
    return OutputFolder.create(out, inputs=inputs, lock=True, command="watch")


def _file_key(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a file's versions apart without reading it (:func:`_stat_key`); None when it
    cannot be looked at."""
    try:
        return _stat_key(path.stat())
    except OSError:
        return None


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """Device, inode, size and modification time: another file put in the place, or this one written."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _model_watcher(model: Path, digest: str | None = None,
                   since: tuple[int, int, int, int] | None = None) -> Callable[[], str | None]:
    """What to say when the model file a watch loaded (``model``) is replaced by another or
    removed while it runs (a calibrate --overwrite of its run, a new training there): it goes on
    judging by the model it loaded, which a restart changes. None while the file holds what it
    held (a touch, or a copy of the same bytes, changes nothing).

    ``digest``: the SHA-256 of the bytes the model was loaded from (default: the file's now);
    ``since``: :func:`_file_key` of the file taken before it was read (default: now), so that a
    file replaced during the load is looked at, and said unless it holds the bytes loaded."""
    try:
        loaded = since if since is not None else _stat_key(model.stat())
        digest = digest or file_sha256(model)
    except OSError:  # unreadable now: the load says why
        return lambda: None
    seen = {"key": loaded}
    judged = "this watch still judges by the model it loaded; restart it to load the file there now"

    def changed() -> str | None:
        try:
            now = _stat_key(model.stat())
            if now == seen["key"]:
                return None if now == loaded else seen.get("said")
            seen["key"] = now  # its content is read once a change, not at every look
            seen["said"] = None if file_sha256(model) == digest else \
                f"{model}: replaced since watch loaded it (trained or calibrated again?); {judged}"
            return seen["said"]
        except FileNotFoundError:
            seen["key"] = None
            return f"{model}: removed since watch loaded it; {judged}"
        except OSError as exc:
            seen["key"] = None
            return f"{model}: cannot be read now ({exc.strerror or exc}); {judged}"

    return changed


def command(args) -> int:
    """``defect-fast watch``: load the run, prepare OUT_DIR, and :func:`watch` until stopped (or ``--once``)."""
    from .detect import Detector
    from .runs import model_file

    in_dir, out = Path(args.in_dir), Path(args.out)
    if not in_dir.is_dir():
        raise WatchError(f"{in_dir}: the folder to watch does not exist or is not a folder")
    check_out_not_overlapping(out, [in_dir, args.run], what="--out")
    if not (out / MANIFEST_NAME).is_file():
        OutputFolder.check(out, inputs=[in_dir, args.run], command="watch")  # refuse before the model is read
    with contextlib.ExitStack() as held:  # the drop folder's lock, then OUT_DIR's, let go last to first
        # refused before the model is read, and before OUT_DIR is made
        held.callback(DropFolderLock(in_dir, args.move_judged, _print_line).acquire().release)
        model = model_file(args.run)
        before = _file_key(model)  # before it is read: a file replaced during the load is looked at
        det = Detector.load(args.run, device=args.device)
        model_changed = _model_watcher(model, det.loaded_sha256(model), before)  # by the bytes the model was loaded from
        with far_errors(args.run, args.far):
            info = ModelInfo.from_detector(det, args.run, threshold=args.threshold, far=args.far)
        if info.image_threshold is None:
            raise WatchError(f"{args.run}: the model file holds no image threshold; give one with --threshold")
        folder = _open_out(out.absolute(), [in_dir, args.run], out)
        held.callback(folder.release)
        for sub in _subfolders(args.move_judged):
            folder.mkdir(sub)
        folder.record_many([JOURNAL, STATUS])
        named = info.extra.get("threshold_image")
        _print_line(f"threshold {threshold_text(info.image_threshold)}: {info.extra.get('threshold_source')}"
                    + (f" (the score of {info.extra.get('threshold_images', 'calibration')} image {named})" if named else ""))
        watch(lambda x: det.predict_batched(x, images_per_batch=args.batch_size), info, in_dir, out, once=args.once,
              batch_size=args.batch_size, poll_interval=args.poll, rescan_interval=args.rescan, settle=args.settle,
              recursive=args.recursive, lock=False, model_changed=model_changed, move_judged=args.move_judged,
              drop_lock=False, maps=args.maps)
    return 0
