"""Export: every format reproduces the Python Detector, runs without this package, carries its sidecar."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import defect_fast
from defect_fast.cli import main
from defect_fast.detect import Detector
from defect_fast.models import build_model
from defect_fast.runs import atomic_save

OPTIONS = ["--stride", "32", "--blend", "hann", "--smooth", "1.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with an untrained CMA-AE (memory 20, 128 px), calibration and per-position normalisation."""
    torch.manual_seed(0)
    m = build_model("cmaae", memory_size=20)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(5)
    norm = {"mean": torch.rand(128, 128, generator=g) * 0.01, "std": 0.001 + 0.001 * torch.rand(128, 128, generator=g)}
    atomic_save({"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128,
                 "calibration": {"pixel_q999": 0.02, "score_max": 0.03}, "normalization": norm}, run / "model.pt")
    return run


def _images(n, seed=1):
    return torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _run_exported(fmt, path, x):
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(a) for a in sess.run(["maps", "scores"], {"images": x.numpy()})]
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("torchscript", "ts"), ("exported", "pt2")])
def test_export_matches_the_detector(run, tmp_path, fmt, suffix):
    out = tmp_path / f"det.{suffix}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--batch", "2", *OPTIONS]) == 0
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["format"] == fmt and meta["image_size"] == 128 and meta["model"] == "cmaae" and meta["batch"] == 2
    assert meta["thresholds"] == {"pixel": 0.02, "score": 0.03} and meta["normalization"]["kind"] == "per-position"
    assert meta["package_version"] == defect_fast.__version__ and meta["source_digest"].startswith("sha256:")
    assert meta["stride"] == 32 and meta["blend"] == "hann" and meta["smooth_sigma"] == 1.5

    det = Detector.load(run, device="cpu", stride=32, blend="hann", smooth_sigma=1.5, precision="float32")
    x = _images(3 if meta["dynamic_batch"] else 2)
    with torch.no_grad():
        want_maps, want_scores = det(x)
        maps, scores = _run_exported(fmt, out, x)
    assert maps.shape == want_maps.shape and scores.shape == want_scores.shape
    torch.testing.assert_close(maps, want_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=0, rtol=1e-5)
    assert float(want_maps.std()) > 0.1  # maps of order 1: the 1e-4 tolerance is a real test


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("torchscript", "ts"), ("exported", "pt2")])
def test_exported_files_refuse_float_images_and_other_sizes(run, tmp_path, fmt, suffix):
    """Every format refuses what its graph was not traced for (the Detector's float input in
    [-1, 1], images not S x S), instead of returning wrong maps; TorchScript says what it takes."""
    out = tmp_path / f"det.{suffix}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    x = _images(2)
    for bad, said in ((x.float() / 127.5 - 1, "uint8"), (x[:, :, :96, :96], "S = 128"), (x[:0], "B >= 1")):
        with pytest.raises(Exception) as info:  # (no images: a reshape's error, not what it takes)
            _run_exported(fmt, out, bad)
        if fmt == "torchscript":  # its last line (TorchScript's trace above it quotes the checks' source)
            assert "defect_fast detector: images must be" in str(info.value).strip().splitlines()[-1]
            assert said in str(info.value).strip().splitlines()[-1]
    if fmt == "torchscript":
        assert torch.jit.load(str(out)).image_size == 128  # what the C++ runner resizes to


