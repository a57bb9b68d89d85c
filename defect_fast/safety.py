"""Guards at the edge of the tool: user errors, safe outputs, run locks, file digests, arguments.

Nothing in this module knows about models or data; it is the small set of rules every command
follows so that a user's mistake never costs a file and never shows a traceback:

- :class:`UserError` and :func:`run_main`: a mistake by the user becomes one line on stderr
  (``defect-fast: error: <message>``) and exit status 2; a bug keeps its traceback.
- :class:`OutputFolder`: an output folder carries a manifest (:data:`MANIFEST_NAME`) of every file
  and sub-folder the tool wrote; ``--overwrite`` removes only those. A non-empty folder without
  the manifest is never written into.
- :func:`check_out_not_overlapping`: an output that is, contains or lies inside an input is refused.
- :func:`safe_output_file` and the ``atomic_write_*`` helpers: single output files are never
  replaced without ``overwrite`` and never left half-written.
- :func:`dump_json_strict`: JSON without NaN/Infinity (they become ``null``, or raise).
- :class:`RunLock`: an OS file lock on a run folder, released when the process dies.
- :func:`state_digest`, :func:`attach_digest`, :func:`verify_digest`, :func:`save_with_digest`,
  :func:`load_with_digest`: a SHA-256 over a saved object's tensors, checked on load.
- Argument types for argparse (:func:`positive_int`, :func:`nonneg_int`, :func:`positive_float`,
  :func:`nonneg_float`, :func:`finite_float`, :func:`probability`, :func:`device_arg`),
  :func:`check_device`, and :class:`ArgumentParser` whose errors are one-line :class:`UsageError`.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "DIGEST_KEY",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "ArgumentParser",
    "DeviceError",
    "DigestError",
    "OutputFolder",
    "OutputRefused",
    "RunInUse",
    "RunLock",
    "UsageError",
    "UserError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "attach_digest",
    "check_device",
    "check_out_not_overlapping",
    "device_arg",
    "dump_json_strict",
    "finite_float",
    "input_path",
    "link_on_the_way",
    "load_with_digest",
    "load_file_with_digest",
    "nonneg_float",
    "nonneg_int",
    "one_line",
    "output_path",
    "positive_float",
    "positive_int",
    "posix_locks",
    "printable",
    "probability",
    "read_own_json",
    "run_main",
    "safe_output_file",
    "save_with_digest",
    "stat_signature",
    "state_digest",
    "verify_digest",
    "write_results_text",
]

PROG = "defect-fast"

# ---------------------------------------------------------------------------------------------
# Errors and the main() boundary
# ---------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake in the user's input or arguments: reported as one line, exit status 2.

    The message must say what was wrong and name the file or argument (and, where it helps,
    what to do instead). Subclasses: :class:`UsageError`, :class:`OutputRefused`,
    :class:`RunInUse`, :class:`DigestError`, :class:`DeviceError`;
    :class:`defect_fast.data.DataError` is one too.
    """


class UsageError(UserError):
    """A bad command line (unknown option, bad value, missing argument)."""


class Stopped(UserError):
    """A command stopped by a signal (``signum``: SIGINT for Ctrl-C, SIGTERM for a service
    manager's stop) after keeping its work, the message saying how to continue (a training's
    ``--resume``). :func:`run_main` prints it as ``<prog>: <message>``, not as an error, and
    returns 128 + ``signum`` (130, 143): a stop, not the status 2 of a user's mistake."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class OutputRefused(UserError):
    """An output path that cannot be written without risking the user's files."""


class RunInUse(UserError):
    """The run folder is locked by another living process (see :class:`RunLock`)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class DigestError(UserError):
    """A saved file is damaged (digest mismatch), foreign, or lacks the expected content."""


class DeviceError(UserError):
    """A ``--device`` this torch or this machine cannot provide."""


#: OSError numbers that are the user's situation rather than a bug (reported in one line).
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, getattr(errno, "EDQUOT", errno.ENOSPC),
                errno.EFBIG}
#: ... and those that are when they name a path: a name a file system does not take (a ':' on
#: a FAT or SMB share: EINVAL), a failing disk or a lost network mount (EIO).
_USER_ERRNOS_ON_A_PATH = {errno.EINVAL, errno.EIO}


def short_stem(stem: str, limit: int) -> str:
    """A file name's ``stem`` as it is when it fits in ``limit`` UTF-8 bytes; else its first
    characters that do and 8 hex digits of its SHA-256, so two long stems that begin alike still
    differ (a file name is at most 255 bytes, and the temporaries written beside it add more)."""
    raw = os.fsencode(stem)
    if len(raw) <= limit:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:8]
    head = raw[:limit - 9].decode("utf-8", "ignore")  # whole characters only
    return f"{head}~{digest}"


#: The longest stem (UTF-8 bytes) of an image's output files: "<stem>_overlay.png" and the
#: temporary written beside it (".<name>.<8 characters>.tmp") stay within 255 bytes.
MAX_OUTPUT_STEM = 200


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for the outputs of ``paths`` (``<stem>_map.png``, ``<stem>_overlay.png``),
    unique: clashing names get their folder (and if need be a number: :func:`unique_names`) in
    front; a stem longer than :data:`MAX_OUTPUT_STEM` bytes is shortened by :func:`short_stem` (an
    image's legal name of 250 bytes made a map name the file system refuses)."""
    stems = [short_stem(p.stem, MAX_OUTPUT_STEM) for p in paths]
    clashes = {s for s in stems if stems.count(s) > 1}
    return unique_names([short_stem(f"{p.parent.name}_{p.stem}", MAX_OUTPUT_STEM) if s in clashes else s
                         for p, s in zip(paths, stems)], own=[s not in clashes for s in stems])


def unique_names(names: Sequence[str], own: Sequence[bool] | None = None) -> list[str]:
    """``names`` made unique, case-blind as some file systems are: a name only one entry has is
    kept; of the entries that share one, the first whose name is its ``own`` (not made up: no folder
    put in front of it, no character replaced) keeps it, else the first, and the others get ``_2``,
    ``_3``... after it, never a name another entry has as it is (``x_2.png``'s map was named after
    the second ``x.png``, and ``x_2.png`` got ``x_2_2``)."""
    own = [True] * len(names) if own is None else list(own)
    counts: dict[str, int] = {}
    for n in names:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    taken = {n.lower() for n in names if counts[n.lower()] == 1}
    out = list(names)
    for i in sorted(range(len(names)), key=lambda i: not own[i]):  # (stable: in their order otherwise)
        base = names[i]
        if counts[base.lower()] == 1:
            continue
        name, k = base, 1
        if name.lower() in taken:  # a number: not given yet, nor any entry's name ("x", "x", "x_2", "x_2")
            while name.lower() in taken or name.lower() in counts:
                k += 1
                name = f"{base}_{k}"
        taken.add(name.lower())
        out[i] = name
    return out


# control characters other than tab and newline (C0, DEL, C1), which a file's name may hold
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str, newlines: bool = True) -> str:
    """``text`` with every control character but tab and newline (and with ``newlines=False``,
    newline too: a line that must stay one) written as an escape (``\\x1b``): a file named with a
    terminal's escape sequences or a carriage return, printed in a message or a log line, would
    otherwise redraw the terminal or overwrite the line it is on."""
    return (_CONTROL if newlines else _CONTROL_OR_NEWLINE).sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str) -> str:
    """Collapse a message to one line: its first line, then the other lines joined with "; " (a
    torch error's C++ backtrace, "Exception raised from ... frame #0 ...", left out); control
    characters written as escapes (:func:`printable`)."""
    text = printable(str(text).replace("\r\n", "\n"))  # (a Windows tool's line ends are line ends)
    lines = [ln.strip() for ln in text.split("\nException raised from ", 1)[0].splitlines() if ln.strip()]
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0]} {'; '.join(lines[1:])}"


#: The dependencies a command imports when it needs them, by module name: their pip names.
_DEPENDENCIES = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn", "tqdm": "tqdm",
                 "scipy": "scipy", "watchdog": "watchdog", "matplotlib": "matplotlib", "onnx": "onnx",
                 "onnxruntime": "onnxruntime"}


def _user_message(exc: BaseException, user_errors: tuple[type[BaseException], ...]) -> str | None:
    """The one-line message for a user-facing error, or None if ``exc`` is treated as a bug."""
    if isinstance(exc, (UserError, argparse.ArgumentTypeError) + tuple(user_errors)):
        return one_line(str(exc)) or type(exc).__name__
    top = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if top in _DEPENDENCIES:  # an install without the dependencies (pip --no-deps), not a bug
        return one_line(f"the Python package {_DEPENDENCIES[top]} is missing or incomplete ({exc}), and this command "
                        f"needs it; install it (pip install {_DEPENDENCIES[top]})")
    if isinstance(exc, OSError) and (exc.errno in _USER_ERRNOS
                                     or (exc.errno in _USER_ERRNOS_ON_A_PATH and exc.filename is not None)):
        # FileNotFoundError, PermissionError, IsADirectoryError, ... on a path the user gave.
        what = exc.strerror or type(exc).__name__
        if exc.filename is not None and exc.filename2 is not None:
            return one_line(f"{exc.filename} -> {exc.filename2}: {what}")
        if exc.filename is not None:
            return one_line(f"{exc.filename}: {what}")
        return one_line(str(exc)) or what
    return None


