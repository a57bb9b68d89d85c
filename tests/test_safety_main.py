"""Guards at the edge of the tool, part two: argument types, devices and the main() boundary (one
line per user error, tracebacks for bugs, full disks, killed writes). Part one: tests/test_safety.py."""
from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import pytest
import torch

from defect_fast import safety
from defect_fast.safety import (
    MANIFEST_NAME,
    DeviceError,
    OutputFolder,
    OutputRefused,
    UsageError,
    UserError,
    check_device,
    run_main,
)


# --------------------------------------------------------------------------------------------
# Argument types and devices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, good, bad", [
    (safety.positive_int, {"1": 1, " 7 ": 7}, ["0", "-1", "abc", "1.5", "nan", ""]),
    (safety.nonneg_int, {"0": 0, "3": 3}, ["-1", "x"]),
    (safety.positive_float, {"2e-4": 2e-4, "1": 1.0}, ["0", "-1", "nan", "inf", "x"]),
    (safety.nonneg_float, {"0": 0.0, "2.5": 2.5}, ["-0.1", "nan", "inf"]),
    (safety.finite_float, {"-3": -3.0, "0.5": 0.5}, ["nan", "inf", "-inf", "one"]),
    (safety.probability, {"0": 0.0, "1": 1.0, "0.3": 0.3}, ["1.01", "-0.01", "nan"]),
    (safety.output_path, {"out": "out", "runs/m.json": "runs/m.json"}, ["", "  "]),
])
def test_argument_types(fn, good, bad):
    for text, value in good.items():
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {re.escape(repr(text))}$"):
            fn(text)


def test_parser_errors_are_one_line_usage_errors():
    p = safety.ArgumentParser(prog="defect-fast")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--epochs", type=safety.positive_int, nargs="+")
    assert p.parse_args(["train", "--epochs", "2", "3"]).epochs == [2, 3]
    with pytest.raises(UsageError) as err:
        p.parse_args(["train", "--epochs", "0"])
    assert str(err.value) == "argument --epochs: must be a whole number >= 1, got '0' (see 'defect-fast train --help')"
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        p.parse_args(["train", "--bogus"])


def test_a_negative_number_in_scientific_notation_is_a_value():
    """`--threshold -1e-3` was "expected one argument" (argparse took it for an option), where
    `--threshold -0.001` worked."""
    from defect_fast.cli import _parse

    for text, value in (("-1e-3", -1e-3), ("-0.001", -1e-3), ("-2", -2.0), ("-1E+2", -100.0)):
        assert _parse(["evaluate", "run", "data", "--threshold", text]).threshold == value
    with pytest.raises(UsageError, match="expected one argument"):
        _parse(["evaluate", "run", "data", "--threshold", "-x"])


def test_check_device(monkeypatch):
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("auto").type in ("cpu", "cuda")
    for spec in ("gpu", "cuda:x", "cuda:-1", "tpu"):
        with pytest.raises(DeviceError, match=f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N"):
            check_device(spec)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="this torch has no CUDA build"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no usable CUDA device"):
        check_device("cuda:0")
    assert check_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"no CUDA device 3; 1 visible"):
        check_device("cuda:3")
    assert check_device("cuda:0") == torch.device("cuda", 0) and check_device("CUDA") == torch.device("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device 3"):
        safety.device_arg("cuda:3")


# --------------------------------------------------------------------------------------------
# main() boundary
# --------------------------------------------------------------------------------------------


def _run(fn, argv=(), **kw):
    err = io.StringIO()
    status = run_main(fn, list(argv), stderr=err, **kw)
    return status, err.getvalue()


def _raise(exc):
    def fn(argv):
        raise exc
    return fn


class _RunError(RuntimeError):
    pass


@pytest.mark.parametrize("exc, message", [
    (UserError("bad thing\n  a.png: empty\n  b.png: corrupt"), "bad thing a.png: empty; b.png: corrupt"),
    (FileNotFoundError(2, "No such file or directory", "data/x.png"), "data/x.png: No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/out"), "/root/out: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "maps"), "maps: Is a directory"),
    (OSError(40, "Too many levels of symbolic links", "a/b"), "a/b: Too many levels of symbolic links"),
    (OSError(22, "Invalid argument", "share/a:b_map.png"), "share/a:b_map.png: Invalid argument"),
    (OSError(5, "Input/output error", "/mnt/line/out.json"), "/mnt/line/out.json: Input/output error"),
    # a file size limit (ulimit -f, a FAT stick's 4 GiB) was an "internal error" with a traceback
    (OSError(27, "File too large", "run/checkpoint.pt"), "run/checkpoint.pt: File too large"),
    (argparse.ArgumentTypeError("must be >= 1"), "must be >= 1"),
    (_RunError("run: nothing to resume"), "run: nothing to resume"),
])
def test_run_main_user_errors_are_one_line(exc, message):
    status, err = _run(_raise(exc), user_errors=(_RunError,))
    assert status == 2
    assert err == f"defect-fast: error: {message}\n"