@pytest.mark.parametrize("taken", ["file", "description"])
def test_export_never_replaces_a_file_written_at_its_names_during_the_export(run, tmp_path, monkeypatch, capsys, taken):
    """Two exports to one --out without --overwrite both said "wrote", the second's file over the
    first's (the names were checked before the trace only). A file another process puts at either
    name meanwhile is kept, and the export refused, leaving none of its own files."""
    import os

    out = tmp_path / "det.ts"
    theirs = out if taken == "file" else out.with_name("det.ts.json")
    real = os.fsync

    def fsync(fd):  # the other export finishes during this one's write (after every check)
        if not theirs.exists():
            theirs.write_text("theirs")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{theirs}: a file appeared there while the detector was exported; not replacing it (pass --overwrite" in err
    assert theirs.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_takes_a_name_another_command_reserves_during_the_export(run, tmp_path, monkeypatch, capsys,
                                                                              overwrite):
    """A predict folder that reserved the export's description name during the export (after its
    checks): the export's file was left behind without its description, and with --overwrite the
    description took the name, for predict to replace at its end. The export is refused, leaving
    none of its files and the earlier file --overwrite was to replace."""
    import os

    from defect_fast.safety import OutputFolder

    predict = OutputFolder.create(tmp_path / "P", command="predict", lock=True)
    out = predict.path / "scores"  # its description: P/scores.json
    if overwrite:  # an earlier export's file (its description gone): --overwrite was to replace it
        out.write_bytes(b"earlier")
    real = os.fsync
    reserved = []

    def fsync(fd):
        if not reserved:
            reserved.append(True)
            predict.reserve(["scores.json"])
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["export", str(run), "--format", "torchscript", "--out", str(out)] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 2
    assert "scores.json: is part of the output of 'defect-fast predict'" in capsys.readouterr().err
    left = sorted([".defect_fast-manifest.json", ".defect_fast.lock"] + (["scores"] if overwrite else []))
    assert sorted(p.name for p in predict.path.iterdir()) == left
    if overwrite:  # put back, not lost with the refused export
        assert out.read_bytes() == b"earlier"
    predict.release()


def test_export_carries_the_training_images_proportions(run, tmp_path):
    """The training images' width:height range (model.pt's trained_proportions), which the
    package's readers warn by, was left out of the export: a program stretching photos to S x S
    could not tell one far outside it. The sidecar carries it with the margin, TorchScript files
    as attributes (the C++ runner warns by them); a run without the record exports none."""
    state = torch.load(run / "model.pt", weights_only=True)
    state["trained_proportions"] = [0.36, 2.6]
    ranged = tmp_path / "ranged"
    ranged.mkdir()
    atomic_save(state, ranged / "model.pt")
    for source, want in ((ranged, [0.36, 2.6]), (run, None)):
        out = tmp_path / f"{source.name}.ts"
        assert main(["export", str(source), "--format", "torchscript", "--out", str(out)]) == 0
        meta = json.loads(out.with_name(out.name + ".json").read_text())
        assert meta["trained_proportions"] == want and meta["proportions_margin"] == (1.25 if want else None)
        ts = torch.jit.load(str(out))
        assert ts.trained_proportions == (want or []) and ts.proportions_margin == (1.25 if want else 0.0)


@pytest.mark.parametrize("fmt,suffix", [("exported", "pt2"), ("onnx", "onnx")])
def test_export_with_the_runs_own_settings(run, tmp_path, fmt, suffix):
    """No inference options: tiles (stride = patch, no blending), the stitching that returns a
    reshaped view (a path the tests with OPTIONS never take)."""
    out = tmp_path / f"det.{suffix}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["dynamic_batch"] and meta["batch"] == 1  # traced at batch 1 (the default), any batch runs
    det = Detector.load(run, device="cpu", precision="float32")
    x = _images(3)
    with torch.no_grad():
        want_maps, want_scores = det(x)
        maps, scores = _run_exported(fmt, out, x)
    torch.testing.assert_close(maps, want_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=0, rtol=1e-5)


def test_bfloat16_torchscript_is_the_bfloat16_detector(run, tmp_path):
    """--precision bfloat16: the tuned graph (bf16 weights and layers, channels-last, ops and maps in
    float32) in a TorchScript file; its maps are the bf16 Detector's, for any batch (bf16 is emulated
    on CPUs without AVX512-BF16/AMX: slow there, the same numbers)."""
    out = tmp_path / "det_bf16.ts"
    assert main(["export", str(run), "--format", "torchscript", "--precision", "bfloat16", "--out", str(out),
                 *OPTIONS]) == 0
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["precision"] == "bfloat16" and meta["thresholds"] == {"pixel": 0.02, "score": 0.03}
    bf16 = Detector.load(run, device="cpu", stride=32, blend="hann", smooth_sigma=1.5, precision="bfloat16")
    f32 = Detector.load(run, device="cpu", stride=32, blend="hann", smooth_sigma=1.5, precision="float32")
    x = _images(3)
    module = torch.jit.load(str(out))
    with torch.no_grad():
        want_maps, want_scores = bf16(x)
        maps, scores = module(x)
        f32_maps = f32(x)[0]
    scale = float(want_maps.abs().max())
    torch.testing.assert_close(maps, want_maps, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-4 * float(want_scores.abs().max()), rtol=0)
    assert float((maps - f32_maps).abs().max()) > 1e-3 * float(f32_maps.abs().max())  # bf16 arithmetic, not float32
    assert torch.corrcoef(torch.stack([maps.flatten(), f32_maps.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("fmt", ["onnx", "exported"])
def test_bfloat16_export_is_torchscript_only(run, tmp_path, capsys, fmt):
    out = tmp_path / f"det.{'pt2' if fmt == 'exported' else 'onnx'}"
    assert main(["export", str(run), "--format", fmt, "--precision", "bfloat16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--precision bfloat16" in err and "torchscript" in err and not out.exists()


def test_export_refuses_to_overwrite(run, tmp_path, capsys):
    out = tmp_path / "det.ts"
    out.write_bytes(b"keep")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_a_torch_export_program_under_another_name_than_pt2_is_refused(run, tmp_path, capsys):
    """torch.export.load reads a program from a name ending in .pt2 (of another, it said "Unable to
    load package ... f must be a buffer or a file ending in .pt2" and may not read it at all)."""
    out = tmp_path / "det.exported"
    assert main(["export", str(run), "--format", "exported", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "det.exported" in err and ".pt2" in err
    assert list(tmp_path.iterdir()) == []


def test_export_far_writes_that_rate_s_threshold_in_the_sidecar(run, tmp_path, capsys):
    """--far: the sidecar's image threshold is the one predict --far uses; a run without held-back
    scores is refused before any file is written."""
    import warnings

    from defect_fast.calibration import calibrate

    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "a.ts"), "--far", "0.05"]) == 2
    assert capsys.readouterr().err.startswith("defect-fast: error: --far 0.05: ")
    assert not (tmp_path / "a.ts").exists() and not (tmp_path / "a.ts.json").exists()
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state["calibration"] = calibrate(torch.arange(60, dtype=torch.float32), far=0.01)
    held = tmp_path / "held"
    held.mkdir()
    atomic_save(state, held / "model.pt")
    assert main(["export", str(held), "--format", "torchscript", "--out", str(tmp_path / "b.ts"), "--far", "0.05"]) == 0
    meta = json.loads((tmp_path / "b.ts.json").read_text())
    assert meta["thresholds"]["score"] == 57.0 and "far 0.05" in meta["threshold_source"]  # the 3rd largest of 0..59
    assert main(["export", str(held), "--format", "torchscript", "--out", str(tmp_path / "c.ts")]) == 0
    assert json.loads((tmp_path / "c.ts.json").read_text())["thresholds"]["score"] == 59.0  # stored: the largest


def test_export_refuses_an_output_inside_the_run_even_with_overwrite(run, tmp_path, capsys):
    model = run / "model.pt"
    before = model.read_bytes()
    for out in (model, run / "det.ts"):
        assert main(["export", str(run), "--format", "torchscript", "--out", str(out), "--overwrite"]) == 2
        assert "lies inside the input" in capsys.readouterr().err
    assert model.read_bytes() == before and not (run / "det.ts").exists() and not (run / "model.pt.json").exists()


def test_export_refuses_to_replace_a_description_beside_the_file(run, tmp_path, capsys):
    notes = tmp_path / "det.ts.json"
    notes.write_text('{"my": "notes"}')
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "det.ts")]) == 2
    err = capsys.readouterr().err
    assert "det.ts.json" in err and "--overwrite" in err
    assert notes.read_text() == '{"my": "notes"}' and not (tmp_path / "det.ts").exists()
    (tmp_path / "w.onnx.json").mkdir()  # a folder where the description goes: refused before any work
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "w.onnx"), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err and not (tmp_path / "w.onnx").exists()


@pytest.mark.parametrize("smooth", ["0", "1.5"])
def test_the_onnx_graph_gives_the_maps_sides(run, tmp_path, smooth):
    """With the run's per-position normalisation, blended patches and no smoothing, the graph's
    "maps" output had sides of no known size (['batch', 'Divmaps_dim_1', 'Divmaps_dim_2']), though
    its input is S x S."""
    import onnx

    out = tmp_path / "det.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--stride", "32", "--blend", "hann",
                 "--smooth", smooth]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)  # the declaration agrees with the graph's shape inference
    sides = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert sides == {"maps": ["batch", 128, 128], "scores": ["batch"]}
    maps, scores = _run_exported("onnx", out, _images(3))
    assert maps.shape == (3, 128, 128) and scores.shape == (3,)


