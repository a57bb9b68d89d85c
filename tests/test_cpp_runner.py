"""The C++ runner (examples/cpp) built against the wheel's LibTorch reproduces the Python Detector."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast.detect import Detector
from defect_fast.export import export_detector
from defect_fast.models import build_model

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "cpp"


def _missing() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not any(Path(p, "png.h").exists() for p in ("/usr/include", "/usr/local/include")):
        return "libpng headers not found (apt-get install libpng-dev)"
    if not any(Path(p, "openssl", "evp.h").exists() for p in ("/usr/include", "/usr/local/include")):
        return "OpenSSL headers not found (apt-get install libssl-dev)"
    return None


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    reason = _missing()
    if reason:
        pytest.skip(f"C++ runner not built: {reason}")
    build = Path(os.environ.get("DEFECT_FAST_CPP_BUILD") or tmp_path_factory.mktemp("cpp-build"))
    conf = subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                          capture_output=True, text=True, timeout=600)
    if conf.returncode != 0 and "uses CUDA but I cannot find the CUDA" in conf.stdout + conf.stderr:
        # a CUDA build of torch: its LibTorch CMake config needs a full CUDA toolkit, absent here
        pytest.skip(f"C++ runner not built: torch {torch.__version__} is a CUDA build and CMake finds no CUDA toolkit "
                    "for its LibTorch")
    assert conf.returncode == 0, conf.stdout[-3000:] + conf.stderr[-3000:]
    res = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return build / "defect_fast_run"


def test_cpp_runner_matches_the_detector(runner, tmp_path):
    torch.manual_seed(0)
    model = build_model("cmaae", memory_size=20)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    det = Detector(model, image_size=128, stride=32, blend="hann", smooth_sigma=1.0, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    rng = np.random.default_rng(0)
    for i in range(2):
        rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        png = tmp_path / f"img{i}.png"
        Image.fromarray(rgb).save(png)
        with torch.no_grad():
            want_maps, want_scores = det(torch.from_numpy(rgb).permute(2, 0, 1)[None])
        out = subprocess.run([str(runner), str(ts), str(png), str(tmp_path / f"map{i}.f32")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        score = float(out.stdout.split()[1])
        assert score == pytest.approx(float(want_scores[0]), rel=1e-5, abs=1e-9)
        got = torch.from_numpy(np.fromfile(tmp_path / f"map{i}.f32", dtype=np.float32).reshape(128, 128))
        torch.testing.assert_close(got, want_maps[0], atol=1e-4, rtol=0)
    # A PNG map for viewing, and a clear error on a bad image.
    assert subprocess.run([str(runner), str(ts), str(tmp_path / "img0.png"), str(tmp_path / "map.png")],
                          capture_output=True, timeout=300).returncode == 0
    assert Image.open(tmp_path / "map.png").size == (128, 128)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = subprocess.run([str(runner), str(ts), str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "bad.png" in bad.stderr


def test_cpp_runner_runs_the_bfloat16_export(runner, tmp_path):
    """The bf16 TorchScript file (``--precision bfloat16``) runs in the same C++ runner, with the
    bf16 Detector's score and map."""
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="bfloat16")
    ts = export_detector(det, tmp_path / "det_bf16.ts", "torchscript", precision="bfloat16")
    rgb = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    with torch.no_grad():
        want_maps, want_scores = det(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    out = subprocess.run([str(runner), str(ts), str(tmp_path / "img.png"), str(tmp_path / "map.f32")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[1]) == pytest.approx(float(want_scores[0]), rel=1e-4, abs=1e-7)
    got = torch.from_numpy(np.fromfile(tmp_path / "map.f32", dtype=np.float32).reshape(128, 128))
    torch.testing.assert_close(got, want_maps[0], atol=1e-4 * float(want_maps.abs().max()), rtol=0)


def _png(path: Path, a: np.ndarray, depth: int, color_type: int, gamma: int | None = None,
         chunks: tuple[tuple[bytes, bytes], ...] = (), size: tuple[int, int] | None = None) -> None:
    """A PNG PIL cannot write: ``a`` [H, W, C] of ``depth`` bits, PNG colour type ``color_type``;
    ``chunks`` (kind, data) after the header; ``size`` (w, h) the header claims, if not ``a``'s."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", *(size or (w, h)), depth, color_type, 0, 0, 0))
    body += b"".join(chunk(kind, data) for kind, data in chunks)
    if gamma is not None:
        body += chunk(b"gAMA", struct.pack(">I", gamma))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_cpp_runner_reads_pngs_as_the_python_reader_does(runner, tmp_path):
    """16-bit grey (scaled) and colour (high byte), a gamma chunk (ignored), alpha and palette
    transparency (dropped), 1-bit grey: the runner's score is the Detector's on the image the
    Python reader makes of the same file."""
    from defect_fast.data.io import read_image

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    rng = np.random.default_rng(2)
    v16 = rng.integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    v8 = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    _png(tmp_path / "grey16.png", v16[..., :1], 16, 0)
    _png(tmp_path / "rgb16.png", v16, 16, 2)
    _png(tmp_path / "gamma.png", v8[..., :3], 8, 2, gamma=100000)  # gamma 1.0: a linear-light file
    _png(tmp_path / "la8.png", v8[..., :2], 8, 4)
    Image.fromarray(v8, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(v8[..., 0] > 127).save(tmp_path / "bits.png")
    pal = Image.fromarray(v8[..., 0] // 16).convert("P")
    pal.putpalette(list(rng.integers(0, 256, 768)))
    pal.save(tmp_path / "palette.png", transparency=3)
    for name in ("grey16.png", "rgb16.png", "gamma.png", "la8.png", "rgba.png", "bits.png", "palette.png"):
        with torch.no_grad():
            _maps, want = det(read_image(tmp_path / name, None)[None])
        out = subprocess.run([str(runner), str(ts), str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (name, out.stderr)
        assert float(out.stdout.split()[1]) == pytest.approx(float(want[0]), rel=1e-5, abs=1e-9), name


def test_cpp_runner_resizes_as_the_python_reader_does(runner, tmp_path):
    """A PNG of another size than the model's: the runner resizes it as the package reads files
    (PIL's 8-bit bilinear, both pass orders), so its score is Detector.predict's of the file (a
    float bilinear before put the scores of magnetic-tile photos up to 0.6 apart at a threshold
    of 6.9); a PNG whose EXIF orientation would turn it is refused, not scored sideways."""
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    rng = np.random.default_rng(4)
    # tall (vertical pass first), wide, mixed up- and down-scaling, enlarged
    for h, w in ((301, 97), (97, 301), (40, 150), (150, 40), (50, 33)):
        png = tmp_path / f"{h}x{w}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(png)
        want = float(det.predict(png)["scores"][0])
        out = subprocess.run([str(runner), str(ts), str(png)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5, abs=1e-9), (h, w)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "turned.png", exif=exif)
    out = subprocess.run([str(runner), str(ts), str(tmp_path / "turned.png")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "EXIF orientation 6" in out.stderr


def test_cpp_runner_warns_of_an_image_of_other_proportions_as_the_package_does(runner, tmp_path):
    """An image far outside the training images' width:height (stretched to the model's square
    otherwise than the images it learnt) was scored by the runner without a word, where the
    package's readers warn: the export carries the proportions, the runner says it in one line on
    stderr after the score, for the images the package's rule (outside_proportions) names and no
    others."""
    import warnings as w

    from defect_fast.data import DataWarning
    from defect_fast.data.io import outside_proportions

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    det.trained_proportions = [0.8, 1.25]  # as a run records its training images'
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    rng = np.random.default_rng(5)
    # inside, at the margin's edge (1.25 x 1.25 = 125:80), wide and tall beyond it
    for (h, w_), outside in (((64, 64), False), ((80, 125), False), ((64, 200), True), ((150, 40), True)):
        png = tmp_path / f"{h}x{w_}.png"
        Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(png)
        with w.catch_warnings():
            w.simplefilter("ignore", DataWarning)  # the Detector says it once (checked below by its rule)
            want = float(det.predict(png)["scores"][0])
        assert (outside_proportions([(w_, h)], [png], det.trained_proportions, "x") is not None) == outside
        out = subprocess.run([str(runner), str(ts), str(png)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5, abs=1e-9)
        if outside:
            ratio = "3.1:1" if w_ > h else "1:3.8"
            assert out.stderr == (f"warning: {png} ({w_}x{h}, {ratio}) is of other proportions than the training images "
                                  "(width:height 1:1.2 to 1.2:1): it is stretched to the model's square input, so its "
                                  "defects are stretched otherwise than the model learnt and can pass unseen: inspect "
                                  "pieces of the trained proportions, or train on images of these\n")
        else:
            assert out.stderr == "", (h, w_)
    # a file of a model that records none (or of an earlier version): nothing said
    det.trained_proportions = None
    plain = export_detector(det, tmp_path / "plain.ts", "torchscript")
    out = subprocess.run([str(runner), str(plain), str(tmp_path / "64x200.png")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stderr == ""


def test_cpp_runner_says_one_line_on_a_failure_and_an_unreadable_proportions_record(runner, tmp_path):
    """The proportions warning comes after the score: a run that fails says its error alone; a
    record that is not two ratios is said, and the image scored."""
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 100, 3), dtype=np.uint8)).save(wide)
    failing = tmp_path / "failing.ts"
    torch.jit.save(torch.jit.script(_Proportioned([1.0, 1.0], shapes_ok=False)), str(failing))
    out = subprocess.run([str(runner), str(failing), str(wide)], capture_output=True, text=True, timeout=300)
    assert _one_line_error(out).startswith(f"{failing}: returned maps of shape [1, 64, 64]")
    odd = tmp_path / "odd.ts"
    torch.jit.save(torch.jit.script(_Proportioned([1.0, 2.0, 3.0])), str(odd))
    out = subprocess.run([str(runner), str(odd), str(wide)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("score ")
    assert out.stderr == ("warning: the detector's proportions record cannot be read (its trained_proportions holds "
                          "3 values, not 2): images of other proportions than the training images are not said\n")
    # what is wrong is named: the margin, an integer list
    for name, module, why in (("margin", _Proportioned([1.0, 2.0], margin=0.5), "its proportions_margin is below 1"),
                              ("ints", _Proportioned([1, 2], kind=List[int]),
                               "its trained_proportions is not a list of floats")):
        path = tmp_path / f"{name}.ts"
        torch.jit.save(torch.jit.script(module), str(path))
        out = subprocess.run([str(runner), str(path), str(wide)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and f"cannot be read ({why})" in out.stderr, out.stderr


class _Proportioned(torch.nn.Module):
    """A pipeline of the runner's shapes at side 32 with a ``trained_proportions`` record a test
    gives; ``shapes_ok=False``: its maps are of another side (a failing file)."""

    def __init__(self, ratios: list, shapes_ok: bool = True, margin: float = 1.25, kind=List[float]):
        super().__init__()
        self.image_size = 32
        self.trained_proportions = torch.jit.Attribute(ratios, kind)
        self.proportions_margin = margin
        self.side = 32 if shapes_ok else 64

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m = torch.nn.functional.interpolate(x.float(), size=[self.side, self.side]).mean(1)
        return m, m.mean((1, 2))


def test_cpp_runner_finds_the_orientation_where_pil_does_and_turns_only_2_to_8(runner, tmp_path):
    """An orientation in a "Raw profile type exif" text chunk (ImageMagick's) or in XMP was missed
    (the image scored sideways, where predict turns it); 0 and 9, which PIL leaves as stored, were
    refused."""
    from PIL import PngImagePlugin

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    pixels = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 48, 3), dtype=np.uint8))

    def run(png: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), str(ts), str(png)], capture_output=True, text=True, timeout=300)

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()  # "Exif\0\0" and the TIFF block, as ImageMagick writes the profile
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n%8d\n%s\n" % (len(raw), raw.hex()))
    pixels.save(tmp_path / "raw.png", pnginfo=info)
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
    pixels.save(tmp_path / "xmp.png", pnginfo=xmp)
    for name, value in (("raw.png", 6), ("xmp.png", 8)):
        with Image.open(tmp_path / name) as im:
            assert im.getexif().get(0x0112) == value  # where PIL, and so predict, finds it
        out = run(tmp_path / name)
        assert out.returncode == 1 and f"EXIF orientation {value}" in out.stderr, (name, out.stdout, out.stderr)
    for value in (0, 9):
        exif[0x0112] = value
        pixels.save(tmp_path / f"o{value}.png", exif=exif)
        out = run(tmp_path / f"o{value}.png")
        assert out.returncode == 0, out.stderr
        want = float(det.predict(tmp_path / f"o{value}.png")["scores"][0])
        assert float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_cpp_runner_never_replaces_an_existing_map_out(runner, tmp_path):
    """MAP_OUT was written over whatever was there, the input photo included."""
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    before = photo.read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    for target in (photo, tmp_path / "notes.txt"):
        out = subprocess.run([str(runner), str(ts), str(photo), str(target)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and f"{target}: exists; give MAP_OUT a new file name" in out.stderr
        assert not out.stdout  # refused before any work
    assert photo.read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    for name in ("map.png", "map.f32"):
        out = subprocess.run([str(runner), str(ts), str(photo), str(tmp_path / name)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "map.png").size == (64, 64) and (tmp_path / "map.f32").stat().st_size == 64 * 64 * 4
    # a run that fails leaves no empty map behind, also one that aborts (a file whose scores are 0-d)
    out = subprocess.run([str(runner), str(ts), str(tmp_path / "missing.png"), str(tmp_path / "m2.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and not (tmp_path / "m2.png").exists()

    class Odd(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            return x.float().mean(1), x.float().mean()

    torch.jit.save(torch.jit.script(Odd()), str(tmp_path / "odd.ts"))
    out = subprocess.run([str(runner), str(tmp_path / "odd.ts"), str(photo), str(tmp_path / "m3.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and not (tmp_path / "m3.png").exists() and not out.stdout
    assert "scores of shape [] for an image of 64x64 pixels, not [1, 64, 64] and [1]: not an export of a defect_fast " \
        "detector" in out.stderr


def test_cpp_runner_refuses_by_name_what_other_torchscript_files_return(runner, tmp_path):
    """The runner read the first two elements of whatever tuple a file returned: an empty tuple
    crashed it (status 139), a 1-tuple was read past its end, a classifier's logits were reported
    as a failure on the image with "please report a bug to PyTorch", and maps of another size than
    the image were written as if they were the map."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.float().mean((2, 3)))

    class Empty(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Tuple[()]:
            return ()

    class One(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
            return (x.float().mean(1),)

    class Halved(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            m = x.float().mean(1)[:, ::2, ::2]
            return m, m.mean((1, 2))

    cases = {"classifier": (Classifier(), "returned a tensor of shape [1, 10], not a pair of tensors (maps, scores)"),
             "empty": (Empty(), "returned a tuple of 0 element(s), not a pair of tensors (maps, scores)"),
             "one": (One(), "returned a tuple of 1 element(s), not a pair of tensors (maps, scores)"),
             "halved": (Halved(), "returned maps of shape [1, 32, 32] and scores of shape [1] for an image of 64x64 "
                                  "pixels, not [1, 64, 64] and [1]")}
    for name, (module, words) in cases.items():
        path = tmp_path / f"{name}.ts"
        torch.jit.save(torch.jit.script(module), str(path))
        out = subprocess.run([str(runner), str(path), str(photo), str(tmp_path / f"{name}.f32")], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 1 and not out.stdout, (name, out.returncode, out.stderr)
        assert out.stderr.strip() == f"{path}: {words}: not an export of a defect_fast detector", name
        assert not (tmp_path / f"{name}.f32").exists()


def test_cpp_runner_refuses_a_nan_or_infinite_map_or_score(runner, tmp_path):
    """A NaN score was printed with status 0: a caller's `score > threshold` is then false, and the
    part passed; the package's commands refuse such maps and scores."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)

    class Broken(torch.nn.Module):
        def __init__(self, where: str):
            super().__init__()
            self.where = where

        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            m = x.float().mean(1)
            if self.where == "map":
                m = m.clone()
                m[0, 0, 0] = float("inf")
                return m, torch.zeros(1)
            return m, m.mean((1, 2)) * float("nan")

    for where in ("score", "map"):
        path = tmp_path / f"{where}.ts"
        torch.jit.save(torch.jit.script(Broken(where)), str(path))
        out = subprocess.run([str(runner), str(path), str(photo), str(tmp_path / f"{where}.png")], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 1 and not out.stdout, (where, out.returncode, out.stdout, out.stderr)
        assert out.stderr.strip() == f"{path}: gives a NaN or infinite {where} for {photo} (its weights or statistics " \
                                     "are not usable)"
        assert not (tmp_path / f"{where}.png").exists()


def test_cpp_runner_does_not_score_a_blank_frame(runner, tmp_path):
    """A frame of one colour throughout (a covered lens) is reproduced and scores low: printed with
    status 0, it passed a caller's `score > threshold`, where predict flags it defective and watch
    sets it aside. It is judged at the model's size, as the package judges it."""
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = tmp_path / "det.ts"
    export_detector(det, ts, "torchscript")
    grey = np.full((96, 80, 3), (120, 130, 140), dtype=np.uint8)
    for name, pixels in (("grey.png", grey), ("black.png", np.zeros((64, 64), dtype=np.uint8))):
        Image.fromarray(pixels).save(tmp_path / name)
        out = subprocess.run([str(runner), str(ts), str(tmp_path / name), str(tmp_path / f"{name}.map")],
                             capture_output=True, text=True, timeout=300)
        assert (out.returncode, out.stdout) == (2, ""), (name, out.returncode, out.stdout, out.stderr)
        assert out.stderr == (f"{tmp_path / name}: a blank frame, one colour throughout (a covered lens, a failed "
                              "exposure?): not a part, not scored\n")
        assert not (tmp_path / f"{name}.map").exists()
    grey[5, 7, 2] += 1  # one value of one channel differs: a photo, scored
    Image.fromarray(grey[:64, :64]).save(tmp_path / "almost.png")
    out = subprocess.run([str(runner), str(ts), str(tmp_path / "almost.png")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("score "), out.stderr


def test_cpp_runner_says_a_png_ends_early(runner, tmp_path):
    """A PNG cut off before its IEND chunk (a copy still in progress) was refused as "Read Error"."""
    torch.manual_seed(0)
    ts = export_detector(Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32"),
                         tmp_path / "det.ts", "torchscript")
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    assert data.endswith(b"IEND\xaeB`\x82")
    for name, cut in (("no_iend.png", data[:-12]), ("half.png", data[: len(data) // 2])):
        (tmp_path / name).write_bytes(cut)
        out = subprocess.run([str(runner), str(ts), str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and not out.stdout
        assert out.stderr.strip() == f"{tmp_path / name}: cannot read PNG (the file ends early: cut off, or still being written)"



def test_cpp_runner_errors_are_one_line_with_status_1_and_no_score(runner, tmp_path):
    """An orientation stored as a big-endian LONG was read as 0 (the image scored sideways where
    predict turns it); a damaged header claiming 1e6 x 1e6 pixels, a scripted raise and a model of
    other outputs aborted the runner (status 134, a C++ backtrace); a MAP_OUT in a missing folder
    was found out after the score was printed."""
    import struct

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, tmp_path / "det.ts", "torchscript")
    pixels = np.random.default_rng(5).integers(0, 256, (64, 48, 3), dtype=np.uint8)

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)

    # orientation 6 as each TIFF type PIL reads as a number (LONG, SLONG, SSHORT, SBYTE), in both
    # byte orders; as a BYTE PIL gives b"\x06", which predict leaves as stored, as the runner does
    # (also under the byte-swapped magics PIL takes: "MM*\0", "II\0*")
    for order, kind, packed, swapped in ((">", 4, ">I", False), ("<", 4, "<I", False), (">", 9, ">i", False),
                                         (">", 8, ">hh", False), ("<", 6, "bxxx", False), (">", 1, "Bxxx", False),
                                         (">", 3, ">HH", True), ("<", 3, "<HH", True)):
        head = (b"MM\x00\x2a" if order == ">" else b"II\x2a\x00") if not swapped else \
            (b"MM\x2a\x00" if order == ">" else b"II\x00\x2a")
        tiff = head + struct.pack(order + "IH", 8, 1) + struct.pack(order + "HHI", 0x0112, kind, 1) \
            + struct.pack(packed, *((6, 0) if packed.endswith(("hh", "HH")) else (6,))) + struct.pack(order + "I", 0)
        _png(tmp_path / "turned.png", pixels, 8, 2, chunks=((b"eXIf", tiff),))
        with Image.open(tmp_path / "turned.png") as im:
            turned = im.getexif().get(0x0112) == 6  # as predict reads it: turned upright
        assert turned == (kind != 1), (order, kind)
        out = run(ts, tmp_path / "turned.png")
        if turned:
            assert out.returncode == 1 and "EXIF orientation 6" in out.stderr and not out.stdout, (order, kind)
        else:
            assert out.returncode == 0, out.stderr
            want = float(det.predict(tmp_path / "turned.png")["scores"][0])
            assert float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5, abs=1e-9)
    _png(tmp_path / "huge.png", pixels[:1, :1], 8, 2, size=(1_000_000, 1_000_000))
    out = run(ts, tmp_path / "huge.png")
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.strip() == (f"{tmp_path / 'huge.png'}: cannot read PNG (implausibly large: 1000000x1000000 pixels, "
                                  "over the 178956970 the Python package (PIL) refuses too)")

    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            if x.size(2) != 32:
                raise RuntimeError("expects 32x32 images")
            return x.float().mean(1), x.float().mean((1, 2, 3))

    torch.jit.save(torch.jit.script(Raises()), str(tmp_path / "raises.ts"))
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    out = run(tmp_path / "raises.ts", tmp_path / "photo.png")
    assert out.returncode == 1 and not out.stdout and len(out.stderr.strip().splitlines()) == 1
    assert "failed on" in out.stderr and "expects 32x32 images" in out.stderr
    out = run(ts, tmp_path / "photo.png", tmp_path / "missing" / "map.png")
    assert out.returncode == 1 and not out.stdout
    assert f"its folder {tmp_path / 'missing'} does not exist" in out.stderr
    out = run(ts, tmp_path / "absent.png")
    assert out.returncode == 1 and "absent.png: cannot open (No such file or directory)" in out.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 64-px detector, its TorchScript file and a 64x64 photo, shared by the tests below."""
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    ts = export_detector(det, folder / "det.ts", "torchscript")
    photo = folder / "photo.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    return SimpleNamespace(det=det, ts=ts, photo=photo)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and not out.stdout, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_cpp_runner_fails_when_the_score_cannot_be_written(runner, small, tmp_path):
    """A score written to a full disk (/dev/full) or a closed stdout was lost with exit status 0
    and nothing on stderr."""
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            out = subprocess.run([str(runner), str(small.ts), str(small.photo), str(tmp_path / "map.png")],
                                 stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        assert out.returncode == 1
        assert out.stderr.strip() == "defect_fast_run: cannot print the score (No space left on device)"
        assert not (tmp_path / "map.png").exists()  # a failed run leaves no map
    out = subprocess.run([str(runner), str(small.ts), str(small.photo), str(tmp_path / "map2.png")],
                         stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))
    assert out.returncode == 1
    assert out.stderr.strip() == "defect_fast_run: cannot print the score (stdout is closed)"
    assert not (tmp_path / "map2.png").exists()


class _Sized(torch.nn.Module):
    """A pipeline of the runner's shapes whose image size attribute (``image_size``, or ``count`` as
    in files of earlier versions) is what a test gives."""

    def __init__(self, name: str, value):
        super().__init__()
        setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m = x.float().mean(1)
        return m, m.mean((1, 2))


def test_cpp_runner_names_the_file_of_an_image_size_of_another_kind(runner, small, tmp_path):
    """An image_size that is no integer, or a count buffer without dimensions, was read outside any
    check: the runner printed the last frame of a C++ backtrace ("frame #7: <unknown function> ...")
    instead of the error."""
    cases = {"text": (("image_size", "64"), "its image_size is a String, not an integer"),
             "scalar": (("count", torch.ones(())), "its count is a tensor of shape [], not a tensor [1, S, S]")}
    for name, ((attr, value), words) in cases.items():
        path = tmp_path / f"{name}.ts"
        torch.jit.save(torch.jit.script(_Sized(attr, value)), str(path))
        out = subprocess.run([str(runner), str(path), str(small.photo)], capture_output=True, text=True, timeout=300)
        assert _one_line_error(out) == f"{path}: {words}: not an export of a defect_fast detector", name


def test_cpp_runner_refuses_an_implausible_image_size(runner, small, tmp_path):
    """A file's image_size was narrowed to an int (2^32 + 64 taken as 64, the image scored), or
    allocated (3e9: "cannot create std::vector larger than max_size()"; 2e5: some 120 GB, "out of
    memory"); 0 and negative sizes fed the image in unresized."""
    for value in (2**32 + 64, 3_000_000_000, 200_000, 32769, 0, -64):
        path = tmp_path / f"size{value}.ts"
        torch.jit.save(torch.jit.script(_Sized("image_size", value)), str(path))
        out = subprocess.run([str(runner), str(path), str(small.photo)], capture_output=True, text=True, timeout=300)
        assert _one_line_error(out) == (f"{path}: its image_size {value} is no image side the runner takes (1 to 32768 "
                                        "pixels): not an export of a defect_fast detector"), value
    path = tmp_path / "count.ts"
    torch.jit.save(torch.jit.script(_Sized("count", torch.ones(1, 1, 0))), str(path))
    out = subprocess.run([str(runner), str(path), str(small.photo)], capture_output=True, text=True, timeout=300)
    assert _one_line_error(out) == (f"{path}: its count's side 0 is no image side the runner takes (1 to 32768 "
                                    "pixels): not an export of a defect_fast detector")
    # a plausible side is taken: the photo resized to 48 x 48, the mean of its pixels the score
    path = tmp_path / "size48.ts"
    torch.jit.save(torch.jit.script(_Sized("image_size", 48)), str(path))
    out = subprocess.run([str(runner), str(path), str(small.photo)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with Image.open(small.photo) as im:
        want = np.asarray(im.convert("RGB").resize((48, 48), Image.BILINEAR), dtype=np.float64).mean()
    assert float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5)


def test_cpp_runner_reads_a_png_wider_or_taller_than_a_million_pixels(runner, small, tmp_path):
    """libpng's default limit of 1,000,000 pixels a side refused a 1 x 1,500,000 strip as "Invalid
    IHDR data", where the Python reader scores it; a header of more pixels than PIL reads is still
    refused by name."""
    strip = np.random.default_rng(10).integers(0, 256, (1, 1_500_000, 1), dtype=np.uint8)
    for name, a in (("wide.png", strip), ("tall.png", strip.reshape(1_500_000, 1, 1))):
        _png(tmp_path / name, a, 8, 0)
        want = float(small.det.predict(tmp_path / name)["scores"][0])
        out = subprocess.run([str(runner), str(small.ts), str(tmp_path / name)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout.split()[1]) == pytest.approx(want, rel=1e-5, abs=1e-9), name
    _png(tmp_path / "long.png", strip[:, :1], 8, 0, size=(2**31 - 1, 1))  # the widest header PNG allows
    out = subprocess.run([str(runner), str(small.ts), str(tmp_path / "long.png")], capture_output=True, text=True,
                         timeout=300)
    assert _one_line_error(out) == (f"{tmp_path / 'long.png'}: cannot read PNG (implausibly large: 2147483647x1 "
                                    "pixels, over the 178956970 the Python package (PIL) refuses too)")


def test_cpp_runner_says_what_the_model_file_should_be(runner, small, tmp_path):
    """A run's model.pt (torch.save), a .pt2 export or a text file were reported as torch's
    "PytorchStreamReader failed locating file constants.pkl ... your checkpoint file is corrupted",
    a missing file as "open file failed because of errno 2 on fopen"."""
    small.det.save(tmp_path / "model.pt")
    export_detector(small.det, tmp_path / "det.pt2", "exported")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "folder").mkdir()
    wanted = "a TorchScript file written by `defect-fast export RUN --format torchscript`"
    cases = {"model.pt": f"a checkpoint written by torch.save (such as a run's model.pt), not {wanted}",
             "det.pt2": f"a program written by torch.export (a .pt2 file, `defect-fast export --format exported`), "
                        f"not {wanted}",
             "notes.txt": f"not {wanted} (not a zip archive: another kind of file, or cut off)",
             "folder": f"is a directory, not {wanted}",
             "missing.ts": "does not exist"}
    for name, words in cases.items():
        out = subprocess.run([str(runner), str(tmp_path / name), str(small.photo)], capture_output=True, text=True,
                             timeout=300)
        assert _one_line_error(out) == f"{tmp_path / name}: {words}", name
    out = subprocess.run([str(runner), str(small.ts), str(small.photo)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_cpp_runner_names_a_folder_an_empty_file_and_an_odd_map_out(runner, small, tmp_path):
    """A folder given as IMAGE was "cannot read PNG (Read Error)", an empty file "ends early: cut off,
    or still being written", a MAP_OUT under a file "its folder ... does not exist"; "" as MAP_OUT
    was taken as no map, and "map.PNG" was written as raw float32."""
    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")
    assert _one_line_error(run(small.ts, tmp_path)) == f"{tmp_path}: is a directory, not a PNG file"
    assert _one_line_error(run(small.ts, tmp_path / "empty.png")) == \
        f"{tmp_path / 'empty.png'}: cannot read PNG (the file is empty)"
    for target in (tmp_path / "notes.txt" / "map.png", tmp_path / "notes.txt" / "sub" / "map.png"):
        assert _one_line_error(run(small.ts, small.photo, target)) == \
            f"{target}: cannot write ({tmp_path / 'notes.txt'} is a file, not a folder)"
    assert _one_line_error(run(small.ts, small.photo, "")) == \
        'defect_fast_run: MAP_OUT is "": give it a new file name, or leave it out'
    out = run(small.ts, small.photo, tmp_path / "map.PNG")
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "map.PNG") as im:
        assert im.format == "PNG" and im.size == (64, 64)


def test_cpp_runner_refuses_a_model_file_its_description_does_not_describe(runner, small, tmp_path):
    """A copy of the model file with a block of zeros in it loaded and scored with status 0
    (LibTorch's zip reader checks no CRC): its description, written beside it by export, records
    its SHA-256, and the runner checks it."""
    def run(model) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), str(model), str(small.photo)], capture_output=True, text=True, timeout=300)

    data = bytearray(small.ts.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    damaged = tmp_path / "det.ts"
    damaged.write_bytes(bytes(data))
    shutil.copy(str(small.ts) + ".json", str(damaged) + ".json")
    assert _one_line_error(run(damaged)) == (
        f"{damaged}: its bytes are not those its description {damaged}.json records (file_digest): a damaged copy, "
        "or one of the two replaced without the other; copy or export them again")
    shutil.copy(small.ts, damaged)
    shutil.copy(str(small.ts) + ".json", str(damaged) + ".json")
    out = run(damaged)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    # a digest damaged in the description: refused, not taken for an earlier export's description
    text = Path(str(small.ts) + ".json").read_text()
    assert '"file_digest": "sha256:' in text
    Path(str(damaged) + ".json").write_text(text.replace('"file_digest": "sha256:', '"file_digest": "sha2X6:'))
    assert _one_line_error(run(damaged)) == (
        f"{damaged}.json: its file_digest is not a SHA-256 as export writes it (a damaged description); copy or "
        "export the two files again")
    # a description of an earlier export, without the digest, checks nothing (as none does): said, and scored
    Path(str(damaged) + ".json").write_text('{"image_size": 64}')
    out = run(damaged)
    assert out.returncode == 0 and out.stdout.startswith("score ") and out.stderr.strip() == (
        f"warning: {damaged}.json records no file_digest (an earlier export), so det.ts was not checked against it; "
        "export it again"), out.stderr


def _rezipped(source: Path, target: Path, change) -> Path:
    """``source`` (a TorchScript zip) written again to ``target`` with ``change(name, bytes)`` applied to each record."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))
    return target


def test_cpp_runner_gives_torch_s_reason_for_a_file_it_cannot_load(runner, small, tmp_path):
    """A file from a newer torch (an op this LibTorch lacks, a newer archive version) was reported
    by a line of its source code, or as "not a zip archive ... or cut off"."""
    import re

    def newer_op(name: str, data: bytes) -> bytes:
        if "/code/" in name and name.endswith(".py") and re.search(rb"torch\.(\w+)\(", data):
            return re.sub(rb"torch\.(\w+)\(", rb"torch.\1_v9(", data, count=1)
        return data

    def newer_version(name: str, data: bytes) -> bytes:
        return b"99\n" if name.endswith("/version") else data

    def run(model) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), str(model), str(small.photo)], capture_output=True, text=True, timeout=300)

    op = _rezipped(small.ts, tmp_path / "op.ts", newer_op)
    line = _one_line_error(run(op))
    assert line.startswith(f"{op}: not a loadable TorchScript file (") and "_v9" in line, line
    version = _rezipped(small.ts, tmp_path / "version.ts", newer_version)
    line = _one_line_error(run(version))
    assert line.startswith(f"{version}: not a loadable TorchScript file (") and "version 99" in line, line


def test_cpp_runner_says_a_closed_pipe_and_names_empty_arguments(runner, small, tmp_path):
    """A reader of stdout that went away killed the runner by SIGPIPE (status 141, no word, the map
    left behind); "" as DETECTOR or IMAGE gave ": does not exist"."""
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([str(runner), str(small.ts), str(small.photo), str(tmp_path / "map.png")], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert out.returncode == 1 and out.stderr.strip().startswith("defect_fast_run: cannot print the score ("), out.stderr
    assert not (tmp_path / "map.png").exists()

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)

    assert _one_line_error(run("", small.photo)) == 'defect_fast_run: DETECTOR is "": give a file name'
    assert _one_line_error(run(small.ts, "")) == 'defect_fast_run: IMAGE is "": give a file name'


def test_cpp_runner_reads_a_description_of_any_spacing_and_waits_on_no_fifo(runner, small, tmp_path):
    """50 KB of spaces after "file_digest": (still JSON) overflowed the stack of the regex that read
    it (status 139, no word); a FIFO as the model file, its description or the image made the
    runner wait for ever, and a description linked to /dev/zero was read until memory ran out."""
    import json

    def run(model, image=small.photo) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), str(model), str(image)], capture_output=True, text=True, timeout=120)

    model = tmp_path / "det.ts"
    shutil.copy(small.ts, model)
    digest = json.loads(Path(str(small.ts) + ".json").read_text())["file_digest"]
    Path(str(model) + ".json").write_text('{"file_digest":' + " " * 50000 + json.dumps(digest) + "}")
    out = run(model)
    assert out.returncode == 0 and out.stdout.startswith("score ") and out.stderr == "", out.stderr
    Path(str(model) + ".json").write_text('{"file_digest":' + " " * 50000 + '"sha256:' + "0" * 64 + '"}')
    assert "its bytes are not those its description" in _one_line_error(run(model))  # still checked
    Path(str(model) + ".json").unlink()
    os.mkfifo(str(model) + ".json")
    assert _one_line_error(run(model)) == f"{model}.json: not a regular file, no description"
    Path(str(model) + ".json").unlink()
    Path(str(model) + ".json").symlink_to("/dev/zero")
    assert _one_line_error(run(model)) == f"{model}.json: not a regular file, no description"
    Path(str(model) + ".json").unlink()
    fifo = tmp_path / "fifo.ts"
    os.mkfifo(fifo)
    assert _one_line_error(run(fifo)).startswith(f"{fifo}: is not a regular file, not a TorchScript file")
    image = tmp_path / "camera.png"
    os.mkfifo(image)  # no program writes to it: said, not waited on
    assert _one_line_error(run(model, image)).startswith(f"{image}: ")
    # a pipe being written is read as before (the photo from another program's output)
    with open(small.photo, "rb") as photo:
        piped = subprocess.run([str(runner), str(model), "/dev/stdin"], stdin=photo, capture_output=True, text=True,
                               timeout=120)
    assert piped.returncode == 0 and piped.stdout == run(model).stdout, piped.stderr
    # the first "file_digest" written as export writes it is the one checked (a note naming the key before it)
    Path(str(model) + ".json").write_text('{"note": ["file_digest"], "file_digest": ' + json.dumps(digest) + "}")
    assert run(model).returncode == 0
    # a model file whose name leaves no room for ".json": no description, as before
    long = tmp_path / ("m" * 250 + ".ts")
    shutil.copy(small.ts, long)
    out = run(long)
    assert out.returncode == 0 and out.stdout.startswith("score "), out.stderr
