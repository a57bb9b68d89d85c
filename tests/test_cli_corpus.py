"""A corpus of bad inputs and bad arguments run through every CLI command.

Each case runs ``python3 -m defect_fast ...`` in a fresh copy of a small workspace (an MVTec-style
data set, a trained run, image folders, the user's own files, and folders of broken inputs) and
checks the contract of the command line for the class of mistake it stands for:

- a refusal (``expect="refuse"``): exit status 2; on stderr exactly one line
  ``defect-fast: error: ...`` (lines ``defect-fast: warning: ...`` aside) naming the file or
  argument; no traceback; no option suggested that the command does not have; every file and
  folder that existed before is still there byte for byte, and nothing half-made is left behind
  (no new file other than a run lock);
- an odd but valid input (``expect="ok"``): exit status 0 and no traceback, and files outside
  the paths the command may legitimately write are untouched.

Speed: by default one worker process imports the package once and runs every case as
``python -m defect_fast`` does (``runpy`` on ``defect_fast.__main__`` with its own argv, working
folder, stdout and stderr file descriptors). ``DEFECT_FAST_CORPUS_EXACT=1`` starts a fresh
interpreter per case instead (slower, for CI). Images are 64x64, trainings one step per stage,
``DEFECT_FAST_BACKEND=reference``.

The workspace is built once; each case gets a copy in which the large model files are hard links
(they are only ever replaced by rename) and file hashes are cached by inode, size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXACT = os.environ.get("DEFECT_FAST_CORPUS_EXACT", "") not in ("", "0")
CASE_TIMEOUT_S = 180
LOCK_NAMES = {".defect_fast.lock"}
SIZE = 64  # the CMA-AE patch size: the smallest image a run accepts

#: Arguments of a training that is as small as possible (one step per stage).
TRAIN = ["--image-size", str(SIZE), "--batch-size", "4", "--max-steps", "1", "--set", "memory_size=10", "--quiet"]

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DEFECT_FAST_BACKEND="reference", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("DEFECT_FAST_DEBUG", None)
    return env


# --------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent(r"""
    import json, os, runpy, sys, traceback, warnings
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        req = json.loads(line)
        saved = os.dup(1), os.dup(2)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1); os.dup2(err, 2); os.close(out); os.close(err)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        os.chdir(req["cwd"])
        sys.argv = ["defect-fast", *req["argv"]]
        warnings.resetwarnings()  # each case shows its warnings as a fresh interpreter would
        warnings.simplefilter("default")
        try:
            runpy.run_module("defect_fast", run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as exc:
            code = exc.code
            status = 0 if code is None else code if isinstance(code, int) else 1
            if not isinstance(code, (int, type(None))):
                print(code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush(); sys.stderr.flush()
        sys.stdout.close(); sys.stderr.close()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        reply.write(json.dumps({"status": status}) + "\n")
""")


class CliRunner:
    """Runs ``python3 -m defect_fast ARGV`` in a folder; returns (status, stdout, stderr)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env(), cwd=REPO)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __call__(self, argv: list[str], cwd: Path, logs: Path) -> tuple[int, str, str]:
        logs.mkdir(parents=True, exist_ok=True)
        if EXACT:
            r = subprocess.run([sys.executable, "-m", "defect_fast", *argv], cwd=cwd, env=_env(), capture_output=True,
                               text=True, timeout=CASE_TIMEOUT_S)
            return r.returncode, r.stdout, r.stderr
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        out, err = logs / "stdout.txt", logs / "stderr.txt"
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(CASE_TIMEOUT_S)
        sel.close()
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            pytest.fail(f"defect-fast {' '.join(argv)}: no answer within {CASE_TIMEOUT_S} s (or the worker died)")
        status = json.loads(line)["status"]
        return status, out.read_text(errors="replace"), err.read_text(errors="replace")


# --------------------------------------------------------------------------------------------
# The workspace: good data, a trained run, the user's files and the broken inputs
# --------------------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kw)
    return path


def _texture(seed: int, shape=(SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(90, 160, shape, dtype=np.uint8)


def _truncated_png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def _flip_weight_bytes(model_pt: Path) -> None:
    """Flip 64 bytes inside the largest weight tensor stored in ``model_pt`` (the zip keeps them raw)."""
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    tensors = state["model_state"] if isinstance(state, dict) and "model_state" in state else state
    big = max((t for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()), key=lambda t: t.numel())
    raw = bytearray(model_pt.read_bytes())
    at = raw.find(big.contiguous().numpy().tobytes())
    assert at > 0, "weight bytes not found in the model file"
    start = at + (big.numel() * big.element_size()) // 2
    for i in range(start, start + 64):
        raw[i] ^= 0x5A
    model_pt.write_bytes(bytes(raw))


def _build_template(root: Path, runner: CliRunner) -> Path:
    from defect_fast.data.synthetic import make_synthetic_dataset

    w = root / "w"
    data = make_synthetic_dataset(w / "data", n_train=2, n_test_good=1, n_test_defect=1, size=SIZE, seed=0)
    status, _, err = runner(["train", "data", "--out", "run", *TRAIN], w, root / "logs-train")
    assert status == 0, err
    assert (w / "run" / "model.pt").is_file()

    # the user's own things
    for i, name in enumerate(("a.png", "b.png")):
        _png(w / "imgs" / name, np.stack([_texture(10 + i)] * 3, axis=-1))
    (w / "mine" / "sub").mkdir(parents=True)
    (w / "mine" / "notes.txt").write_text("my notes\n")
    (w / "mine" / "sub" / "x.txt").write_text("x\n")
    (w / "existing.json").write_text('{"mine": true}\n')
    _png(w / "existing.png", _texture(3))
    (w / "link_to_imgs").symlink_to("imgs", target_is_directory=True)
    (w / "notarun").mkdir()
    torch.save({"weights": torch.ones(3, 3)}, w / "foreign.pt")
    (w / "garbage.pt").write_bytes(b"not a model at all\n" * 4)
    shutil.copytree(w / "run", w / "damaged", ignore=lambda d, names: [n for n in names if n.endswith(".pt") and n != "model.pt"])
    # an unfinished run: its checkpoint, no model file (a finished run keeps none to resume from)
    shutil.copytree(w / "run", w / "unfinished")
    (w / "unfinished" / "model.pt").rename(w / "unfinished" / "checkpoint.pt")
    _flip_weight_bytes(w / "damaged" / "model.pt")

    # broken image folders (training and predict inputs)
    bad = w / "bad"
    for name in ("zero", "trunc", "text", "nonimage", "empty", "multi"):
        (bad / name).mkdir(parents=True)
    for name in ("zero", "trunc", "text", "multi"):
        _png(bad / name / "000.png", np.stack([_texture(20)] * 3, axis=-1))
    (bad / "zero" / "zero.png").write_bytes(b"")
    (bad / "trunc" / "cut.png").write_bytes(_truncated_png(1))
    (bad / "text" / "text.png").write_text("this is not an image\n")
    (bad / "nonimage" / "readme.md").write_text("no images here\n")
    (bad / "multi" / "zero.png").write_bytes(b"")
    (bad / "multi" / "cut.png").write_bytes(_truncated_png(2))
    (bad / "multi" / "text.png").write_text("text\n")
    (bad / "src").mkdir()
    (bad / "src" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken jpeg")

    # broken test sets (evaluate inputs)
    def test_set(name: str) -> Path:
        return Path(shutil.copytree(data, bad / name))

    t = test_set("masksize")
    _png(t / "ground_truth" / "spot" / "000_mask.png", np.zeros((SIZE - 8, SIZE), dtype=np.uint8))
    t = test_set("nomask")
    (t / "ground_truth" / "scratch" / "000_mask.png").unlink()
    t = test_set("notest")
    shutil.rmtree(t / "test")
    t = test_set("multitest")
    (t / "test" / "good" / "000.png").write_bytes(b"")
    (t / "ground_truth" / "scratch" / "000_mask.png").unlink()
    _png(t / "ground_truth" / "spot" / "000_mask.png", np.zeros((SIZE, SIZE // 2), dtype=np.uint8))

    # odd but valid formats
    odd = w / "odd"
    g16 = (_texture(30).astype(np.uint16) * 257)
    _png(odd / "train" / "good" / "g16.png", g16)
    pal = Image.fromarray(_texture(31) % 16, mode="P")
    pal.putpalette([v for i in range(256) for v in (i * 8 % 256, 120, 200 - i % 50)])
    (odd / "train" / "good").mkdir(parents=True, exist_ok=True)
    pal.save(odd / "train" / "good" / "pal.png")
    rgba = np.dstack([np.stack([_texture(32)] * 3, axis=-1), np.full((SIZE, SIZE), 40, np.uint8)])
    _png(odd / "train" / "good" / "rgba.png", rgba)
    _png(odd / "test" / "good" / "long.png", _texture(33, (8, 4000)))  # aspect ratio 500:1
    _png(odd / "test" / "good" / "gray.jpg", _texture(34), quality=95)
    sideways = _texture(35, (SIZE, SIZE + 16))  # stored 80 wide, 64 high; viewed 64 wide, 80 high
    sideways[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    _png(odd / "test" / "spot" / "000.png", sideways, exif=exif.tobytes())
    upright_mask = np.zeros((SIZE + 16, SIZE), dtype=np.uint8)
    upright_mask[:8, SIZE - 8:] = 255
    _png(odd / "ground_truth" / "spot" / "000_mask.png", upright_mask)
    return w


@pytest.fixture(scope="module")
def runner():
    r = CliRunner()
    yield r
    r.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory, runner) -> Path:
    return _build_template(tmp_path_factory.mktemp("corpus"), runner)


@pytest.fixture(scope="module")
def options(template, runner) -> dict[str, set[str]]:
    """The options each command has, read from its --help."""
    found = {}
    for cmd in ("train", "evaluate", "predict", "demo", "info"):
        _, out, _ = runner([cmd, "--help"], template, template.parent / "logs-help")
        found[cmd] = set(re.findall(r"--[a-z][a-z0-9-]*", out))
    return found


_HASHES: dict[tuple[int, int, int, int], str] = {}


def _hash(p: Path) -> str:
    st = p.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _HASHES[key]


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> content hash ('dir' for folders, 'link:<target>' for symbolic links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _hash(p)
    return out


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]
    names: tuple[str, ...] = ()  # every one must appear in the error line
    expect: str = "refuse"  # or "ok"
    cwd: str = "."
    may_change: tuple[str, ...] = ()  # "ok" cases: path prefixes the command may write
    hold_lock: str | None = None  # a folder whose run lock this test holds during the command
    setup: list[str] | None = None  # a command run first (its output is part of "before")


def _cases() -> list[Case]:
    no_cuda = not torch.cuda.is_available()
    c = [
        # -- 1. outputs that are, contain or lie inside an input; folders and files not ours --
        Case("train-out-is-data", ["train", "data", "--out", "data", "--overwrite", *TRAIN], ("--out", "data")),
        Case("train-out-inside-data", ["train", "data", "--out", "data/train", "--overwrite", *TRAIN], ("--out",)),
        Case("train-out-contains-data", ["train", "data/train/good", "--out", "data", "--overwrite", *TRAIN], ("--out",)),
        Case("train-out-user-folder", ["train", "data", "--out", "mine", "--overwrite", *TRAIN], ("mine",)),
        Case("train-out-is-a-file", ["train", "data", "--out", "existing.png", *TRAIN], ("existing.png",)),
        Case("predict-out-is-images", ["predict", "run", "imgs", "--out", "imgs", "--overwrite"], ("--out", "imgs")),
        Case("predict-out-symlink-to-images", ["predict", "run", "imgs", "--out", "link_to_imgs", "--overwrite"], ("--out",)),
        Case("predict-out-is-run", ["predict", "run", "data/test/spot", "--out", "run", "--overwrite"], ("--out", "run")),
        Case("predict-out-inside-run", ["predict", "run", "imgs", "--out", "run/maps", "--overwrite"], ("--out", "run")),
        Case("predict-out-user-folder", ["predict", "run", "imgs", "--out", "mine", "--overwrite"], ("mine",)),
        Case("predict-out-user-folder-no-overwrite", ["predict", "run", "imgs", "--out", "mine"], ("mine",)),
        Case("evaluate-json-existing-file", ["evaluate", "run", "data", "--json", "existing.png"], ("existing.png",)),
        Case("evaluate-json-is-input", ["evaluate", "run", "data", "--json", "data/test/good/000.png", "--overwrite"],
             ("000.png",)),
        Case("evaluate-json-is-folder", ["evaluate", "run", "data", "--json", "mine"], ("mine",)),
        Case("evaluate-json-is-model", ["evaluate", "run", "data", "--json", "run/model.pt", "--overwrite"], ("model.pt",)),
        Case("demo-out-user-folder", ["demo", "mine", "--overwrite", "--image-size", str(SIZE), "--epochs", "1",
                                      "--batch-size", "4", "--quiet"], ("mine",)),
        # -- 2. a run that would do nothing; 3. numbers that are no numbers --
        *[Case(f"train{opt}={val}", ["train", "data", "--out", "new", *TRAIN, opt, val], (opt,)) for opt, val in [
            ("--epochs", "0"), ("--epochs", "-1"), ("--max-steps", "0"), ("--max-steps", "-3"), ("--batch-size", "-4"),
            ("--batch-size", "0"), ("--image-size", "-128"), ("--image-size", "0"), ("--image-size", "32"),
            ("--checkpoint-every", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--stride", "0"),
            ("--stride", "-8"), ("--epochs", "nan"), ("--batch-size", "abc")]],
        *[Case(f"evaluate{opt}={val}", ["evaluate", "run", "data", opt, val], (opt,)) for opt, val in [
            ("--stride", "0"), ("--smooth", "-1"), ("--smooth", "nan")]],
        *[Case(f"predict{opt}={val}", ["predict", "run", "imgs", "--out", "new", opt, val], (opt,)) for opt, val in [
            ("--threshold", "nan"), ("--threshold", "inf"), ("--stride", "-5"), ("--smooth", "-1")]],
        *[Case(f"demo{opt}={val}", ["demo", "new", opt, val, "--quiet"], (opt,)) for opt, val in [
            ("--epochs", "0"), ("--image-size", "0"), ("--batch-size", "-1")]],
        # -- 3. devices, model options, the command line itself --
        Case("train-device-gpu", ["train", "data", "--out", "new", *TRAIN, "--device", "gpu"], ("gpu",)),
        Case("train-device-cuda-99", ["train", "data", "--out", "new", *TRAIN, "--device", "cuda:99"], ("cuda:99",)),
        Case("evaluate-device-gpu", ["evaluate", "run", "data", "--device", "gpu"], ("gpu",)),
        Case("predict-device-cuda-99", ["predict", "run", "imgs", "--out", "new", "--device", "cuda:99"], ("cuda:99",)),
        Case("train-set-unknown-key", ["train", "data", "--out", "new", *TRAIN, "--set", "bogus_key=1"], ("bogus_key",)),
        Case("train-set-wrong-type", ["train", "data", "--out", "new", *TRAIN, "--set", "memory_size=abc"], ("memory_size",)),
        Case("train-set-negative", ["train", "data", "--out", "new", *TRAIN, "--set", "memory_size=-5"], ("memory_size",)),
        Case("train-set-no-equals", ["train", "data", "--out", "new", *TRAIN, "--set", "memory_size"], ("memory_size",)),
        Case("train-unknown-option", ["train", "data", "--out", "new", *TRAIN, "--bogus"], ("--bogus",)),
        Case("predict-missing-out", ["predict", "run", "imgs"], ("--out",)),
        Case("unknown-command", ["frobnicate"], ("frobnicate",)),
        Case("train-anomaly-source-missing", ["train", "data", "--out", "new", *TRAIN, "--anomaly-source", "nowhere"],
             ("nowhere",)),
        Case("train-anomaly-source-broken", ["train", "data", "--out", "new", *TRAIN, "--anomaly-source", "bad/src"],
             ("photo.jpg",)),
        # -- 3./5. model files: foreign, garbage, damaged, missing --
        Case("evaluate-foreign-model", ["evaluate", "foreign.pt", "data"], ("foreign.pt",)),
        Case("predict-foreign-model", ["predict", "foreign.pt", "imgs", "--out", "new"], ("foreign.pt",)),
        Case("evaluate-garbage-model", ["evaluate", "garbage.pt", "data"], ("garbage.pt",)),
        Case("evaluate-damaged-model", ["evaluate", "damaged", "data"], ("model.pt",)),
        Case("predict-damaged-model", ["predict", "damaged", "imgs", "--out", "new"], ("model.pt",)),
        Case("evaluate-not-a-run", ["evaluate", "notarun", "data"], ("notarun",)),
        Case("evaluate-missing-run", ["evaluate", "norun", "data"], ("norun",)),
        Case("predict-data-as-run", ["predict", "data", "imgs", "--out", "new"], ("data",)),
        # -- 4. a run in use by another process --
        Case("train-resume-locked", ["train", "data", "--out", "unfinished", "--resume", "--quiet"], ("unfinished", "PID"),
             hold_lock="unfinished"),
        Case("train-resume-finished", ["train", "data", "--out", "run", "--resume", "--quiet"],
             ("run", "the run is finished")),
        Case("train-overwrite-locked", ["train", "data", "--out", "run", "--overwrite", *TRAIN], ("run", "PID"),
             hold_lock="run"),
        Case("predict-into-locked-run-folder", ["predict", "run", "imgs", "--out", "run", "--overwrite"], ("run",),
             hold_lock="run"),
        # -- bad input files: every one named, in one line --
        Case("train-zero-byte", ["train", "bad/zero", "--out", "new", *TRAIN], ("zero.png",)),
        Case("train-truncated", ["train", "bad/trunc", "--out", "new", *TRAIN], ("cut.png",)),
        Case("train-text-as-png", ["train", "bad/text", "--out", "new", *TRAIN], ("text.png",)),
        Case("train-no-images", ["train", "bad/nonimage", "--out", "new", *TRAIN], ("nonimage",)),
        Case("train-empty-folder", ["train", "bad/empty", "--out", "new", *TRAIN], ("empty",)),
        Case("train-missing-folder", ["train", "nowhere", "--out", "new", *TRAIN], ("nowhere",)),
        Case("train-every-bad-file", ["train", "bad/multi", "--out", "new", *TRAIN], ("zero.png", "cut.png", "text.png")),
        Case("evaluate-mask-size", ["evaluate", "run", "bad/masksize"], ("000_mask.png",)),
        Case("evaluate-missing-mask", ["evaluate", "run", "bad/nomask"], ("000_mask.png",)),
        Case("evaluate-no-test-folder", ["evaluate", "run", "bad/notest"], ("notest",)),
        Case("evaluate-every-bad-file", ["evaluate", "run", "bad/multitest"], ("good/000.png", "scratch", "spot")),
        Case("predict-zero-byte", ["predict", "run", "bad/zero", "--out", "new"], ("zero.png",)),
        Case("predict-every-bad-file", ["predict", "run", "bad/multi", "--out", "new"], ("zero.png", "cut.png", "text.png")),
        Case("predict-every-missing-input", ["predict", "run", "imgs", "nope.png", "gone", "--out", "new"], ("nope.png", "gone")),
        Case("predict-empty-folder", ["predict", "run", "bad/empty", "--out", "new"], ("empty",)),
        # -- odd but valid inputs and ordinary use: these must work --
        Case("train-odd-formats", ["train", "odd", "--out", "new", *TRAIN], expect="ok", may_change=("new",)),
        Case("evaluate-odd-formats-and-exif", ["evaluate", "run", "odd", "--json", "m.json"], expect="ok",
             may_change=("m.json",)),
        Case("predict-odd-formats", ["predict", "run", "odd/test/good", "odd/test/spot", "--out", "new"], expect="ok",
             may_change=("new",)),
        Case("predict-overwrite-own-output", ["predict", "run", "imgs", "--out", "run2", "--overwrite"], expect="ok",
             may_change=("run2",), setup=["predict", "run", "imgs", "--out", "run2"]),
        Case("resume-from-another-folder", ["train", "../data", "--out", "../run", "--resume", "--quiet"],
             ("finished",), cwd="mine"),
        # NB: ``info`` is left out: it loads (and may first compile) the native kernels, minutes of CPU.
    ]
    if no_cuda:
        c.append(Case("train-device-cuda-without-cuda", ["train", "data", "--out", "new", *TRAIN, "--device", "cuda"],
                      ("cuda",)))
    return c


def _params():
    for case in _cases():
        yield pytest.param(case, id=case.id)


def _link_or_copy(src: str, dst: str) -> str:
    """Large files (model and checkpoint files) are hard-linked: the CLI only ever replaces them by
    rename, so a case cannot change the template's copy; small files are copied."""
    if os.path.getsize(src) > 1 << 20:
        os.link(src, dst)
        return dst
    return shutil.copy2(src, dst)


@pytest.mark.parametrize("case", list(_params()))
def test_cli_corpus(case: Case, template: Path, runner: CliRunner, options, tmp_path):
    w = Path(shutil.copytree(template, tmp_path / "w", symlinks=True, copy_function=_link_or_copy))
    if case.setup:
        status, _, err = runner(case.setup, w, tmp_path / "logs-setup")
        assert status == 0, err
    lock = None
    if case.hold_lock:
        from defect_fast.safety import RunLock

        lock = RunLock(w / case.hold_lock).acquire()
    before = _tree(w)
    try:
        status, out, err = runner(case.argv, w / case.cwd, tmp_path / "logs")
    finally:
        if lock is not None:
            lock.release()
    after = _tree(w)
    cmd = case.argv[0]
    shown = f"defect-fast {' '.join(case.argv)}\nstatus {status}\nstderr:\n{err}"

    assert "Traceback" not in err, shown
    if case.expect == "ok":
        assert status == 0, shown
        kept = {k: v for k, v in before.items() if not k.startswith(case.may_change or ("\0",))}
        changed = sorted(k for k, v in kept.items() if after.get(k) != v)
        assert not changed, f"{shown}\nchanged or lost: {changed}"
        return

    # (a run lock's content is the PID of its holder: this test's own lock changes it)
    lost = sorted(k for k, v in before.items() if after.get(k) != v and Path(k).name not in LOCK_NAMES)
    assert not lost, f"{shown}\nlost or changed: {lost}"
    assert status == 2, shown
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("defect-fast: warning:")]
    assert len(lines) == 1 and lines[0].startswith("defect-fast: error: "), shown
    for name in case.names:
        assert name in lines[0], f"{shown}\n(the error does not name {name!r})"
    suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", lines[0])) - set(case.argv)
    foreign = suggested - options.get(cmd, set()) - {"--help"}
    assert not foreign, f"{shown}\n(suggests options {cmd} does not have: {sorted(foreign)})"
    new = sorted(k for k in set(after) - set(before) if Path(k).name not in LOCK_NAMES)
    assert not new, f"{shown}\nhalf-made output left behind: {new}"