def test_onnx_export_without_the_onnx_package_is_one_line(run, tmp_path, capsys, monkeypatch):
    """onnx is not a dependency (the `export` extra): its absence was an internal error and a traceback."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "w.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install onnx" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.onnx").exists()


def test_tracing_checks_work_on_a_torch_without_is_exporting(monkeypatch):
    """torch.compiler.is_exporting is newer than the oldest torch the package accepts; every map
    asks whether it is traced (tracing()), which raised AttributeError there."""
    from defect_fast.tracing import exporting, tracing

    monkeypatch.delattr(torch.compiler, "is_exporting")
    assert tracing() is False and exporting() is False


def test_an_interrupted_export_leaves_no_file(run, tmp_path, monkeypatch):
    out = tmp_path / "det.ts"

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    from defect_fast.export import export

    monkeypatch.setattr(torch.jit, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        export(run, out, "torchscript")
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary, no description


def test_a_batch_this_process_cannot_hold_is_refused_by_its_argument(tmp_path):
    """--batch 100000000 at 64 px: a 1.1 TiB example batch was torch's allocation error, printed as an
    internal error. It is the argument's error, before the detector is touched or a file written."""
    from defect_fast.export import ExportError, export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    before = det.batch_size
    with pytest.raises(ExportError, match=r"--batch 100000000: .* needs 5722\.0 GiB with its float copy, more than "
                                          r"this process can allocate; give a smaller --batch"):
        export_detector(det, tmp_path / "b.ts", "torchscript", batch=100_000_000)
    assert det.batch_size == before and list(tmp_path.iterdir()) == []