def test_running_out_of_memory_is_one_line_not_a_bug_report():
    """evaluate on thousands of test images ran out of memory at its metrics, after every image was
    predicted, with a traceback and "internal error ...; this is a bug"."""
    import numpy as np

    def numpy_shortage(argv):
        np.empty(1 << 60, dtype=np.uint8)

    def torch_shortage(argv):
        torch.empty(1 << 60, dtype=torch.uint8)

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name, as a GPU raises it
        pass

    gpu = _raise(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"))
    def past_any_size(argv):
        torch.empty(1 << 62, dtype=torch.float64)

    windows = _raise(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                                  "you tried to allocate 1073741824 bytes."))
    mps = _raise(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB, max "
                              "allowed: 9.07 GB). Tried to allocate 2.00 GB on private pool. Use ..."))
    for fn, said in ((windows, "an allocation of 1 GiB failed"), (mps, "MPS backend out of memory"),
                     (numpy_shortage, "Unable to allocate 1"), (torch_shortage, "an allocation of 1.07e+09 GiB failed"),
                     (gpu, "CUDA out of memory. Tried to allocate 2.00 GiB)"),
                     (past_any_size, "Storage size calculation overflowed")):
        status, err = _run(fn)
        assert status == 1 and err.count("\n") == 1 and "Traceback" not in err and "bug" not in err, err
        assert err.startswith(f"defect-fast: error: out of memory ({said}") and "fewer images" in err, err
    status, err = _run(numpy_shortage, ["--debug"])
    assert status == 1 and "Traceback" in err and "out of memory" in err
    status, err = _run(_raise(RuntimeError("shape mismatch")))  # other RuntimeErrors are still bugs
    assert status == 1 and "this is a bug" in err
    # "alloc" or "overflow" in a message is no shortage: a half-precision overflow is still a bug, and a
    # user's error naming a folder /data/overflow_tests/ or allocrun/ is still that error
    status, err = _run(_raise(RuntimeError("value cannot be converted to type c10::Half without overflow")))
    assert status == 1 and "this is a bug" in err
    status, err = _run(_raise(_RunError("/data/overflow_tests/allocrun: no model.pt")), user_errors=(_RunError,))
    assert (status, err) == (2, "defect-fast: error: /data/overflow_tests/allocrun: no model.pt\n")


def test_a_dependency_that_is_not_installed_is_one_line_not_a_bug_report():
    """An install without its dependencies (pip --no-deps, as a pinned torch asks) met a missing
    matplotlib or tqdm with a traceback and "internal error ...; this is a bug"."""
    missing = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    status, err = _run(_raise(missing))
    assert (status, err) == (2, "defect-fast: error: the Python package matplotlib is missing or incomplete (No module "
                                "named 'matplotlib'), and this command needs it; install it (pip install matplotlib)\n")
    status, err = _run(_raise(ModuleNotFoundError("No module named 'sklearn.metrics'", name="sklearn.metrics")))
    assert status == 2 and err.endswith("(pip install scikit-learn)\n")
    for ours in ("defect_fast.nothing", "some_other_module"):  # a module of its own, or one it does not know: a bug
        status, err = _run(_raise(ModuleNotFoundError(f"No module named {ours!r}", name=ours)))
        assert status == 1 and "Traceback" in err and "this is a bug" in err


def test_run_main_bugs_keep_traceback_and_debug_shows_user_tracebacks():
    status, err = _run(_raise(ZeroDivisionError("division by zero")))
    assert status == 1 and "Traceback" in err and "ZeroDivisionError" in err and "this is a bug" in err
    status, err = _run(_raise(UserError("nope")), ["--debug"])
    assert status == 2 and "Traceback" in err and err.endswith("defect-fast: error: nope\n")
    status, err = _run(_raise(KeyboardInterrupt()))
    assert status == 130 and err == "defect-fast: interrupted\n"
    assert _run(lambda argv: None) == (0, "") and _run(lambda argv: 3) == (3, "")
    with pytest.raises(SystemExit):
        _run(_raise(SystemExit(0)))
    for no_path in (OSError(5, "Input/output error"), OSError(22, "Invalid argument")):
        status, err = _run(_raise(no_path))
        assert status == 1 and "Traceback" in err  # naming no path: not a user's mistake