def run_main(fn: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None, *,
             debug: bool | None = None, user_errors: Iterable[type[BaseException]] = (),
             prog: str = PROG, stderr=None) -> int:
    """Call ``fn(argv)`` and turn what escapes it into an exit status.

    - returns ``fn``'s result (None -> 0);
    - :class:`UserError` (any subclass), :class:`argparse.ArgumentTypeError`, the types in
      ``user_errors`` (e.g. the CLI passes its ``RunError``), and an :class:`OSError` such as
      ``FileNotFoundError``/``PermissionError``/``IsADirectoryError``/``ENOSPC``, and a
      dependency that is not installed (:class:`ModuleNotFoundError` of matplotlib, say): one line
      ``<prog>: error: <message>`` on stderr, exit status 2 (with ``debug`` the traceback is
      printed first);
    - ``KeyboardInterrupt``: ``<prog>: interrupted`` and 130; :class:`Stopped` (a stop that kept
      the command's work): ``<prog>: <message>`` and 128 + its signal's number;
    - ``SystemExit`` passes through (``--help`` exits 0);
    - an allocation that failed (:class:`MemoryError`, torch's CPU allocator or a GPU out of
      memory): one line ``<prog>: error: out of memory (...)``, exit status 1;
    - anything else is a bug: its traceback is printed, then one ``<prog>: internal error`` line
      asking for a report; exit status 1.

    Args:
        fn: the command, called with ``argv`` (``sys.argv[1:]`` when None).
        debug: print tracebacks of user errors too; None reads ``--debug`` in ``argv`` or the
            environment variable ``DEFECT_FAST_DEBUG=1``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # a reader that goes away (`| head`) must not stop a command before it has written its files
    saved = sys.stdout, sys.stderr
    # (a stream closed at start is None: print() to it does nothing, and it stays so)
    guarded = tuple(_ClosedReaderSafe(s) if s is not None else None for s in saved)
    sys.stdout, sys.stderr = guarded
    try:
        return _run_main(fn, argv, debug, user_errors, prog, stderr if stderr is not None else sys.stderr)
    finally:  # given back as found (unless the command replaced them itself), flushed through the
        # guard first: what is still buffered would meet the closed pipe at exit (status 120)
        for g in guarded:
            if g is not None:
                g.flush()
        if sys.stdout is guarded[0]:
            sys.stdout = saved[0]
        if sys.stderr is guarded[1]:
            sys.stderr = saved[1]


class _ClosedReaderSafe:
    """A text stream whose writes go nowhere once its reader has gone (a pipe closed early:
    BrokenPipeError), instead of raising in whatever print the command was at."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def _closed_reader(self) -> None:
        self._gone = True
        try:  # the interpreter flushes the stream once more at exit: let that go nowhere too
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed_reader()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed_reader()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def allocation_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory could not be allocated: a MemoryError, or torch's
    RuntimeError for it ("... alloc...", a GPU's torch.OutOfMemoryError, or "Storage size
    calculation overflowed": a size past 2**63 bytes)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                            and any(w in str(exc) for w in ("alloc", "overflow")))


def _out_of_memory(exc: BaseException) -> str | None:
    """What an allocation that failed asked for, by the allocators' own words (numpy's MemoryError,
    torch's CPU allocator on POSIX, Windows and Android, a size past any limit, a GPU's
    torch.OutOfMemoryError or Apple MPS's RuntimeError), or None for any
    other exception. Stricter than :func:`allocation_failed`, which judges an exception caught
    around an allocation: at the command's boundary, a message that merely holds "alloc" or
    "overflow" (a path, a half-precision overflow) is no shortage of memory."""
    text = one_line(str(exc))
    if isinstance(exc, MemoryError):
        return text or type(exc).__name__
    if not isinstance(exc, RuntimeError):
        return None
    # the CPU allocator's words on POSIX, and on Windows and Android
    found = re.search(r"(?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes", text)
    if found:
        return f"an allocation of {int(found.group(1)) / 2**30:.3g} GiB failed"
    # a GPU's ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ..."; Apple's MPS says it in a RuntimeError)
    if type(exc).__name__ == "OutOfMemoryError" or text.startswith("MPS backend out of memory"):
        return ". ".join(text.split(". ")[:2])
    if text.startswith("Storage size calculation overflowed"):
        return text
    return None


def _run_main(fn, argv, debug, user_errors, prog, err) -> int:
    if debug is None:
        debug = "--debug" in argv or os.environ.get("DEFECT_FAST_DEBUG", "") not in ("", "0")
    try:
        status = fn(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc(file=err)
        print(f"{prog}: interrupted", file=err)
        return 130
    except SystemExit:
        raise
    except Stopped as exc:
        if debug:
            traceback.print_exc(file=err)
        print(f"{prog}: {one_line(str(exc)) or 'stopped'}", file=err)
        return 128 + exc.signum
    except BaseException as exc:  # noqa: BLE001 - this is the boundary
        message = _user_message(exc, tuple(user_errors))
        shortage = _out_of_memory(exc) if message is None else None
        if shortage is not None:  # the machine's limit, not a bug: said in one line
            if debug:
                traceback.print_exc(file=err)
            print(f"{prog}: error: out of memory ({shortage}): the job needs more memory than this machine "
                  "has free; give it fewer images at once, or run it where more memory is free", file=err)
            return 1
        if message is None:
            traceback.print_exc(file=err)
            print(f"{prog}: internal error ({type(exc).__name__}); this is a bug, please report it "
                  "with the traceback above", file=err)
            return 1
        if debug:
            traceback.print_exc(file=err)
        print(f"{prog}: error: {message}", file=err)
        return 2
    return 0 if status is None else int(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse parser whose errors raise :class:`UsageError` (one line) instead of printing
    the usage block and exiting; sub-parsers made with ``add_subparsers`` inherit it. A negative
    number in scientific notation (``--threshold -1e-3``) is taken as a value, as argparse takes
    ``-0.001``, not as an unknown option ("expected one argument")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{one_line(message)} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, but for arguments no parser knows: said with the help of the command they
        were given to ('defect-fast train --help'), where argparse names the top-level one."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            target: argparse.ArgumentParser = self
            given = list(sys.argv[1:] if args is None else args)
            for action in self._actions:
                command = getattr(namespace, action.dest, None) if isinstance(action, argparse._SubParsersAction) else None
                if command in given and all(x not in given[:given.index(command)] for x in extras):  # after it
                    target = action.choices.get(command, self)
            target.error(f"unrecognized arguments: {' '.join(x for x in extras if x != '--')}")
        return namespace


# ---------------------------------------------------------------------------------------------
# Argument types (argparse ``type=``); each raises ArgumentTypeError with the reason
# ---------------------------------------------------------------------------------------------


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


#: The largest value of torch's sizes and counts (int64).
INT64_MAX = 2**63 - 1


def positive_int(text: str) -> int:
    """A whole number >= 1 (``--epochs``, ``--batch-size``, ``--checkpoint-every``...)."""
    v = _int(text, "a whole number >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    if v > INT64_MAX:  # no size or count of torch's reaches it: refused here, not by a TypeError inside
        raise argparse.ArgumentTypeError(f"must be a whole number below 2**63, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """A whole number >= 0 (``--seed``...)."""
    v = _int(text, "a whole number >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return v


def finite_float(text: str) -> float:
    """Any real number except NaN and +-infinity (``--threshold``...)."""
    v = _float(text, "a number")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (``--lr``...)."""
    v = _float(text, "a number > 0")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (``--smooth``...)."""
    v = _float(text, "a number >= 0")
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def rate(text: str) -> float:
    """A rate strictly between 0 and 1 (``--far``)."""
    v = positive_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    if v < sys.float_info.min:  # 1/far, the images it needs, would overflow
        raise argparse.ArgumentTypeError(f"must be at least {sys.float_info.min:.3g}, got {text!r}")
    return v


def add_threshold_options(parser: argparse.ArgumentParser, flagged: str = "is flagged") -> None:
    """``--threshold T`` or ``--far RATE`` (one of them): the image threshold a command judges by,
    given as a score or set for a false-alarm rate from the run's held-back scores."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=finite_float, default=None,
                       help=f"image score above which an image {flagged} (default: the threshold stored in the model file)")
    group.add_argument("--far", type=rate, default=None, metavar="RATE",
                       help="instead, the threshold for this false-alarm rate, set from the defect-free images the run "
                       "held back (e.g. 0.05 with 60 of them: the 3rd highest score; default: the stored threshold, set for "
                       "the rate asked at training or by defect-fast calibrate)")


@contextlib.contextmanager
def far_errors(run, far: float | None):
    """Around what sets the threshold for ``--far``: a rate the run's held-back scores cannot give
    (too few images, an older model file) becomes one line naming the option and the run."""
    from .calibration import CalibrationError

    try:
        yield
    except CalibrationError as exc:
        if far is None:
            raise
        raise UsageError(f"--far {far:g}: {run}: {exc}") from None


def probability(text: str) -> float:
    """A number in [0, 1]."""
    v = _float(text, "a number in [0, 1]")
    if not (0.0 <= v <= 1.0):  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return v


def input_path(text: str) -> str:
    """A file or folder to read (a run, DATA, images), with a leading ``~`` or ``~user`` expanded
    as a shell would: one not expanded before (a quoted one, a service's unit file, a program's
    argument list) named a folder called "~", as only ``train`` did not. Where such a folder
    exists here (made by an earlier version: a watch's journal, a run), the path is refused as
    naming both, not taken for the home folder's without a word (a watch would start a new
    journal and judge its images again)."""
    text = str(text)
    expanded = os.path.expanduser(text)
    if expanded != text and os.path.lexists(text) and os.path.realpath(text) != os.path.realpath(expanded):
        raise argparse.ArgumentTypeError(
            f"{text} names both {os.path.abspath(text)} (in a folder named {text.split('/')[0]} here, as earlier "
            f"versions read it) and {expanded}; move or rename the one you do not mean, or give the full path")
    return expanded


def output_path(text: str) -> str:
    """A file or folder name to write (``--out``, ``--json``): not empty (an empty name would be
    the current folder, or nothing written at all); a leading ``~`` expanded (:func:`input_path`:
    else a folder named "~" was made in the current one)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"must name a file or folder, got {text!r}")
    return input_path(text)


def check_device(spec: str) -> "torch.device":  # noqa: F821 - torch imported lazily
    """Resolve ``--device`` to a usable ``torch.device``, or say why it cannot be used.

    Accepts ``auto`` (CUDA device 0 when one is visible, else CPU), ``cpu``, ``cuda`` and
    ``cuda:N``.

    Raises:
        DeviceError: unknown name ("unknown device 'gpu'; use auto, cpu, cuda or cuda:N"), a CUDA
            request on a torch without a CUDA build ("this torch has no CUDA build ..."), no
            usable CUDA device, or an index beyond the visible devices ("no CUDA device 3; 1
            visible").
    """
    import torch

    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    index: int | None = None
    if text == "cuda":
        pass
    elif text.startswith("cuda:") and text[5:].isdigit():
        index = int(text[5:])
    else:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if torch.version.cuda is None:
        raise DeviceError(f"--device {spec}: this torch has no CUDA build (torch {torch.__version__}); use --device cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: torch has a CUDA build but sees no usable CUDA device "
                          "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(f"--device {spec}: no CUDA device {index}; {count} visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def device_arg(text: str) -> str:
    """argparse ``type=`` form of :func:`check_device`: returns the text, checked."""
    try:
        check_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ---------------------------------------------------------------------------------------------
# Strict JSON and atomic writes
# ---------------------------------------------------------------------------------------------


def _strict(obj: Any, nan: str, where: str) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nan == "raise":
            raise ValueError(f"{where or 'value'}: {obj} cannot be written as standard JSON")
        return None
    if isinstance(obj, Mapping):
        return {k: _strict(v, nan, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, nan, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist):
        return _strict(tolist(), nan, where)
    raise TypeError(f"{where or 'value'}: {type(obj).__name__} is not JSON serialisable")


def dump_json_strict(obj: Any, *, nan: str = "null", indent: int | None = 2, **kwargs) -> str:
    """``json.dumps`` that always yields standard JSON.

    NaN and +-infinity become ``null`` (``nan="null"``, the default: e.g. a metric undefined for
    one class) or raise ValueError naming the key (``nan="raise"``). Tuples become lists, paths
    strings, numpy/torch scalars Python numbers. The result passes ``json.loads`` in any strict
    parser (it was produced with ``allow_nan=False``).
    """
    if nan not in ("null", "raise"):
        raise ValueError(f"nan must be 'null' or 'raise', got {nan!r}")
    return json.dumps(_strict(obj, nan, ""), allow_nan=False, indent=indent, **kwargs)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: The errors of a write itself (full disk or quota, file too large, I/O error, read-only file system).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, replace: bool = True, unlisted: bool = False,
                **kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success fsync and rename it over
    ``path``, on an exception remove it (``path`` is then untouched). Parent folders are created.

    ``replace=False``: the file only takes the name if nothing is there when it is complete
    (:func:`_take_name`: a hard link, atomic); a file that appeared there meanwhile (another
    process's, made after the caller checked the name) is kept and FileExistsError, naming
    ``path``, raised. A command told not to replace an output checks the name before its work and
    writes with ``replace=False``, so that no writer finishing during the work is replaced.
    ``unlisted`` (always so with ``replace=False``): a name another command's output folder lists
    by then (one it reserved during the work, and would write over this file) is refused,
    :class:`OutputRefused`; for the single-file outputs, never for an output folder's own files.
    Such a write, once in place, also removes the temporaries of ``path`` that writes killed
    midway left (``kill -9``), untouched for :data:`STALE_TEMPORARY_SECONDS` (no writer is alive
    in them; an output folder removes its own under its lock).

    Usage: ``with atomic_open(p) as fh: torch.save(obj, fh)``.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode must contain 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # named by the file asked for, not by the temporary name it never got
        raise OSError(exc.errno, f"cannot create a file in {path.parent} ({exc.strerror})", str(path)) from None
    try:
        if hasattr(os, "fchmod"):  # (not on Windows before Python 3.13: no such modes there)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        fh = os.fdopen(fd, mode, **kwargs)
        try:
            try:
                yield fh
            except OSError as exc:  # a write that filled the disk names no file either: this one's
                if exc.filename is not None or exc.errno not in _WRITE_ERRNOS:
                    raise
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
            try:  # a full disk often shows only here, in an error that names no file
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            except OSError as exc:
                if exc.filename is not None:
                    raise
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        finally:
            if not fh.closed:  # after a failure: closed quietly (its flush would fail again and hide it)
                with contextlib.suppress(OSError):
                    fh.close()
        try:
            if not replace and os.path.lexists(path):  # (said as such, not as the listing below)
                raise FileExistsError(errno.EEXIST, "exists", str(path))
            if unlisted or not replace:
                owner = _listed_by_output_folder(path, unreadable=False)
                if owner is not None:  # reserved by a command that started meanwhile: it would replace this file
                    why = owner if os.path.lexists(path) else _not_there(owner)
                    raise OutputRefused(f"{path}: {why}; not written, choose another name")
            if replace:
                os.replace(tmp, path)
            else:
                _take_name(Path(tmp), path)
        except OSError as exc:  # named by the file asked for (the temporary's name puzzles)
            if isinstance(exc, FileExistsError):
                raise FileExistsError(errno.EEXIST, "a file appeared there while this one was written", str(path)) \
                    from None
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        # a removal that fails too (no permission left in the folder) must not hide why the write failed
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    if unlisted or not replace:
        _remove_stale_temporaries(path)


#: How long a temporary file of :func:`atomic_open`'s stays untouched before a later write of the
#: same file takes it for one a killed process left, and removes it (a live writer writes on).
STALE_TEMPORARY_SECONDS = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` (``.<name>.<8 characters>.tmp`` beside it, plain files)
    untouched for :data:`STALE_TEMPORARY_SECONDS`: a save killed midway leaves one each time."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(f".{path.name}.") or not _temporary_of(Path(entry.path), path.name):
            continue
        with contextlib.suppress(OSError):  # (gone meanwhile)
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_SECONDS:
                os.unlink(entry.path)


#: results file asked for -> the file this process writes them to (:func:`write_results_text`)
_RESULTS_FILES: dict[Path, Path] = {}


def is_same_file(path: str | os.PathLike, st: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``st`` was taken of (``os.path.samestat``: the same device
    and inode); False where nothing is there now."""
    try:
        return os.path.samestat(os.stat(path), st)
    except OSError:
        return False


def _take_name(tmp: Path, target: Path) -> None:
    """``tmp`` under the name ``target``, refused (FileExistsError) where that name exists: by a
    hard link (atomic), else, on a file system without them, an exclusive create and a rename."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        placeholder = os.fstat(fd)
        os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:  # the empty placeholder is this process's: not left as the output
            if is_same_file(target, placeholder):
                with contextlib.suppress(OSError):
                    os.unlink(target)
            raise
    else:
        os.unlink(tmp)


def write_results_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as the results asked for at ``path`` (the benchmarks' and experiments' JSON), whole;
    returns the file written.

    The file is ``path`` itself, unless a file was there before this process first wrote to it
    (another run's results, committed ones); then the first free ``<stem>-<n><suffix>`` beside
    it, said once on stderr. The process's later writes to ``path`` replace that same file. The
    text goes to a temporary of this process first, which then takes the name: by a hard link
    (atomic, refused where the name exists, so two processes starting together never take one
    name), else by an exclusive create and a rename; a writer stopped before leaves no file under
    the name (a reader, or the next run, would take an empty one for results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.absolute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        if key in _RESULTS_FILES:
            os.replace(tmp, _RESULTS_FILES[key])
            return _RESULTS_FILES[key]
        target, n = path, 1
        while True:
            try:
                _take_name(tmp, target)
                break
            except FileExistsError:
                n += 1
                target = path.with_name(f"{path.stem}-{n}{path.suffix}")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if target != path:
        print(f"{path} holds earlier results, kept: these go to {target} (move it over {path.name} to "
              "replace them)", file=sys.stderr)
    _RESULTS_FILES[key] = target
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True, unlisted: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename; with
    ``replace=False`` never over a file that is there by then, ``unlisted``: :func:`atomic_open`)."""
    with atomic_open(path, "wb", replace=replace, unlisted=unlisted) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", *, replace: bool = True,
                      unlisted: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding), replace=replace, unlisted=unlisted)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, nan: str = "null", indent: int | None = 2,
                      replace: bool = True, unlisted: bool = False) -> Path:
    """Write ``obj`` as strict JSON (:func:`dump_json_strict`) to ``path`` atomically."""
    return atomic_write_text(path, dump_json_strict(obj, nan=nan, indent=indent) + "\n", replace=replace,
                             unlisted=unlisted)


# ---------------------------------------------------------------------------------------------
# Outputs versus inputs
# ---------------------------------------------------------------------------------------------


def real_path(p: str | os.PathLike, *, expand_user: bool = False) -> Path:
    """Where ``p`` really is (absolute, symlinks and '..' resolved; ``~`` expanded only with
    ``expand_user``, for paths that are then read as expanded). A loop of symbolic links, or a
    ``~user`` that names no user, is a :class:`UsageError` naming the path (``Path.resolve``
    raises RuntimeError for both on some Pythons, OSError on others)."""
    try:
        q = Path(p).expanduser() if expand_user else Path(p)
        return Path(os.path.abspath(q)).resolve()
    except RuntimeError as exc:
        what = "names no user on this machine" if "home directory" in str(exc) else "is a loop of symbolic links"
        raise UsageError(f"{p}: {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{p}: is a loop of symbolic links") from None
        raise


def _resolved(p: str | os.PathLike) -> Path:
    # no ~ expansion: the writers and readers open the path as given (the shell expands ~)
    return real_path(p)


def _show(p: str | os.PathLike) -> str:
    """The path as given, plus where it really is when that differs (symlinks, '..')."""
    given = str(p)
    real = str(_resolved(p))
    return given if os.path.abspath(given) == real else f"{given} (= {real})"


def _with_their_output_folders(inputs: Iterable[str | os.PathLike | None]) -> list[str | os.PathLike]:
    """``inputs`` (None left out), each input file that lies in a folder defect-fast wrote (a run's
    model.pt given in place of the run) followed by that folder: the folder is what it reads."""
    out: list[str | os.PathLike] = []
    for inp in inputs:
        if inp is None:
            continue
        out.append(inp)
        parent = Path(inp).parent
        if Path(inp).is_file() and (parent / MANIFEST_NAME).is_file():
            out.append(parent)
    return out


def check_out_not_overlapping(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *,
                              what: str = "--out") -> None:
    """Refuse an output path that is, contains, or lies inside any input path.

    Paths are compared after resolving symlinks and ``..`` (existing or not); inputs may be
    files or folders, and an input file in a folder defect-fast wrote (``RUN/model.pt``) counts
    that folder as an input too. Touches nothing.

    Raises:
        OutputRefused: one line naming ``what``, the output and the input.
    """
    o = _resolved(out)
    inputs = _with_their_output_folders(inputs)
    for inp in inputs:
        relation = _overlap(o, _resolved(inp))
        if relation is not None:
            raise OutputRefused(f"{what} {_show(out)} {relation} the input {_show(inp)}; choose an output outside the "
                                "inputs (nothing was written)")
    # what an input folder reads through its links (a class folder linked from elsewhere)
    for inp in inputs:
        if not Path(inp).is_dir():
            continue
        for link, target in _links_under(Path(inp)):
            relation = _overlap(o, target)
            if relation is not None:
                raise OutputRefused(f"{what} {_show(out)} {relation} {target}, which the input {inp} reads through the "
                                    f"link {link}; choose an output outside the inputs (nothing was written)")


def _overlap(o: Path, i: Path) -> str | None:
    """How resolved output ``o`` overlaps resolved input ``i`` ("is", "lies inside", "contains"), or None."""
    if o == i:
        return "is"
    if i in o.parents:
        return "lies inside"
    if o in i.parents:
        return "contains"
    return None


#: How deep :func:`_links_under` looks below an input folder: the files of DATA/test/<class>/,
#: what the deepest reader (the MVTec layout's) reads.
LINK_DEPTH = 3
#: Folders :func:`_links_under` lists at most per input (a link into a large tree is not walked whole).
LINK_FOLDERS = 2000


def _links_under(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(link, its resolved target) for every symbolic link down to :data:`LINK_DEPTH` levels under
    ``folder`` (an entry of the folder is level 1), through linked folders too, each real folder
    once and :data:`LINK_FOLDERS` at most; what cannot be listed or resolved (a link loop) is passed over."""
    seen: set[Path] = set()
    stack = [(folder, 1)]
    while stack and len(seen) < LINK_FOLDERS:
        d, depth = stack.pop()
        try:
            real = real_path(d)
            if real in seen:
                continue
            seen.add(real)
            entries = list(os.scandir(d))
        except (OSError, UserError):
            continue
        for e in entries:
            try:
                if e.is_symlink():
                    target = real_path(e.path)
                    yield Path(e.path), target
                    if depth < LINK_DEPTH and target.is_dir():
                        stack.append((Path(e.path), depth + 1))
                elif depth < LINK_DEPTH and e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), depth + 1))
            except (OSError, UserError):  # a loop of links, a link that cannot be resolved: not read either
                continue


def safe_output_file(path: str | os.PathLike, overwrite: bool, *, inputs: Iterable[str | os.PathLike] = (),
                     what: str = "output file", flag: str = "--overwrite") -> Path:
    """Check that a single output file (e.g. ``--json``) may be written; leaves nothing behind
    (a file created to see that one can be is removed at once).

    Refused: an existing folder at ``path``; an existing file without ``overwrite``; a device,
    pipe or socket, or a link to one (``/dev/stdout``), even with ``overwrite`` (the write would
    put a plain file in its place); a symbolic link, even with ``overwrite`` (the same: the
    link would be replaced, not its target); a path that is or lies inside one of ``inputs`` (even with
    ``overwrite``); a parent that is not a folder; a name another command's output folder lists
    (its file, or one it has reserved and not written yet), even with ``overwrite``, and an
    existing file below a manifest that cannot be read. Write with :func:`atomic_open`'s
    ``replace=False`` where ``overwrite`` is not given: it checks the name again as it takes it.
    ``flag`` is how the caller says overwrite in the message ("overwrite=True" in Python).

    Returns:
        ``path`` as a Path (write it with :func:`atomic_write_json` & co.).
    Raises:
        OutputRefused: one line naming the file and what to do.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or os.path.basename(text) in (".", ".."):  # Path() would drop it: a file named like the folder
        raise OutputRefused(f"{what} {path}: names a folder; give a file name")
    p = Path(path)
    longest = _name_max(p.parent) - _TEMPORARY_EXTRA
    if len(os.fsencode(p.name)) > longest:  # else refused by the file system after the work, at the write
        raise OutputRefused(f"{what} {p}: its name is {len(os.fsencode(p.name))} bytes long; at most {longest} fit "
                            "(it is written through a temporary file named after it); give a shorter name")
    check_out_not_overlapping(p, inputs, what=what)
    if p.is_dir():
        raise OutputRefused(f"{what} {p}: is a folder; give a file name")
    if p.exists() and not p.is_file():  # a device, pipe or socket (or a link to one: /dev/stdout)
        raise OutputRefused(f"{what} {p}: is not a regular file (a device, pipe or socket, or a link to one), which "
                            "is never replaced, not even with " + flag + "; give a file name")
    if p.is_symlink():  # the write renames a new file over the link: the link would go, its target stay
        raise OutputRefused(f"{what} {p}: is a symbolic link (to {os.readlink(p)}), which is never replaced, not "
                            f"even with {flag}; give the file's own path or another name")
    if p.exists():
        if not overwrite:
            raise OutputRefused(f"{what} {p}: file exists; pass {flag} to replace it or choose another name")
        owner = _listed_by_output_folder(p)
        if owner is not None:  # another command's output (a run's model.pt, a journal): not this one's to replace
            raise OutputRefused(f"{what} {p}: {owner}, which {flag} never replaces; choose another name")
    else:
        # a name another command's folder lists but has not written yet (predict's scores.json while
        # it works), or whose file was removed: that command writes it (or its --overwrite clears it)
        owner = _listed_by_output_folder(p, unreadable=False)
        if owner is not None:
            raise OutputRefused(f"{what} {p}: {_not_there(owner)}; choose another name")
    _check_where_it_goes(p, what)
    return p


def _not_there(owner: str) -> str:
    """Why a name not there now is refused, for ``owner`` (a :func:`_listed_by_output_folder` text)."""
    return (f"{owner} (not written yet, or removed since): that command writes it, and its --overwrite clears it, "
            "so it is not this one's to take")


#: Bytes :func:`atomic_open`'s temporary name adds to a file's (".<name>.<8 characters>.tmp").
_TEMPORARY_EXTRA = 14


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or of the nearest existing
    folder above it) takes; 255 where it does not say."""
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            try:
                return int(os.pathconf(parent, "PC_NAME_MAX"))
            except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or not said
                return 255
    return 255


def _listed_by_output_folder(p: Path, *, unreadable: bool = True) -> str | None:
    """Why ``p`` belongs to an :class:`OutputFolder` above it (listed in its manifest, or the
    manifest or lock itself, or, with ``unreadable``, below a manifest that cannot be read); None
    when it does not."""
    p = Path(os.path.realpath(p.parent)) / p.name  # where the write lands ("link/../run" is not "run" beside link)
    for folder in p.parents:
        if not (folder / MANIFEST_NAME).is_file():
            continue
        try:
            files = _manifest(folder).get("files", [])
        except (OSError, ValueError) as exc:  # what it lists is unknown: nothing below it is replaced
            if not unreadable:
                continue
            return f"lies in {folder}, whose {MANIFEST_NAME} cannot be read ({exc})"
        if (folder == p.parent and p.name in _OWN) or p.relative_to(folder).as_posix() in files:
            return f"is part of the output of 'defect-fast {OutputFolder.written_by(folder) or 'another command'}' in {folder}"
    return None


def _check_where_it_goes(p: Path, what: str) -> None:
    """Refuse an output whose nearest existing folder above it (or itself, for an existing
    folder) is not a folder, or one this process may not create entries in: said before any
    work, where the first mkdir or write would fail after it. The permission bits are not
    enough: root passes them where nothing can be created (``/proc``, a read-only mount), so a
    file is created there and removed at once."""
    for parent in (p, *p.parents):
        if parent == p and not p.is_dir():
            continue
        if parent.exists():
            if not parent.is_dir():
                raise OutputRefused(f"{what} {p}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputRefused(f"{what} {p}: " + (f"cannot create files in {parent} (read-only file system)"
                                                       if _read_only(parent) else f"no permission to write in {parent}"))
            try:
                _probe(parent)
            except OSError as exc:
                raise OutputRefused(f"{what} {p}: cannot create files in {parent} "
                                    f"({exc.strerror or type(exc).__name__})") from None
            return


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only (where a permission is not
    what is missing: no one can write there)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): said as a permission
        return False


#: Names of the files :func:`_probe` creates (where a file system has no unnamed ones).
_PROBE_PREFIX = ".defect_fast-probe-"


def _probe(folder: Path) -> None:
    """Create a file in ``folder`` and remove it (OSError when none can be created): an unnamed
    one (``O_TMPFILE``: nothing appears in the folder), else a named one, removed whatever comes
    (one left would be another's file to the next check of the folder)."""
    if hasattr(os, "O_TMPFILE"):
        try:
            os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no unnamed files there
                raise
    fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    os.close(fd)
    with contextlib.suppress(OSError):  # a share that lets files be made, not removed: what it makes stays
        os.unlink(probe)


# ---------------------------------------------------------------------------------------------
# Output folders with a manifest
# ---------------------------------------------------------------------------------------------

#: Marker file of a folder written by defect-fast: JSON listing every file and folder it wrote.
MANIFEST_NAME = ".defect_fast-manifest.json"
#: Lock file of a run folder (see :class:`RunLock`); never listed, never removed while held.
LOCK_NAME = ".defect_fast.lock"
_MANIFEST_FORMAT = "defect_fast-output-manifest"
_OWN = {MANIFEST_NAME, LOCK_NAME}
# what the manifests written before they named their command list: a run's files, a watch journal
_RUN_FILES = ("model.pt", "checkpoint.pt")
_JOURNAL_FILE = "results.jsonl"
#: Commands that take no --overwrite (their refusals do not mention it).
_WITHOUT_OVERWRITE = {"watch"}


def _unfinished(folder: Path) -> str:
    """" (unfinished: ...)" when files ``folder``'s manifest lists are missing (a command stopped
    before it wrote them all: killed, or a power loss), else ""."""
    try:
        files = _manifest(folder).get("files", [])
    except (OSError, ValueError):
        return ""
    if OutputFolder.written_by(folder) == "train" and (folder / "model.pt").is_file():
        return ""  # a finished run removes its checkpoint (still listed)
    missing = sum(1 for f in files if not os.path.lexists(folder / f))
    return (f" (unfinished: {missing} of the {len(files)} files it lists {'is' if missing == 1 else 'are'} missing, "
            "as a command stopped before it wrote them leaves it, or removed since)") if missing else ""


def link_on_the_way(root: Path, rel: str | os.PathLike, with_last: bool = True) -> Path | None:
    """The first path between ``root`` and ``root/rel`` (``root/rel`` itself too, with
    ``with_last``) that is a symbolic link, or None: a folder a tool writes into, or moves files
    into, that is a link has them land in its target, outside ``root``."""
    parts = Path(rel).parts
    for i in range(1, len(parts) + (1 if with_last else 0)):
        step = Path(root).joinpath(*parts[:i])
        if step.is_symlink():
            return step
    return None


def read_own_json(path: Path) -> Any:
    """The JSON a command wrote and reads back (a manifest, predict's scores.json). OSError where
    ``path`` is no regular file: opened without blocking and checked on the handle (a FIFO put in
    its place made the command wait for ever, a link to /dev/zero read until memory ran out);
    ValueError where it is no JSON (UnicodeDecodeError is one; nesting too deep for the parser)."""
    refused = OSError(errno.EINVAL, "not a regular file (a device, pipe or socket, or a link to one)", str(path))
    with _open_regular(path, refused) as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply to be one this tool wrote") from None


def _manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest, checked: our format, its "files" and "dirs" lists of strings.
    Raises OSError (none, unreadable) or ValueError (damaged; the message says how)."""
    data = read_own_json(folder / MANIFEST_NAME)
    if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
        raise ValueError("unknown format")
    entries = [data.get("files", []), data.get("dirs", [])]
    if not all(isinstance(e, list) and all(isinstance(x, str) for x in e) for e in entries):
        raise ValueError("entries are not strings")
    return data


#: The name of a temporary :func:`atomic_open` writes a file to: ``.<name>.<8 characters>.tmp``.
_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", re.DOTALL)


def _temporary_name(entry: Path) -> str | None:
    """The name of the file ``entry`` is a temporary :func:`atomic_open` writes to
    (``.<name>.<8 characters>.tmp``, a plain file), e.g. one a process killed in the write left;
    None when it is no such temporary."""
    m = _TEMPORARY.fullmatch(entry.name)
    return m.group(1) if m is not None and entry.is_file() and not entry.is_symlink() else None


def _temporary_of(entry: Path, name: str) -> bool:
    """Whether ``entry`` is a temporary :func:`atomic_open` writes a file ``name`` to."""
    return _temporary_name(entry) == name


def _foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` other than its manifest, its lock file and a manifest's temporary
    (a process killed inside the first manifest's write left one, and then the folder counted as a
    user's); a link named as one of those is not one: it is the user's, and counts."""
    return sorted(e.name for e in folder.iterdir()
                  if (e.name not in _OWN or e.is_symlink()) and not _temporary_of(e, MANIFEST_NAME)
                  and not (e.name.startswith(_PROBE_PREFIX) and e.is_file() and not e.is_symlink()))


class OutputFolder:
    """A folder of outputs that knows which of its files this tool wrote.

    The manifest ``MANIFEST_NAME`` in the folder lists, relative to it, every file and
    sub-folder recorded with :meth:`record` (or written through :meth:`write_bytes`,
    :meth:`write_text`, :meth:`write_json`, :meth:`open_atomic`, :meth:`mkdir`); it is rewritten
    atomically on every change. :meth:`clear` (what ``--overwrite`` does) removes only those.

    Make one with :meth:`create` (new output) or :meth:`open` (continue, e.g. ``--resume``);
    :meth:`check` runs the same refusals as :meth:`create` without touching anything, so a command
    can refuse before it reads its inputs.
    """

    def __init__(self, path: str | os.PathLike, *, created_root: bool = False, command: str | None = None):
        self.path = Path(path)
        self.created_root = created_root
        self.command = command
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self.lock: RunLock | None = None

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def written_by(path: str | os.PathLike) -> str | None:
        """The command whose output folder ``path`` is ("train", "predict", ...), from its manifest;
        for a manifest that does not name one (written by an older version), "train" when it lists
        a run's model or checkpoint and "watch" when it lists a journal; None when unknown."""
        try:
            data = _manifest(Path(path))
        except (OSError, ValueError):
            return None
        if isinstance(data.get("command"), str):
            return data["command"]
        files = set(data.get("files", []))
        if files & set(_RUN_FILES):
            return "train"
        return "watch" if _JOURNAL_FILE in files else None

    @staticmethod
    def _other_command(path: str | os.PathLike, command: str | None) -> str | None:
        """The command that wrote ``path`` when it is known and not ``command`` (None: no conflict)."""
        theirs = OutputFolder.written_by(path)
        return theirs if command is not None and theirs is not None and theirs != command else None

    @staticmethod
    def check(path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
              what: str = "--out", command: str | None = None, names: Iterable[str] = ()) -> None:
        """Raise :class:`OutputRefused` if :meth:`create` would refuse ``path``; leaves nothing behind.

        Refused: an output overlapping an input (:func:`check_out_not_overlapping`); a path that
        is a file; a non-empty folder without the manifest (even with ``overwrite``); a folder
        holding the output of another command than ``command`` (even with ``overwrite``: a
        ``predict --overwrite`` never removes a trained run or a watch journal); a folder holding
        earlier output of this command, unless ``overwrite``; a file at one of ``names`` (the
        files the command will write, relative to the folder) that the manifest does not list,
        which :meth:`reserve` would refuse only after :meth:`create` had cleared the earlier output.
        """
        p = Path(path)
        check_out_not_overlapping(p, inputs, what=what)
        if p.is_symlink() and not p.exists():
            raise OutputRefused(f"{what} {p}: is a broken symbolic link; choose another folder")
        if p.exists() and not p.is_dir():
            raise OutputRefused(f"{what} {p}: exists and is not a folder")
        _check_where_it_goes(p, what)
        if not p.exists():
            return
        others = _foreign_entries(p)
        if not others:
            return
        if not (p / MANIFEST_NAME).is_file():
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            # (watch has no --overwrite: it continues its own journal, in a folder it made)
            hint = "" if command in _WITHOUT_OVERWRITE else " (--overwrite never deletes files defect-fast did not write)"
            raise OutputRefused(
                f"{what} {p}: folder is not empty ({shown}) and was not written by defect-fast "
                f"(no {MANIFEST_NAME}); choose a new or empty folder{hint}")
        theirs = OutputFolder._other_command(p, command)
        if theirs:
            raise OutputRefused(f"{what} {p}: holds the output of 'defect-fast {theirs}', which {command} never replaces "
                                "(not even with --overwrite); choose another folder")
        # a command at work there (a start that won a race) is said so, not left output; with
        # --overwrite, before this command's work, not when it comes to clear the folder after it
        RunLock(p).check_free()
        if not overwrite:
            raise OutputRefused(f"{what} {p}: folder holds earlier defect-fast output{_unfinished(p)}; pass --overwrite "
                                "to replace it (only the files defect-fast wrote there are removed) or choose another "
                                "folder")
        names = list(names)
        if names:
            earlier = OutputFolder(p)
            earlier._read_manifest()
            earlier._refuse_unlisted(names)

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
               lock: bool = False, what: str = "--out", command: str | None = None,
               names: Iterable[str] = (), before_clear: Callable[[], None] | None = None) -> "OutputFolder":
        """Make (or, with ``overwrite``, clear) an output folder of ``command`` and write its manifest.

        The checks of :meth:`check` come first (with ``names``, the files the command will
        :meth:`reserve`: a user's file at one of them is refused before the earlier output is
        cleared, not after). The folder's :class:`RunLock` is taken before
        anything is removed, so a folder another process is working in is never cleared from
        under it (:class:`RunInUse`); with ``lock`` it is kept, otherwise released once the
        folder is cleared. Missing parents are created. ``before_clear`` is called where an earlier
        output is to be cleared, once the lock is held and before anything is removed: what it
        raises leaves the folder as it was.
        """
        p = Path(path)
        inputs = list(inputs)
        cls.check(p, overwrite=overwrite, inputs=inputs, what=what, command=command, names=names)
        try:  # created only by this call's own mkdir: a racing start may make the folder in between
            p.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
            # made by a racing start since the check (or a file put there): what is there now is checked
            # again (a command that takes no lock, such as predict, may have written its output already);
            # a start that holds the folder's lock is said to be using it, not to have left output
            if (p / LOCK_NAME).is_file() and not (p / LOCK_NAME).is_symlink():
                RunLock(p).acquire().release()
            cls.check(p, overwrite=overwrite, inputs=inputs, what=what, command=command, names=names)
        out = cls(p, created_root=created, command=command)
        clearing = (p / MANIFEST_NAME).is_file()
        if lock or clearing:
            try:
                out.lock = RunLock(p).acquire()
            except RunInUse:  # the lock file is the holder's: nothing here is removed
                raise
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        (p / LOCK_NAME).unlink()
                        p.rmdir()
                raise
        if clearing:
            try:
                if before_clear is not None:
                    before_clear()
                out._read_manifest()
                out.command = command
                out.clear()
            except BaseException:  # a damaged manifest, a file that would not go: the lock goes now,
                out.release()      # not when the failed object is collected (a long-lived caller)
                raise
            if not lock:
                out.release()
        else:
            try:
                if out.lock is not None:  # no writer of the folder is alive: a killed one's manifest temporary goes
                    out.remove_stale_temporaries()
                out._write_manifest()
            except BaseException:  # (a full disk): the start is undone, its lock file and folder go with it
                with contextlib.suppress(OSError):
                    out.discard()
                out.release()
                raise
        return out

    @classmethod
    def open(cls, path: str | os.PathLike, *, lock: bool = False, what: str = "--out",
             command: str | None = None) -> "OutputFolder":
        """An existing output folder (e.g. a run to resume): it must carry the manifest, and be the
        output of ``command`` when one is given."""
        p = Path(path)
        if not p.is_dir():
            raise OutputRefused(f"{what} {p}: no such folder")
        if not (p / MANIFEST_NAME).is_file():
            raise OutputRefused(f"{what} {p}: not a folder written by defect-fast (no {MANIFEST_NAME})")
        theirs = cls._other_command(p, command)
        if theirs:
            raise OutputRefused(f"{what} {p}: holds the output of 'defect-fast {theirs}', not of {command}; "
                                "choose another folder")
        out = cls(p, command=command)
        if lock:
            out.lock = RunLock(p).acquire()
        try:
            out._read_manifest()
            if lock:
                out.remove_stale_temporaries()
        except BaseException:  # as in create: the lock does not outlive the refusal
            out.release()
            raise
        return out

    @staticmethod
    def unlisted(path: str | os.PathLike, under: Iterable[str]) -> list[Path]:
        """What under ``path / u`` (for each ``u`` in ``under``) no manifest lists: neither
        ``path``'s nor that of an output folder nested between (a run inside a demo). Clearing
        those folders leaves exactly these, so a command that will refuse them can say so before
        it clears anything: files, and folders no manifest lists (a user's empty folder too).
        Manifests and locks count as listed, and so do the temporaries a killed write left beside
        a listed file or a manifest (a clear removes them, not those of a user's file); a
        symbolic link is one entry, never followed. Touches nothing."""
        root = Path(path)
        temporary = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")
        listings: dict[Path, tuple[set[str], set[str]]] = {}

        def listed(folder: Path) -> tuple[set[str], set[str]]:
            """The files and the folders ``folder``'s manifest lists."""
            if folder not in listings:
                try:
                    data = _manifest(folder)
                except (OSError, ValueError):
                    data = {}
                listings[folder] = (set(data.get("files", [])), set(data.get("dirs", [])))
            return listings[folder]

        def owned(entry: Path, kind: int) -> bool:
            """``entry`` (kind 0: a file, 1: a folder) is listed by a manifest at or above it."""
            rel = entry.relative_to(root)
            return any(rel.relative_to(up.relative_to(root)).as_posix() in listed(up)[kind]
                       for up in [root, *(root / Path(*rel.parts[:k]) for k in range(1, len(rel.parts)))])

        def owned_file(entry: Path) -> bool:
            written_for = temporary.fullmatch(entry.name)
            name = written_for.group(1) if written_for else entry.name
            return name in _OWN or owned(entry.with_name(name), 0)

        def owned_folder(entry: Path) -> bool:
            # an output folder nested here (a run) is cleared through its own manifest
            return owned(entry, 1) or (entry / MANIFEST_NAME).is_file()

        left: list[Path] = []
        for u in under:
            top = root / u
            if top.is_symlink() or top.is_file():
                left += [] if owned_file(top) else [top]
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                here = Path(dirpath)
                links = [d for d in dirnames if (here / d).is_symlink()]
                left += [here / n for n in sorted(filenames + links) if not owned_file(here / n)]
                left += [here / d for d in sorted(dirnames) if d not in links and not owned_folder(here / d)]
                dirnames[:] = [d for d in dirnames if d not in links and owned_folder(here / d)]  # one entry each
        return left

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files :func:`atomic_open` left beside this folder's recorded files
        when a process was killed inside a write (``.<name>.<8 characters>.tmp``; never renamed
        into place, so never recorded). Only with the folder's lock held: no writer of it is
        alive. Returns what was removed."""
        names: dict[Path, set[str]] = {}  # each folder listed once (once per file took minutes for 10,000 maps)
        for rel in [MANIFEST_NAME, *sorted(self.files)]:  # a manifest's own write can be killed too
            target = self._safe_target(rel)
            if target is not None:
                names.setdefault(target.parent, set()).add(target.name)
        removed: list[Path] = []
        for parent, here in names.items():
            if not parent.is_dir():
                continue
            for entry in sorted(parent.iterdir()):
                if _temporary_name(entry) in here:
                    entry.unlink()
                    removed.append(entry)
        return removed

    # -- manifest -------------------------------------------------------------------------------
    def _read_manifest(self) -> None:
        mpath = self.path / MANIFEST_NAME
        try:
            data = _manifest(self.path)
            files, dirs = data.get("files", []), data.get("dirs", [])
        except (OSError, ValueError) as exc:
            raise OutputRefused(f"{mpath}: damaged manifest ({exc}); remove the folder's files by hand") from None
        self.files, self.dirs = set(files), set(dirs)
        self.created_root = bool(data.get("created_root", False)) or self.created_root
        if self.command is None and isinstance(data.get("command"), str):
            self.command = data["command"]

    def _write_manifest(self) -> None:
        data = {"format": _MANIFEST_FORMAT, "version": 1, "created_root": self.created_root,
                "files": sorted(self.files), "dirs": sorted(self.dirs)}
        if self.command is not None:
            data["command"] = self.command
        atomic_write_text(self.path / MANIFEST_NAME, json.dumps(data, indent=1) + "\n")

    def _rel(self, path: str | os.PathLike) -> str:
        p = Path(path)
        if not p.is_absolute():
            p = self.path / p
        root = Path(os.path.abspath(self.path))
        try:
            rel = Path(os.path.abspath(p)).relative_to(root)
        except ValueError:
            raise ValueError(f"{path}: not inside the output folder {self.path}") from None
        if not rel.parts or rel.parts[0] in _OWN:
            raise ValueError(f"{path}: not a file of the output folder {self.path}")
        return rel.as_posix()

    def _safe_target(self, rel: str) -> Path | None:
        """root/rel if no component below the root is a symlink to elsewhere, else None."""
        root = _resolved(self.path)
        target = self.path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            return None
        if _resolved(target.parent) != root.joinpath(*Path(rel).parts[:-1]):
            return None
        return target

    def record(self, path: str | os.PathLike) -> Path:
        """Add ``path`` (inside the folder; relative paths are taken from it) to the manifest.

        Its parent folders inside the output folder are recorded too; a path that does not exist
        yet is recorded as a file (record before writing, so a crash leaves nothing unlisted).
        Returns the path inside the folder.
        """
        return self.record_many([path])[0]

    def record_many(self, paths: Iterable[str | os.PathLike]) -> list[Path]:
        """:meth:`record` for many paths with one manifest write (e.g. all maps of a predict)."""
        targets = []
        for path in paths:
            rel = self._rel(path)
            target = self.path / rel
            parts = Path(rel).parts
            for k in range(1, len(parts)):
                self.dirs.add(Path(*parts[:k]).as_posix())
            if target.is_dir() and not target.is_symlink():
                self.dirs.add(rel)
            else:
                self.files.add(rel)
            targets.append(target)
        self._write_manifest()
        return targets

    def reserve(self, names: Iterable[str | os.PathLike]) -> list[Path]:
        """Record files this command is about to write, all at once; refused
        (:class:`OutputRefused`, nothing recorded) when one of them exists and the manifest does
        not list it: a user's file is never replaced."""
        names = list(names)
        self._refuse_unlisted(names)
        return self.record_many(names)

    def _refuse_unlisted(self, names: list[str | os.PathLike]) -> None:
        """:class:`OutputRefused` when one of ``names`` exists and the manifest does not list it."""
        for name in names:
            rel = self._rel(name)
            target = self.path / rel
            if (target.exists() or target.is_symlink()) and rel not in self.files:
                raise OutputRefused(f"{target}: exists and was not written by defect-fast; move it away or choose another folder")

    def mkdir(self, name: str | os.PathLike) -> Path:
        """Create a sub-folder (and parents) and record it."""
        rel = self._rel(name)
        target = self.path / rel
        self._no_link_on_the_way(rel, with_last=True)
        target.mkdir(parents=True, exist_ok=True)
        return self.record(rel)

    def _no_link_on_the_way(self, rel: str | os.PathLike, with_last: bool = False) -> None:
        """OutputRefused where a folder between this one and ``rel`` (and ``rel`` itself, with
        ``with_last``) is a symbolic link (:func:`link_on_the_way`): an earlier output's maps/
        replaced by a link to another folder had the new maps written there, outside the output folder."""
        step = link_on_the_way(self.path, rel, with_last)
        if step is not None:
            raise OutputRefused(f"{step}: a symbolic link where defect-fast writes a folder of its own; remove "
                                "it or choose another folder")

    def _writable(self, name: str | os.PathLike) -> Path:
        rel = self._rel(name)
        target = self.path / rel
        self._no_link_on_the_way(rel)
        if (target.exists() or target.is_symlink()) and rel not in self.files:
            raise OutputRefused(f"{target}: exists and was not written by defect-fast; move it away or choose another folder")
        # record before writing: a crash mid-write then leaves nothing unlisted behind
        self.record(rel)
        return target

    @contextlib.contextmanager
    def open_atomic(self, name: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[Any]:
        """:func:`atomic_open` on a file of this folder, recorded in the manifest."""
        with atomic_open(self._writable(name), mode, **kwargs) as fh:
            yield fh

    def write_bytes(self, name: str | os.PathLike, data: bytes) -> Path:
        """Write a file of this folder atomically and record it."""
        return atomic_write_bytes(self._writable(name), data)

    def write_text(self, name: str | os.PathLike, text: str) -> Path:
        """Write a text file of this folder atomically and record it."""
        return atomic_write_text(self._writable(name), text)

    def write_json(self, name: str | os.PathLike, obj: Any, *, nan: str = "null") -> Path:
        """Write strict JSON (:func:`dump_json_strict`) atomically and record it."""
        return atomic_write_json(self._writable(name), obj, nan=nan)

    # -- removal --------------------------------------------------------------------------------
    def clear(self, *, write_manifest: bool = True) -> list[Path]:
        """Remove the files listed in the manifest, then the listed folders that are left empty.

        Files not in the manifest, and anything reached through a symbolic link that replaced a
        listed folder, are never touched. The manifest itself stays (now empty; not rewritten with
        ``write_manifest=False``, for a caller that removes it next). Returns what was removed.
        """
        removed: list[Path] = self.remove_stale_temporaries()
        for rel in sorted(self.files):
            target = self._safe_target(rel)
            if target is None:
                continue
            try:
                if target.is_symlink() or target.is_file():
                    target.unlink()
                    removed.append(target)
            except OSError as exc:  # a name reserved that no file system takes was never written
                if exc.errno != errno.ENAMETOOLONG:
                    raise
        for rel in sorted(self.dirs, key=lambda r: len(Path(r).parts), reverse=True):
            target = self._safe_target(rel)
            if target is None or target.is_symlink() or not target.is_dir():
                continue
            try:
                target.rmdir()  # only if empty: the user's files inside keep their folder
                removed.append(target)
            except OSError:
                pass
        self.files.clear()
        self.dirs = {d for d in self.dirs if (self.path / d).is_dir() and not (self.path / d).is_symlink()}
        if write_manifest:
            self._write_manifest()
        return removed

    def discard(self) -> None:
        """Undo a failed start: :meth:`clear`, then remove the manifest, the lock file and the
        folder itself when this object created it and nothing else is left in it. A folder whose
        lock file was removed or replaced while it was held (:meth:`RunLock.still_held`) is left
        as it is: what is there may be another process's now."""
        if self.lock is not None and not self.lock.still_held():
            return
        self.clear(write_manifest=False)  # (on a full disk, a manifest rewritten only to be removed failed the undo)
        if self.dirs or _foreign_entries(self.path):
            self._write_manifest()  # what is left stays listed
            return
        with contextlib.suppress(FileNotFoundError):
            (self.path / MANIFEST_NAME).unlink()
        if self.lock is not None:
            self.lock.release(remove=True)
            self.lock = None
        if self.created_root:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    @contextlib.contextmanager
    def writing(self) -> Iterator["OutputFolder"]:
        """Around the writing of a command's outputs: any error or interrupt inside undoes the
        start (:meth:`discard`: only the files recorded here), and the lock is released either way."""
        try:
            yield self
        except BaseException:
            self.discard()
            raise
        finally:
            self.release()

    def release(self) -> None:
        """Release the folder's lock (if this object holds it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Run-folder lock
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's too; 0 and below are no process's)."""
    if pid <= 0:  # os.kill(0, ...) signals this process's group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (no PID is that large: not a PID)
        return False
    except OSError:  # PermissionError: it exists, another user's
        return True
    return True


def posix_locks(folder: str | os.PathLike) -> Any:
    """The ``fcntl`` module, with which ``folder`` is locked; an :class:`OutputRefused` naming
    ``folder`` where the system has none (Windows)."""
    try:
        import fcntl
    except ImportError:
        raise OutputRefused(f"{folder}: not locked: this system has no POSIX file locks (fcntl), with which "
                            "defect-fast keeps two processes from writing one folder; its commands, training and "
                            "watch need a POSIX system (Linux, macOS)") from None
    return fcntl


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``folder/LOCK_NAME`` holding the owner's PID.

    The kernel drops the lock when the holder's process ends, however it ends (crash, kill -9),
    so a stale lock never blocks a later run. A second process (or a second RunLock in the same
    process) gets :class:`RunInUse`: "RUN is in use by PID n". POSIX only.

    Usage: ``with RunLock(run): ...`` or ``lock = RunLock(run).acquire(); ...; lock.release()``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock without waiting; raises :class:`RunInUse` if another holder has it.

        A lock taken on a file that is no longer the folder's lock file (its holder removed it
        while this process opened it, as :meth:`release` with ``remove`` does) is let go and
        taken again on the file now there: else a third process would lock a new file beside it."""
        for _ in range(100):
            if self._take():
                return self
        raise OutputRefused(f"{self.path}: the lock file was removed or replaced at each of 100 attempts to take it; "
                            "is another program deleting it?")

    def _take(self) -> bool:
        """One attempt of :meth:`acquire`: False when the file locked is no longer the lock file."""
        fcntl = posix_locks(self.folder)

        if self._fd is not None:
            return True
        try:  # never through a link: the pid written below would truncate whatever it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            if self.path.is_symlink():
                raise OutputRefused(f"{self.path}: is a symbolic link, not defect-fast's lock file; remove it or "
                                    "choose another folder") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputRefused(f"{self.path}: is not a plain file, so not defect-fast's lock file; remove it or "
                                    "choose another folder")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                in_use = self._in_use(fd)
            finally:
                os.close(fd)
            raise in_use from None
        except BaseException:
            os.close(fd)
            raise
        if not self._is_the_lock_file(fd):
            os.close(fd)  # removed (or replaced) between the open and the lock: lock the file there now
            return False
        # the PID over the earlier holder's, then the rest cut: a process refused meanwhile reads a
        # PID, never an empty file (it said "another process")
        pid = f"{os.getpid()}\n".encode("ascii")
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        os.fsync(fd)
        self._fd = fd
        return True

    def check_free(self) -> None:
        """Raise :class:`RunInUse` when another process holds the lock, changing nothing (no lock
        file made, none written): for checks that touch nothing."""
        fcntl = posix_locks(self.folder)

        try:
            # non-blocking: a FIFO put at the lock file's name would hold the open for ever
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:  # none (or a link, a folder): nobody holds it; taking it says what is wrong
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(fd) from None
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _in_use(self, fd: int) -> RunInUse:
        """What a lock held by another process, open as ``fd``, is said to be: its holder's PID as the
        holder wrote it in the file."""
        pid_text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is not None and not _alive(pid):  # an earlier holder's, read before the new one wrote its own
            pid = None
        who = f"PID {pid}" if pid is not None else "another process"
        return RunInUse(f"{self.folder} is in use by {who}; wait for it to finish or stop it", pid)

    def still_held(self) -> bool:
        """Whether this object holds the lock and the folder's lock file is still the file locked:
        one removed by hand (or replaced) while it was held no longer keeps a second holder out,
        which locks a new file there."""
        return self._fd is not None and self._is_the_lock_file(self._fd)

    def _is_the_lock_file(self, fd: int) -> bool:
        """Whether the file open as ``fd`` is the one at :attr:`path` now (not removed or replaced)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return os.path.samestat(now, os.fstat(fd))

    def lost_message(self) -> str:
        """What a holder that finds :meth:`still_held` false says."""
        return (f"{self.path}: the lock file was removed or replaced while this process held it, so another "
                f"process may now use {self.folder}; stopped here, changing nothing more there")

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock (idempotent). ``remove`` also deletes the lock file (only do that when
        the folder itself is being removed), unless it is no longer the file locked (another
        holder's)."""
        import fcntl

        if self._fd is None:
            return
        try:
            # the PID is left: a process refused just before this reads it, not an empty file (the
            # next holder writes its own over it)
            if remove and self.still_held():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Tensor digests of saved files
# ---------------------------------------------------------------------------------------------

#: Key under which :func:`attach_digest` stores the digest in a saved dict.
DIGEST_KEY = "tensor_digest"


def _feed(h: "hashlib._Hash", obj: Any, where: str) -> None:
    import torch

    def tag(kind: str, payload: bytes = b"") -> None:
        h.update(kind.encode() + b"\x00" + len(payload).to_bytes(8, "little") + payload)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            raise TypeError(f"{where}: cannot digest a {t.layout} tensor")
        t = t.cpu().contiguous().reshape(-1)
        tag("tensor", f"{t.dtype}|{tuple(obj.shape)}".encode())
        data = t.view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        tag("bytes", data.numpy().tobytes())
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        tag("dict", str(len(items)).encode())
        for k, v in items:
            tag("key", f"{type(k).__name__}:{k!r}".encode())
            _feed(h, v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        tag(type(obj).__name__ if type(obj) in (list, tuple) else "tuple", str(len(obj)).encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif obj is None or type(obj) in (bool, int, float, str, bytes) or isinstance(obj, (torch.dtype, torch.device)):
        # exact types: a subclass (numpy's float64, an IntEnum) is refused by the weights_only load
        tag("leaf", f"{type(obj).__name__}:{obj!r}".encode())
    else:
        raise TypeError(f"{where or 'object'}: cannot digest a {type(obj).__name__}")


def state_digest(obj: Any) -> str:
    """SHA-256 (hex) over every tensor's dtype, shape and bytes in ``obj``, with its key path.

    ``obj`` may nest dicts (keys in sorted order, so insertion order does not matter), lists and
    tuples; other leaves (numbers, strings, None, dtypes) are hashed by value too, so a changed
    setting is caught as well as a flipped weight. A dict's own :data:`DIGEST_KEY` entry is
    hashed like any other: call it on the object without that key (as :func:`attach_digest` does).

    Raises:
        TypeError: a value that is not a tensor, container or plain value.
    """
    h = hashlib.sha256()
    _feed(h, obj, "")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks of 1 MiB."""
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(fh) -> str:
    """The SHA-256 (hex) of an open binary file from its start, read in blocks of 1 MiB."""
    h = hashlib.sha256()
    fh.seek(0)
    for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def stat_signature(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is written to in place, from its ``os.stat`` result: size,
    modification and change times (a copy of the same size written over it moves the times)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def attach_digest(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of dict ``obj`` with ``obj[DIGEST_KEY] = {"algorithm": "sha256", "hex": ...}``
    over all its other entries (any existing digest is replaced)."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: {"algorithm": "sha256", "hex": state_digest(body)}}


def verify_digest(obj: Any, path: str | os.PathLike, *, required_keys: Iterable[str] = (),
                  allow_missing: bool = False) -> bool:
    """Check a loaded object against the digest stored in it by :func:`attach_digest`.

    Policy for files without a digest: refused (:class:`DigestError` saying the file is foreign
    or from an older version) unless ``allow_missing``, which returns False instead.

    Args:
        obj: what ``torch.load`` returned.
        path: the file it came from (named in every error).
        required_keys: keys a file of the expected kind must hold; a missing one is a one-line
            "not a ... file" error, never a KeyError.
    Returns:
        True when the digest matched, False when absent and ``allow_missing``.
    Raises:
        DigestError: not a dict, missing keys, missing digest, or mismatch (the file is damaged).
    """
    if not isinstance(obj, Mapping):
        raise DigestError(f"{path}: not a defect_fast file (holds a {type(obj).__name__}, expected a dict)")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise DigestError(f"{path}: not a defect_fast file of the expected kind (missing {', '.join(missing)})")
    stored = obj.get(DIGEST_KEY)
    if stored is None:
        if allow_missing:
            return False
        raise DigestError(f"{path}: no tensor digest (written by another program or an older defect_fast), so its "
                          "contents cannot be checked and it is not read; train again with this version")
    if not (isinstance(stored, Mapping) and stored.get("algorithm") == "sha256" and isinstance(stored.get("hex"), str)):
        raise DigestError(f"{path}: unreadable tensor digest entry")
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    try:
        actual = state_digest(body)
    except TypeError as exc:
        raise DigestError(f"{path}: unexpected content ({exc})") from None
    except RecursionError:  # (no file this tool writes nests more than a few levels)
        raise DigestError(f"{path}: unexpected content (nested too deeply to be a file defect-fast wrote)") from None
    if actual != stored["hex"]:
        raise DigestError(f"{path}: file is damaged (tensor digest mismatch: stored {stored['hex'][:12]}..., "
                          f"computed {actual[:12]}...); restore it from a copy or retrain")
    return True


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait for the end of the block, then take their course (on the main
    thread; elsewhere the block runs as it is). A signal inside ``torch.save`` reached its zip
    writer, which turned it into an internal RuntimeError, or wrote on into the closed file and
    aborted the process; the file, written whole, is then the last thing done before the stop."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    try:  # (a signal between the two installs: the first handler is put back all the same)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, OSError):
                old[sig] = signal.signal(sig, lambda signum, _frame: got.append(signum))
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        # each once, SIGTERM first: the first raised ends the block, and a service manager's stop
        # outranks a Ctrl-C (it ends the process by its signal)
        for signum in sorted(dict.fromkeys(got), key=lambda s: s != signal.SIGTERM):
            signal.raise_signal(signum)


def save_with_digest(obj: Mapping[str, Any], path: str | os.PathLike, *, folder: OutputFolder | None = None,
                     replace: bool = True, unlisted: bool = False) -> Path:
    """``torch.save(attach_digest(obj))`` to ``path`` atomically (recorded in ``folder`` if given;
    else with ``replace=False`` never over a file there by then, ``unlisted``: :func:`atomic_open`);
    SIGINT and SIGTERM wait for the file (:func:`signals_held`), from the start of its digest: a
    stop while the digest is computed comes once the file is written whole."""
    import torch

    try:
        with signals_held():
            payload = attach_digest(obj)
            ctx = folder.open_atomic(path) if folder is not None else atomic_open(path, replace=replace, unlisted=unlisted)
            with ctx as fh:
                torch.save(payload, fh)
    except RuntimeError as exc:
        # torch's zip writer turns the file's OSError (a full disk, a lost mount) into a RuntimeError
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    return Path(path)


def _other_torch_archive(path) -> str | None:
    """What a zip archive ``torch.save`` did not write is (a TorchScript or torch.export program,
    such as ``defect-fast export`` writes), or None: saved data, or not readable as a zip (left to
    ``torch.load``'s own message). ``path``: a file's path or its bytes as a binary file object."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = {n.rsplit("/", 1)[-1] for n in z.namelist()}
    except Exception:  # noqa: BLE001 - a damaged directory fails in many ways (a name that is not UTF-8,
        return None    # an unknown compression): torch.load's failure names it below
    if "constants.pkl" in names:
        return "a TorchScript program (such as defect-fast export writes), not the model file it came from"
    if "archive_format" in names:
        return "a torch.export program (such as defect-fast export writes), not the model file it came from"
    if "data.pkl" not in names:
        return "a zip archive without the data torch.save writes"
    return None


#: Reads of a file written to in place while it is read before :func:`load_file_with_digest` gives
#: up, and the pause (seconds) before each read again.
_LOAD_TRIES, _LOAD_PAUSE = 3, 0.5


def _load_checked(p: Path, fh) -> Any:
    """``torch.load`` of the open file ``fh`` (of ``p``, named in errors) after checking it is a
    zip archive ``torch.save`` wrote; :class:`DigestError` otherwise."""
    import pickle
    import zipfile

    import torch

    try:
        fh.seek(0)
        is_zip = zipfile.is_zipfile(fh)
    except Exception as exc:  # noqa: BLE001 - a damaged archive (BadZipFile from its directory, ...)
        raise DigestError(f"{p}: not a readable defect_fast file (a damaged archive: {type(exc).__name__}: "
                          f"{one_line(str(exc))[:200]})") from None
    if not is_zip:  # every torch.save file is a zip archive: an image, a text, a truncated copy
        raise DigestError(f"{p}: not a defect_fast model or checkpoint file (not a torch archive: truncated, a "
                          "copy still being written, or another kind of file)")
    fh.seek(0)
    kind = _other_torch_archive(fh)
    if kind:  # torch.load would warn, then advise on TorchScript or call the file corrupted
        raise DigestError(f"{p}: not a defect_fast model or checkpoint file: {kind}")
    try:
        fh.seek(0)
        return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message here advises an unsafe load: not repeated
        raise DigestError(f"{p}: not a defect_fast file: it holds Python objects other than tensors and plain "
                          "data, which are never loaded (a pickle can run code)") from None
    except Exception as exc:  # a damaged archive
        raise DigestError(f"{p}: not a readable defect_fast file ({type(exc).__name__}: {one_line(str(exc))[:200]})") from None


def _open_regular(p: Path, refused: BaseException | None = None):
    """``open(p, "rb")`` of a regular file; ``refused`` raised for anything else (by default a
    :class:`DigestError`: a model or checkpoint file was expected). Opened without blocking (a FIFO
    would wait for a writer for ever) and checked on the handle (a device such as /dev/zero reads
    for ever, into memory)."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))  # (Windows: no text mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused if refused is not None else DigestError(
                f"{p}: is not a regular file (a device, pipe or socket, or a link to one), expected a model or "
                "checkpoint file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_with_digest(path: str | os.PathLike, *, required_keys: Iterable[str] = (),
                     allow_missing: bool = False, check_first: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` then :func:`verify_digest`; ``check_first`` is
    called with what was loaded before that (a file of a later format says so, rather than that
    it lacks a key or its digest is unreadable). :func:`load_file_with_digest` gives the file's
    SHA-256 too.

    Raises:
        DigestError: missing, unreadable (truncated, not a torch file, unsafe pickle), foreign,
            damaged, or without a digest (unless ``allow_missing``); the message names the file.
    """
    return load_file_with_digest(path, required_keys=required_keys, allow_missing=allow_missing,
                                 check_first=check_first)[0]


def load_file_with_digest(path: str | os.PathLike, *, required_keys: Iterable[str] = (), allow_missing: bool = False,
                          check_first: Callable[[Any], None] | None = None) -> tuple[dict[str, Any], str]:
    """:func:`load_with_digest`, and the SHA-256 (hex) of the bytes it loaded: the file is opened
    once and hashed, checked and loaded through that one handle, so a file replaced meanwhile (an
    atomic save over it) is never half the one and half the other, and the digest is of the version
    loaded (a model's version, as watch and export record it, was read again after the load, from
    whatever file was there by then). A file written to in place during a read (its size or times
    changed through the handle, also where that cut it short, which reads as a damaged file) is
    read again, up to :data:`_LOAD_TRIES` times; a copy caught between two of its writes, with
    nothing written during the read, reads as a damaged file (said at once)."""
    p = Path(path)
    if not p.exists():
        raise DigestError(f"{p}: no such file")
    if p.is_dir():
        raise DigestError(f"{p}: is a folder, expected a model or checkpoint file")
    changed = DigestError(f"{p}: changed while it was read, {_LOAD_TRIES} times (written to, or its permissions or "
                          "links changed, meanwhile: a copy being written over it?); try again once it is complete")
    for attempt in range(_LOAD_TRIES):
        if attempt:
            time.sleep(_LOAD_PAUSE)  # a copy under way: let it go on before the next read
        try:  # opened here: is_zipfile reads a file it cannot open (no permission) as "not a zip archive"
            fh = _open_regular(p)
        except OSError as exc:
            raise DigestError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        with fh:
            try:
                before = stat_signature(os.fstat(fh.fileno()))
                sha = _sha256_of(fh)
                try:
                    obj = _load_checked(p, fh)
                except DigestError:  # damaged, or cut short by a copy being written over it meanwhile
                    if stat_signature(os.fstat(fh.fileno())) != before:
                        continue
                    if attempt:  # a writer seen at work before: the copy is not done, not a damaged file
                        raise changed from None
                    raise
                if stat_signature(os.fstat(fh.fileno())) == before:
                    break  # not written to in place (a cp over it) while it was hashed and loaded: the digest is of it
            except OSError as exc:
                raise DigestError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    else:
        raise changed
    if check_first is not None:
        check_first(obj)
    verify_digest(obj, p, required_keys=required_keys, allow_missing=allow_missing)
    return obj, sha