def test_a_batch_whose_float_copy_this_process_cannot_hold_is_refused_by_its_argument(tmp_path, monkeypatch):
    """The uint8 example batch fitted, its float copy inside the trace did not: an internal error."""
    from defect_fast.export import ExportError, export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    real = torch.Tensor.new_empty

    def no_room_for_floats(self, size, *args, dtype=None, **kwargs):
        if dtype == torch.float32 and tuple(size)[:1] == (5,):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 245760 bytes")
        return real(self, size, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", no_room_for_floats)
    with pytest.raises(ExportError, match=r"--batch 5: .* more than this process can allocate"):
        export_detector(det, tmp_path / "b.ts", "torchscript", batch=5)
    assert list(tmp_path.iterdir()) == []


def test_export_detector_gives_the_detector_back_and_writes_both_files_or_none(tmp_path):
    """The caller's Detector stays in its mode (and on its device); a description JSON cannot hold
    fails before the exported file is in place (it was left without its description); numpy
    scalars in the calibration are written as numbers; the description says how images of another
    size must be resized to score as the thresholds assume; export's messages name no --threshold."""
    import numpy as np

    from defect_fast.export import export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    det.train()
    det.calibration = {"image_threshold": np.float32(1.5)}
    export_detector(det, tmp_path / "a.ts", "torchscript")
    assert det.training and det.device.type == "cpu"
    # an unfused Detector's model (the caller's own) stays in eval mode, whatever the Detector's
    # flag: its batch norms would otherwise normalise by each batch, and the maps change
    from tests.test_detector import unfused_with_batch_statistics

    unfused, x = unfused_with_batch_statistics()
    model = unfused.model
    with torch.no_grad():
        before = unfused(x)
        export_detector(unfused, tmp_path / "u.ts", "torchscript")
        after = unfused(x)
    assert not any(m.training for m in model.modules())
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    meta = json.loads((tmp_path / "a.ts.json").read_text())
    assert meta["thresholds"]["score"] == 1.5
    assert "PIL Image.resize(BILINEAR)" in meta["input"]["resize"] and "Pillow" in meta["input"]["resize"]
    # and what comes before the resize, which a program following the sidecar missed (a 16-bit grey
    # PNG converted by PIL's convert("RGB") scored 0.052 against the package's 0.011)
    assert "EXIF orientation" in meta["input"]["orientation"] and "65535 -> 255" in meta["input"]["bit_depth"]
    assert "dropped, not blended" in meta["input"]["alpha"]
    # a file that takes any number of images says so in its shapes, not with the batch it was traced with
    assert meta["dynamic_batch"] and meta["input"]["shape"] == ["N", 3, 64, 64] and meta["outputs"]["scores"] == ["N"]
    det.calibration = {"image_threshold": 1.0, "odd": object()}
    with pytest.raises(TypeError):
        export_detector(det, tmp_path / "b.ts", "torchscript")
    assert not (tmp_path / "b.ts").exists() and not (tmp_path / "b.ts.json").exists()
    det.calibration = {"inapplicable": "set on other settings"}
    export_detector(det, tmp_path / "c.ts", "torchscript")
    source = json.loads((tmp_path / "c.ts.json").read_text())["threshold_source"]
    assert "--threshold" not in source and "program that runs the file" in source


def test_export_traces_a_copy_leaving_the_callers_detector_as_it_is(tmp_path, monkeypatch):
    """The export switched the caller's Detector to float32, NCHW and one chunk while it traced:
    a service calling it meanwhile scored in a precision its thresholds were not set in."""
    from defect_fast.export import export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="bfloat16", fuse=False)
    before = (det.precision, det.channels_last, det.batch_size)
    seen, trace = [], torch.jit.trace

    def watched_trace(module, *args, **kwargs):
        seen.append((module is det, (det.precision, det.channels_last, det.batch_size)))
        return trace(module, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", watched_trace)
    # (a file of other rounding than the Detector it was called on is said: its scores are not the Detector's)
    with pytest.warns(UserWarning, match=r"export: the file computes in float32, this Detector in bfloat16: its maps"):
        export_detector(det, tmp_path / "a.ts", "torchscript", precision="float32")
    assert seen == [(False, before)] and before[0] == "bfloat16"
    assert (det.precision, det.channels_last, det.batch_size) == before
    # what a program hangs on its Detector, which no deep copy takes (a lock, a hook of an object holding one)
    import threading

    class Camera:
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def seen(self, module, args, output):
            self.calls += 1

    camera = Camera()
    det.lock = threading.Lock()
    det.register_forward_hook(camera.seen)
    export_detector(det, tmp_path / "b.ts", "torchscript", precision="float32")
    det(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert camera.calls >= 1 and (det.precision, det.channels_last, det.batch_size) == before


def test_torch_export_traces_a_deep_copy_leaving_the_callers_tensors_in_place(tmp_path):
    """torch.export puts stand-in tensors into the modules it traces for the length of the export: on a
    copy that shared the caller's model, a service calling the caller's Detector meanwhile got them."""
    import threading

    from defect_fast.export import ExportError, export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    seen = []
    det.model.register_forward_pre_hook(lambda module, args: seen.append(type(next(det.model.parameters())).__name__))
    export_detector(det, tmp_path / "a.pt2", "exported")
    assert seen and set(seen) == {"Parameter"}
    det.lock = threading.Lock()  # what a deep copy cannot take: one line, nothing written
    with pytest.raises(ExportError, match=r"--format exported traces a deep copy of it.*cannot be copied"):
        export_detector(det, tmp_path / "b.pt2", "exported")
    del det.lock
    w = torch.ones(2, requires_grad=True)
    det.last = w * 2  # a tensor that is no graph leaf: torch's own RuntimeError, said in one line too
    with pytest.raises(ExportError, match=r"cannot be copied \(RuntimeError: Only Tensors created explicitly"):
        export_detector(det, tmp_path / "b.pt2", "exported")
    assert not (tmp_path / "b.pt2").exists()


def test_torchscript_runs_without_the_package(run, tmp_path):
    out = tmp_path / "det.ts"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    x = _images(1)
    torch.save(x, tmp_path / "x.pt")
    det = Detector.load(run, device="cpu", precision="float32")
    with torch.no_grad():
        _, want = det(x)
    code = ("import sys; sys.modules['defect_fast'] = None\n"  # any import of the package fails
            "import torch\n"
            f"m = torch.jit.load({str(out)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "print(float(m(x)[1][0]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) == pytest.approx(float(want[0]), rel=1e-5)
    assert "defect_fast::" not in str(torch.jit.load(str(out)).inlined_graph)  # no custom op left in the graph


@pytest.mark.parametrize("context,level", [(False, False), (True, False), (True, True)])
def test_onnx_export_of_a_two_level_perceptual_map_matches_the_detector(tmp_path, monkeypatch, context, level):
    """The recommended runs map with the perceptual map (image pyramid 1 2), with and without the
    image context: the exported graph carries the AlexNet trunk, both levels' statistics and the
    2x2 averaging (and the context, which takes the image's conv1-2 from the perceptual map), and
    with ``level`` each image's brightness levelling (the recommended run's since v7)."""
    import defect_fast.context as context_module
    from defect_fast.perceptual import PerceptualMap, reference_brightness
    from tests.test_context import RandomTrunkContext
    from tests.test_perceptual import _trunk

    torch.manual_seed(0)
    m = build_model("cmaae", memory_size=20)
    pm = PerceptualMap(128, trunk=_trunk(), scales=(1, 2))
    det = Detector(m, image_size=128, stride=32, blend="hann", precision="float32")
    normal = _images(12 if context else 4, seed=3)
    pm.brightness = reference_brightness(normal) if level else None
    with torch.no_grad():
        x = det._to_model_input(normal)
        pm.fit([(x, det._stitched_recon(x))])
    state = {"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128,
             "perceptual": pm.state(), "detector": {"map_kind": "perceptual", "stride": 32, "blend": "hann",
                                                    "smooth_sigma": 2.0}}
    if context:
        monkeypatch.setattr(context_module, "ImageContext", RandomTrunkContext)
        det = Detector(m, image_size=128, stride=32, blend="hann", smooth_sigma=2.0, precision="float32",
                       map_kind="perceptual", perceptual=pm)
        det.fit_context(normal, _images(4, seed=5), level_brightness=level)
        state["context"] = det.context.state()
    run = tmp_path / "run"
    run.mkdir()
    atomic_save(state, run / "model.pt")
    out = tmp_path / "det.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--batch", "2"]) == 0
    det = Detector.load(run, device="cpu", precision="float32")
    assert det.map_kind == "perceptual" and det.image_map.scales == (1, 2)
    assert det._shared_stem(det.context) == (2 if context else 0)
    x = _images(2, seed=4)
    with torch.no_grad():
        want_maps, want_scores = det(x)
    maps, scores = _run_exported("onnx", out, x)
    torch.testing.assert_close(maps, want_maps, atol=1e-4 * float(want_maps.abs().max()), rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=0, rtol=1e-4)


def test_bfloat16_torchscript_of_the_recommended_pipeline(tmp_path, monkeypatch):
    """The recommended run's pipeline (perceptual map on a two-level pyramid, image context, Hann
    blending, smoothing) exports in bf16 too: the file's maps and scores are the bf16 Detector's."""
    import copy

    import defect_fast.context as context
    from defect_fast.export import export_detector
    from tests.test_context import RandomTrunkContext
    from tests.test_detector_cuda import SIZE, _model, _recommended

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    kw, x = _recommended("cmaae")
    det = Detector(_model("cmaae"), SIZE, precision="bfloat16", **copy.deepcopy(kw))
    out = export_detector(det, tmp_path / "rec_bf16.ts", "torchscript", precision="bfloat16")
    with torch.no_grad():
        want_maps, want_scores = det(x)
        maps, scores = torch.jit.load(str(out))(x)
    torch.testing.assert_close(maps, want_maps, atol=1e-4 * float(want_maps.abs().max()), rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-4 * float(want_scores.abs().max()), rtol=0)


def test_export_detector_refuses_to_replace_files_and_keeps_the_pair_together(tmp_path, monkeypatch):
    """The Python API refuses existing files as the command does; with overwrite a failure before
    the renames leaves the earlier file and description as they were; read_sidecar checks that the
    description is the file's."""
    import defect_fast.export as ex
    from defect_fast.export import ExportError, export_detector, read_sidecar

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    out = tmp_path / "a.ts"
    out.write_bytes(b"line 3's model")
    with pytest.raises(ex.UserError, match="a.ts: file exists"):
        export_detector(det, out, "torchscript")
    assert out.read_bytes() == b"line 3's model" and not (tmp_path / "a.ts.json").exists()
    (tmp_path / "b.ts.json").mkdir()  # a folder where the description goes: refused before any work
    with pytest.raises(ex.UserError, match="is a folder"):
        export_detector(det, tmp_path / "b.ts", "torchscript", overwrite=True)
    assert not (tmp_path / "b.ts").exists()

    export_detector(det, out, "torchscript", overwrite=True)
    meta = read_sidecar(out)
    assert meta["file_digest"].startswith("sha256:") and meta["image_size"] == 64
    pair = (out.read_bytes(), (tmp_path / "a.ts.json").read_bytes())
    opened = []
    real_open = ex.atomic_open

    def fail_on_the_file(path, *args, **kwargs):  # the description is ready; the file's write fails
        opened.append(path)
        if len(opened) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    det.calibration = {"image_threshold": 2.0}
    monkeypatch.setattr(ex, "atomic_open", fail_on_the_file)
    with pytest.raises(OSError):
        export_detector(det, out, "torchscript", overwrite=True)
    monkeypatch.undo()
    assert (out.read_bytes(), (tmp_path / "a.ts.json").read_bytes()) == pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ts", "a.ts.json", "b.ts.json"]  # no temporaries

    out.write_bytes(out.read_bytes() + b"\0")  # the file replaced without its description
    with pytest.raises(ExportError, match=r"a\.ts\.json: describes another file than a\.ts"):
        read_sidecar(out)
    desc = json.loads((tmp_path / "a.ts.json").read_text())
    del desc["file_digest"]
    (tmp_path / "a.ts.json").write_text(json.dumps(desc))
    with pytest.raises(ExportError, match="records no file_digest"):
        read_sidecar(out)
    (tmp_path / "a.ts.json").unlink()
    with pytest.raises(ExportError, match="no description beside a.ts"):
        read_sidecar(out)


def test_exporting_the_ssim_map_leaves_later_maps_as_they_were(tmp_path):
    """torch.export runs the pipeline on fake tensors: the SSIM map's window, made on first use and
    kept per device, was kept as a fake tensor when the export was the process's first SSIM map,
    and every later map read uninitialised memory (scores 6e31), a second export failed. Now no
    tensor made while tracing is kept."""
    from defect_fast.export import export_detector
    from defect_fast.models.cmaae import anomaly_map

    torch.manual_seed(0)
    det = Detector(build_model("ae-ssim").eval(), image_size=128, map_kind="ssim", stride=32, precision="float32")
    x = _images(2)
    before = det.predict(x)
    anomaly_map._taps.cache_clear()  # as in a process whose first SSIM map is the export's
    for i in range(2):
        export_detector(det, tmp_path / f"det{i}.pt2", "exported", batch=2)
    after = det.predict(x)
    torch.testing.assert_close(after["scores"], before["scores"], rtol=0, atol=0)
    torch.testing.assert_close(after["maps"], before["maps"], rtol=0, atol=0)
    maps, scores = _run_exported("exported", tmp_path / "det1.pt2", x)
    torch.testing.assert_close(scores, before["scores"], rtol=1e-5, atol=0)


def test_a_constant_made_while_tracing_is_not_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from defect_fast.tracing import constant_cache

    made = []

    @constant_cache(maxsize=2)
    def ones(n):
        made.append(n)
        return torch.ones(n)

    with FakeTensorMode():
        fake = ones(3)
    assert type(fake) is not torch.Tensor
    real = ones(3)
    assert type(real) is torch.Tensor and float(real.sum()) == 3.0 and ones(3) is real and made == [3, 3]
    ones(4), ones(5)  # beyond maxsize: let go, made again
    assert ones(3) is not real and made == [3, 3, 4, 5, 3]


def test_a_batch_of_zero_images_is_refused_by_its_argument(tmp_path):
    from defect_fast.export import ExportError, export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    with pytest.raises(ExportError, match=r"^--batch must be >= 1, got 0$"):
        export_detector(det, tmp_path / "b.ts", "torchscript", batch=0)
    assert list(tmp_path.iterdir()) == []


def test_a_torchscript_export_holds_no_memory_beyond_its_buffers(tmp_path):
    """With a stride that does not divide the patch, the overlap count was a view into a larger
    storage F.fold had returned, which torch.jit.save writes whole: each file carried kilobytes of
    whatever the process had left there, and two exports of one Detector differed."""
    from defect_fast.export import export_detector

    det = Detector(build_model("cmaae", memory_size=10), image_size=67, stride=3, precision="float32")
    for name, buf in det.named_buffers():
        assert buf.untyped_storage().nbytes() == buf.numel() * buf.element_size(), name
    import zipfile

    stored = []
    for name in ("a.ts", "b.ts"):  # (the code's class names differ between two traces of one process)
        export_detector(det, tmp_path / name, "torchscript")
        with zipfile.ZipFile(tmp_path / name) as z:
            stored.append({n.split("/", 1)[1]: z.read(n) for n in z.namelist() if n.split("/")[1:2] == ["data"]})
    assert stored[0] and stored[0] == stored[1]


def test_an_onnx_export_on_one_thread_is_no_tracing_on_another(tmp_path):
    """torch.onnx.is_in_onnx_export is the process's flag: while one thread exported, every
    Detector of the program took itself for traced (its threads option and checks skipped)."""
    import threading

    pytest.importorskip("onnx")
    from defect_fast.tracing import tracing

    inside, go_on, seen = threading.Event(), threading.Event(), []

    class Held(torch.nn.Module):
        def forward(self, x):
            seen.append(tracing())  # the exporting thread: traced
            inside.set()
            assert go_on.wait(60)
            return x * 2

    def export():
        torch.onnx.export(Held(), (torch.ones(1, 3),), str(tmp_path / "held.onnx"), dynamo=False)

    worker = threading.Thread(target=export)
    worker.start()
    try:
        assert inside.wait(60)
        assert torch.onnx.is_in_onnx_export()  # (the process's flag is set meanwhile)
        assert tracing() is False  # this thread runs for real
    finally:
        go_on.set()
        worker.join(60)
    assert seen and all(seen)


@pytest.mark.parametrize("how", ["torch.export", "torch.compile"])
def test_a_compile_or_torch_export_on_one_thread_is_no_tracing_on_another(how):
    """torch.compiler.is_compiling and is_exporting are the process's flags: while one thread
    compiled (a Detector with compile=True, at each new chunk shape) or exported, every Detector
    of the program took itself for traced, and a fit or a move on one thread ran in the middle of
    another's call (its lock skipped)."""
    import threading

    from defect_fast.tracing import tracing

    inside, go_on, seen = threading.Event(), threading.Event(), []

    class Held(torch.nn.Module):
        def forward(self, x):
            seen.append(tracing())  # the tracing thread's code: traced
            if how == "torch.export":
                inside.set()
                assert go_on.wait(60)
            return x * 2

    def held_backend(gm, example_inputs):  # dynamo hands the graph over while its compile runs
        inside.set()
        assert go_on.wait(60)
        return gm.forward

    def trace():
        if how == "torch.export":
            torch.export.export(Held(), (torch.ones(2, 3),))
        else:
            torch.compile(Held(), backend=held_backend)(torch.ones(2, 3))

    worker = threading.Thread(target=trace)
    worker.start()
    try:
        assert inside.wait(120)
        flag = torch.compiler.is_exporting() if how == "torch.export" else torch.compiler.is_compiling()
        assert flag  # (the process's flag is set meanwhile)
        assert tracing() is False  # this thread runs for real
    finally:
        go_on.set()
        worker.join(120)
    assert seen and all(seen)


def test_an_export_leaves_other_threads_warnings_alone(tmp_path, monkeypatch):
    """The export ignored every warning while it ran, and the filters are the process's: a camera
    thread's warnings (a blank frame) went unsaid meanwhile."""
    import threading
    import warnings

    pytest.importorskip("onnx")
    from defect_fast import export as export_module
    from defect_fast.data import DataWarning

    inside, go_on = threading.Event(), threading.Event()
    real = torch.onnx.export

    def held(*args, **kwargs):
        inside.set()
        assert go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", held)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    det = Detector(build_model("cmaae", memory_size=10), image_size=128, precision="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        worker = threading.Thread(target=lambda: export_module.export_detector(det, tmp_path / "d.onnx", "onnx"))
        worker.start()
        try:
            assert inside.wait(60)
            warnings.warn("camera 2: a blank frame", DataWarning)  # this thread's, during the export
        finally:
            go_on.set()
            worker.join(60)
    assert "camera 2: a blank frame" in shown and (tmp_path / "d.onnx").is_file()