def test_a_full_disk_while_saving_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save turns the file's ENOSPC into a RuntimeError: it comes out as the OSError, a user
    error, and no file is left."""
    import errno

    def full_disk(obj, fh):
        fh.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError) as info:
        safety.save_with_digest({"x": torch.zeros(2)}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert safety._user_message(info.value, ()) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_write_are_removed_under_the_lock(tmp_path):
    out = tmp_path / "run"
    folder = OutputFolder.create(out, lock=True, command="train")
    folder.record_many(["checkpoint.pt"])
    folder.release()
    (out / ".checkpoint.pt.ab12cd_z.tmp").write_bytes(b"half a checkpoint")  # atomic_open's name, process killed
    (out / ".checkpoint.pt.notes.tmp").write_text("the user's")  # not that pattern: kept
    (out / ".other.pt.ab12cd_z.tmp").write_text("not a recorded name: kept")
    OutputFolder.open(out, lock=False, command="train")  # no lock: nothing removed
    assert (out / ".checkpoint.pt.ab12cd_z.tmp").exists()
    OutputFolder.open(out, lock=True, command="train").release()
    assert not (out / ".checkpoint.pt.ab12cd_z.tmp").exists()
    assert (out / ".checkpoint.pt.notes.tmp").exists() and (out / ".other.pt.ab12cd_z.tmp").exists()



def test_stale_temporaries_are_looked_for_by_listing_each_folder_once(tmp_path, monkeypatch):
    """Each recorded file's folder was listed once per file: clearing 4,000 maps took 105 s."""
    out = tmp_path / "pred"
    folder = OutputFolder.create(out, lock=True, command="predict")
    names = [f"maps/m{i}.png" for i in range(50)] + [f"overlays/o{i}.png" for i in range(50)]
    folder.mkdir("maps")
    folder.mkdir("overlays")
    folder.record_many(names)
    (out / "maps" / ".m7.png.ab12cd_z.tmp").write_bytes(b"half a map")
    (out / "maps" / ".m7.png.x.tmp").write_bytes(b"the user's")
    listed = []
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listed.append(self) or real(self))
    assert folder.remove_stale_temporaries() == [out / "maps" / ".m7.png.ab12cd_z.tmp"]
    assert sorted(listed) == sorted([out, out / "maps", out / "overlays"])
    assert (out / "maps" / ".m7.png.x.tmp").exists()
    folder.release()


def test_a_first_manifest_killed_in_its_write_leaves_a_folder_a_new_start_takes(tmp_path):
    """A process killed inside the first manifest's write left only that write's temporary; every
    later start refused the folder as "not empty and not written by defect-fast"."""
    out = tmp_path / "run"
    out.mkdir()
    left = out / f".{MANIFEST_NAME}.ab12cd_z.tmp"  # atomic_open's name for the manifest
    left.write_text('{"format": "defect_fast-outp')
    OutputFolder.check(out, command="train")
    OutputFolder.create(out, lock=True, command="train").release()
    assert not left.exists() and (out / MANIFEST_NAME).is_file()
    # a link of that name, or a file of another pattern, is the user's
    other = tmp_path / "other"
    other.mkdir()
    (other / f".{MANIFEST_NAME}.ab12cd_z.tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputRefused, match="not empty"):
        OutputFolder.check(other, command="train")


def test_a_reader_that_goes_away_does_not_stop_the_command(tmp_path):
    """`defect-fast ... | head -1`: once the pipe is closed, printing goes nowhere and the command
    still writes its files and succeeds (BrokenPipeError was an internal error, the work lost)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "talk.py"
    script.write_text(textwrap.dedent("""
        import sys
        from pathlib import Path
        from defect_fast.safety import run_main

        def fn(argv):
            for i in range(20000):
                print(f"line {i} " + "x" * 80)
                print(f"note {i}", file=sys.stderr)
            Path(argv[0]).write_text("done")

        sys.exit(run_main(fn, [sys.argv[1]]))
    """))
    done = tmp_path / "done.txt"
    proc = subprocess.Popen([sys.executable, str(script), str(done)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().startswith(b"line 0")
    assert proc.stderr.readline().startswith(b"note 0")
    proc.stdout.close()  # both readers go away after one line
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0
    assert done.read_text() == "done"


@pytest.mark.parametrize("shell", ["| true", ">&-"])
def test_a_short_output_to_a_reader_that_is_gone_or_to_no_stdout_succeeds(tmp_path, shell):
    """Output still buffered when the command ends met the closed pipe at exit (status 120); a
    stdout closed at start (None) made the first print an internal error."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "short.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from defect_fast.safety import run_main

        def fn(argv):
            time.sleep(0.3)  # the reader has gone by now
            print("a short report")
            Path(argv[0]).write_text("done")

        sys.exit(run_main(fn, [sys.argv[1]]))
    """))
    done = tmp_path / "done.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" "{script}" "{done}" {shell}; exit ${{PIPESTATUS[0]}}'],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr and done.read_text() == "done"


def test_signals_held_raise_sigterm_before_sigint_and_put_every_handler_back():
    """Both held: the first raised ended the block and the other was dropped, so a service
    manager's SIGTERM after a Ctrl-C ended the process as a Ctrl-C (status 130)."""
    import os
    import signal

    from defect_fast.safety import signals_held

    class Term(Exception):
        pass

    def term(signum, frame):
        raise Term

    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.signal(signal.SIGTERM, term)
    try:
        with pytest.raises(Term):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGTERM, before_term)
