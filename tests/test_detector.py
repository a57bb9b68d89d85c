"""Detector as one nn.Module: default maps unchanged, tuned path, blending, normalisation, any input, regions, API."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import defect_fast
from defect_fast.data import extract_patches, stitch_patches
from defect_fast import precision
from defect_fast.detect import Detector, default_batch_size, default_precision, find_regions, image_scores
from defect_fast.models import build_model, model_class, model_names
from defect_fast.runs import atomic_save

PKG = Path(defect_fast.__file__).resolve().parent


def _model(name="cmaae"):
    torch.manual_seed(0)
    kw = {"memory_size": 20} if name == "cmaae" else {} if name == "ae-ssim" else \
        {"patch_size": 32, "base_channels": 4, "latent_channels": 8}
    m = build_model(name, **kw)
    for mod in m.modules():  # eval-mode batch norm with non-trivial statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _images(n, size, seed=1):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,map_kind,stride", [("cmaae", "msfr", None), ("cmaae", "residual", 32), ("awae", "msfr", 16),
                                                   ("ae-ssim", "ssim", 32)])
def test_default_pipeline_equals_patch_by_patch_reference(name, map_kind, stride):
    m = _model(name)
    size = 64 if name == "awae" else 128
    det = Detector(m, image_size=size, map_kind=map_kind, stride=stride, precision="float32", channels_last=False)
    x = _images(2, size)
    maps, scores = det(x)
    # Reference: the pre-module pipeline (extract, model, map rule, stitch by averaging, top-0.1 % score).
    xf = x.float() / 127.5 - 1
    patches = extract_patches(xf, m.patch_size, stride)
    with torch.no_grad():
        pm = m.anomaly_maps[map_kind](m, patches, m(patches)["recon"])
    ref = stitch_patches(pm, size, m.patch_size, stride)[:, 0]
    # equal up to float summation order (the native kernels and oneDNN pick per-shape algorithms)
    torch.testing.assert_close(maps, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, image_scores(ref), atol=1e-6, rtol=1e-5)
    # The tuned defaults (channels-last patches cut in one copy, chunks into a reused workspace,
    # stitching by one permute) give the same float32 maps up to summation order.
    tuned = Detector(m, image_size=size, map_kind=map_kind, stride=stride, batch_size=3)
    if tuned.precision == "float32":
        assert tuned.channels_last
        for _ in range(2):
            t_maps, t_scores = tuned(x)
            torch.testing.assert_close(t_maps, ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(t_scores, image_scores(ref), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("blend", ["none", "hann"])
def test_constant_patch_maps_stitch_to_a_constant(blend):
    det = Detector(_model(), image_size=128, stride=16, blend=blend)
    det._patch_maps = lambda p: torch.full((p.shape[0], 1, 64, 64), 0.37)
    maps, scores = det(_images(2, 128))
    torch.testing.assert_close(maps, torch.full_like(maps, 0.37), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores, torch.full((2,), 0.37), atol=1e-6, rtol=0)


def test_hann_blending_removes_seams():
    def step_maps(p):  # each patch a different constant: hard averaging leaves steps at patch edges
        return torch.arange(p.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 64, 64).clone()

    jumps = {}
    for blend in ("none", "hann"):
        det = Detector(_model(), image_size=128, stride=16, blend=blend)
        det._patch_maps = step_maps
        m = det(_images(1, 128))[0][0]
        jumps[blend] = float(m.diff(dim=1).abs().max())
    assert jumps["hann"] < 0.5 * jumps["none"], jumps


def test_fit_normalization_standardises_each_position():
    det = Detector(_model(), image_size=128)
    normal = _images(6, 128, seed=3)
    stats = det.fit_normalization(normal)
    assert stats["mean"].shape == (128, 128) and (stats["std"] > 0).all()
    maps, _ = det(normal)
    torch.testing.assert_close(maps.mean(0), torch.zeros(128, 128), atol=1e-4, rtol=0)
    torch.testing.assert_close(maps.std(0), torch.ones(128, 128), atol=1e-3, rtol=0)
    assert det.normalization()["kind"] == "per-position"
    stats["std"].mul_(10)  # what was returned is the caller's: the Detector's statistics stay as fitted
    torch.testing.assert_close(det(normal)[0], maps, atol=0, rtol=0)


def test_a_region_the_same_in_every_image_is_not_blown_up_by_the_normalisation():
    """A region identical in every defect-free image (a background, a fixture) had a std of about
    0, floored at 1e-6: one grey level more there gave z-scores of 1e3, and every image was
    flagged. The std is floored at a share of its typical value now."""
    from defect_fast.detect import NORM_STD_FLOOR

    det = Detector(_model(), image_size=128, precision="float32")
    normal = _images(6, 128, seed=3)
    normal[:, :, :, :64] = 128  # the left half: grey in every image
    stats = det.fit_normalization(normal)
    rms = float(det.raw_maps(normal).std(0).double().pow(2).mean().sqrt())
    assert float(stats["std"].min()) >= NORM_STD_FLOOR * rms * (1 - 1e-5)
    brighter = normal.clone()
    brighter[:, :, :, :64] += 1  # exposure drift of one grey level
    before, after = det(normal)[1], det(brighter)[1]
    assert float((after - before).abs().max()) < 0.5 * float(before.abs().max()), (before, after)


def test_a_normalisation_fitted_on_identical_maps_is_refused():
    """Identical images give a std of 0 at every position: the floor alone (1e-6) made every later
    map (raw - mean) * 1e6, and a defect whose raw map fell below the mean passed at -15,000."""
    from defect_fast.data.io import DataError

    det = Detector(_model(), image_size=64, precision="float32")
    same = _images(1, 64, seed=3).expand(4, -1, -1, -1).contiguous()
    with pytest.raises(DataError, match="cannot be fitted on 4 images whose maps are identical"):
        det.fit_normalization(same)
    assert det.normalization() == {"kind": "identity"}  # nothing half-fitted


def test_a_normalisation_is_kept_only_for_the_map_and_settings_it_was_fitted_at(tmp_path):
    """Loaded with another map kind, a per-position normalisation fitted on the stored kind's maps
    was applied to the other's (a residual map of mean 0.065 came out at 29.4); loaded with another
    stride, blend or smoothing, the statistics fitted at the run's settings were kept without a word
    (the perceptual map's and the context's too: the map term at +18.7 +- 14.3, not 0 +- 1)."""
    import warnings

    det = Detector(_model(), image_size=128, precision="float32", stride=32)
    det.fit_normalization(_images(6, 128, seed=3))
    path = det.save(tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = Detector.load(path, device="cpu", stride=32)  # as fitted: kept, nothing said
        assert same.normalization()["kind"] == "per-position"
        other = Detector.load(path, device="cpu", map_kind="residual")
        assert other.normalization()["kind"] == "identity"
    with pytest.warns(UserWarning, match=r"the per-position normalisation of the run was fitted at its inference "
                                         r"settings, not at stride 32 -> 64") as said:
        moved = Detector.load(path, device="cpu", stride=64)
    assert [w.filename for w in said] == [__file__]  # the caller's line, not one inside the package
    with pytest.warns(UserWarning, match="fitted at its inference settings") as said:
        defect_fast.load(path, device="cpu", stride=64)
    assert [w.filename for w in said] == [__file__]
    assert moved.normalization()["kind"] == "per-position"
    # the map kind set on a Detector drops it too (and save() then wrote the pairing load() keeps)
    same.map_kind = "residual"
    assert same.normalization()["kind"] == "identity"
    torch.testing.assert_close(same.predict_batched(_images(1, 128))["maps"],
                               other.predict_batched(_images(1, 128))["maps"])


def test_precision_and_channels_last_options():
    x = _images(1, 128)
    base = Detector(_model(), image_size=128, channels_last=False, precision="float32")(x)[0]
    cl = Detector(_model(), image_size=128, channels_last=True, precision="float32")(x)[0]
    torch.testing.assert_close(cl, base, atol=1e-5, rtol=1e-4)
    bf = Detector(_model(), image_size=128, precision="bfloat16")(x)[0]
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()
    assert torch.corrcoef(torch.stack([bf.flatten(), base.flatten()]))[0, 1] > 0.9
    with pytest.raises(ValueError, match="precision"):
        Detector(_model(), image_size=128, precision="float8")
    with pytest.raises(ValueError, match="blend"):
        Detector(_model(), image_size=128, blend="cosine")
    with pytest.raises(ValueError, match="channels_last"):
        Detector(_model(), image_size=128, channels_last="yes")
    with pytest.raises(ValueError, match="batch_size"):
        Detector(_model(), image_size=128, batch_size=-1)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Detector(_model(), image_size=128, cuda_graphs=True)
    with pytest.raises(ValueError, match="threads"):
        Detector(_model(), image_size=128, threads=0)
    with pytest.raises(ValueError, match="threads"):
        Detector(_model(), image_size=128, threads=1.0)
    assert Detector(_model(), image_size=128, threads=np.int64(1)).threads == 1  # numpy's integers as int
    with pytest.raises(ValueError, match="fuse"):
        Detector(_model(), image_size=128, fuse="yes")
    with pytest.raises(ValueError, match="cudnn_benchmark"):
        Detector(_model(), image_size=128, cudnn_benchmark="yes")


def test_cudnn_benchmark_is_scoped_and_leaves_the_setting_as_it_was():
    before = torch.backends.cudnn.benchmark
    try:
        for start in (False, True):
            torch.backends.cudnn.benchmark = start
            with precision.cudnn_benchmark():
                assert torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark == start
            with pytest.raises(RuntimeError), precision.cudnn_benchmark():
                raise RuntimeError("a failed call")
            assert torch.backends.cudnn.benchmark == start
            with precision.cudnn_benchmark(False):  # off: the setting as the user left it
                assert torch.backends.cudnn.benchmark == start
            with precision.cudnn_benchmark(value=False):  # a CUDA graph capture: no timing runs
                assert not torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark == start
        # "auto" is off on a CPU; asked for, it still leaves the setting alone for CPU tensors
        assert Detector(_model(), image_size=128).options()["cudnn_benchmark"] is False
        torch.backends.cudnn.benchmark = False
        det = Detector(_model(), image_size=128, cudnn_benchmark=True)
        seen = []
        det.model.register_forward_pre_hook(lambda _m, _a: seen.append(torch.backends.cudnn.benchmark))
        det(_images(1, 128))
        assert det.options()["cudnn_benchmark"] is True and seen == [False] and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_auto_options_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert default_precision("cpu") == "float32"
    det = Detector(_model(), image_size=128)
    assert det.options() == {"precision": "float32", "channels_last": True, "batch_size": 64, "compile": False,
                             "cuda_graphs": False, "threads": None, "reuse_features": True, "fuse": True,
                             "cudnn_benchmark": False}
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", flag})
        assert default_precision("cpu") == "bfloat16"
        assert Detector(_model(), image_size=128).precision == "bfloat16"
    assert default_batch_size("cpu", 64) == 64 and default_batch_size("cpu", 128) == 16
    assert default_batch_size("cuda", 64) == 4096
    # on CUDA, the device's own capability: bfloat16 from Ampere (8.x) on, float16 on a V100 or T4,
    # where torch.cuda.is_bf16_supported() says yes by emulation
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, want in (((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: asked.append(d) or c)
        assert default_precision("cuda:1") == want
    assert asked and all(torch.device(d) == torch.device("cuda:1") for d in asked)


@pytest.mark.parametrize("batch_size", [0, 1, 3, 64])
def test_chunking_and_workspace_keep_results_apart(batch_size):
    m = _model()
    x = _images(3, 128)
    ref = Detector(m, image_size=128, precision="float32", channels_last=False, batch_size=0)(x)[0]
    det = Detector(m, image_size=128, precision="float32", batch_size=batch_size)
    first = det(x[:2])[0]
    second = det(x[1:])[0]  # same shape: reuses the workspace, must not change ``first``
    torch.testing.assert_close(first, ref[:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, ref[1:], atol=1e-5, rtol=1e-4)
    # one patch per image: the stitched map would be a plain view of the workspace
    one = Detector(m, image_size=64, precision="float32", batch_size=1)
    a = one(x[:2, :, :64, :64])[0]
    a_copy = a.clone()
    one.raw_maps(x[1:, :, :64, :64])
    assert torch.equal(a, a_copy)


def test_the_workspace_lets_the_least_recently_used_buffer_go():
    """A program whose batch sizes vary kept reallocating every buffer: beyond 8 shapes the
    workspace was emptied, the buffer of the shape it calls most included."""
    from defect_fast.detect import MAX_WORKSPACE

    det = Detector(_model(), image_size=128, precision="float32", batch_size=2)  # 4 patches an image
    x = _images(MAX_WORKSPACE + 4, 128)
    with torch.no_grad():
        det.raw_maps(x[:1])
        hot = next(iter(det._workspace.values()))
        for n in range(2, x.shape[0] + 1):  # more shapes than the workspace keeps, the first between each
            det.raw_maps(x[:n])
            det.raw_maps(x[:1])
    assert len(det._workspace) == MAX_WORKSPACE
    assert any(b is hot for b in det._workspace.values())


def test_threads_sharing_a_detector_evict_workspace_buffers_safely():
    """Evicting the least recently used buffer is two dict operations: two threads could pick the
    same oldest key and the second raised KeyError (an internal error in a program that shares
    one Detector between threads, as the README allows)."""
    import sys
    import threading
    import types

    like = types.SimpleNamespace(is_cuda=False, dtype=torch.float32, device="cpu", new_empty=lambda shape: torch.empty(0))
    shared = types.SimpleNamespace(_workspace={})
    errors = []

    def work(offset):
        try:
            for i in range(20000):
                Detector._buffer(shared, "maps", (offset + i % 16,), like)
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_the_workspace_holds_at_most_its_bytes_and_no_buffer_larger(monkeypatch):
    """Kept by count only, one forward of 600 images held a 64 MB buffer for the life of a service
    whose later calls were of one image: buffers beyond MAX_WORKSPACE_BYTES together go, least
    recently used first, and one larger than that is its call's own. The maps stay the same."""
    from defect_fast import detect

    monkeypatch.setattr(detect, "MAX_WORKSPACE_BYTES", 2**20)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32", batch_size=4)
    held = lambda: sum(b.nbytes for b in det._workspace.values())  # noqa: E731
    x = _images(40, 128)  # 160 patches of 64 x 64: maps of 2.6 MB
    with torch.no_grad():
        big = det(x)[0]
        assert not det._workspace
        small = det(x[:8])[0]  # 0.5 MB: kept
        assert len(det._workspace) == 1 and held() == 32 * 64 * 64 * 4
        det(x[:12])  # 0.75 MB more than the room left: the older goes
        assert len(det._workspace) == 1 and held() == 48 * 64 * 64 * 4
        torch.testing.assert_close(det(x[:8])[0], small, rtol=0, atol=0)
    monkeypatch.setattr(detect, "MAX_WORKSPACE_BYTES", 2**30)
    with torch.no_grad():
        torch.testing.assert_close(det(x)[0], big, rtol=0, atol=0)  # kept, the same maps


def test_a_program_s_own_fake_tensors_leave_the_workspace_real():
    """A program estimating shapes or memory with its own FakeTensorMode put a fake tensor in the
    workspace: every later real call of the Detector returned fake maps and scores."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32", batch_size=1)
    x = _images(2, 128)
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True):
            det(x)  # (a fake buffer kept here was every later call's)
        real = det(x)
    assert type(real[1]) is torch.Tensor and all(type(b) is torch.Tensor for b in det._workspace.values())
    with torch.no_grad():
        det._workspace.clear()
        torch.testing.assert_close(det(x), real, rtol=0, atol=0)


def test_a_copy_of_a_compiled_detector_runs_itself():
    """det.compile() binds the compiled call to the original: a copy (fitted, then swapped in, as
    the README advises) ran the original's maps, and a pickle failed."""
    import copy
    import pickle

    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    det.compile()
    for twin in (copy.copy(det), copy.deepcopy(det), pickle.loads(pickle.dumps(det))):
        assert twin._compiled_call_impl is None


def test_calls_with_autograd_history_keep_none_of_it_between_calls():
    """An unfused model called outside no_grad (as a plain ``det(x)`` is) with more patches than a
    chunk: its maps were copied into the reused workspace with their history, which grew by a
    graph per call (33 MB a call at 128 px, 2 GB after 60 calls). Gradients still reach the input."""
    det = Detector(_model(), image_size=128, precision="float32", fuse=False, batch_size=2)
    x = _images(1, 128)
    for _ in range(3):
        maps, _scores = det(x)
        assert maps.requires_grad
        assert all(b.grad_fn is None and not b.requires_grad for b in det._workspace.values())
    with torch.no_grad():
        plain, _ = det(x)
    torch.testing.assert_close(maps.detach(), plain, atol=1e-6, rtol=1e-5)
    assert len(det._workspace) == 1  # the no-grad call pools, as before
    xf = (x.float() / 127.5 - 1).requires_grad_()
    det(xf)[1].sum().backward()
    assert xf.grad is not None and xf.grad.abs().sum() > 0


def test_predict_batched_then_calibrate_and_normalise_share_the_detector():
    det = Detector(_model(), image_size=128, batch_size=2, threads=1)
    x = _images(5, 128, seed=4)
    before = torch.get_num_threads()
    res = det.predict_batched(x, images_per_batch=2)  # inference mode, uneven last call
    assert torch.get_num_threads() == before
    assert res["maps"].shape == (5, 128, 128) and res["scores"].shape == (5,)
    ref = torch.cat([det(c)[0] for c in x.split(2)])
    torch.testing.assert_close(res["maps"], ref)
    det.fit_normalization(x, images_per_batch=2)  # no_grad, same shapes: a workspace it may write
    cal = det.calibrate(x)
    assert cal["n_images"] == 5 and cal["score_std"] > 0 and "threshold_image" not in cal and cal["far"] == 0.01
    assert "calibration defect-free images" in cal["note"]  # the images given, not a run's held-back ones
    cal = det.calibrate(x, names=list("abcde"))
    scores = det.predict_batched(x)["scores"]
    assert cal["threshold_image"] == "abcde"[int(scores.argmax())] and len(cal["highest_scores"]) == 5
    assert det.image_threshold() == cal["image_threshold"]  # the pass/fail line the README writes
    det.map_kind = "residual"  # the thresholds set on the old map's scores are set aside: said, not a KeyError
    said = (r"no image threshold: the stored ones were calibrated with other inference settings \(on the 'msfr' map; "
            r"map_kind changed to 'residual', which a change back does not undo\); calibrate\(normal_images\)")
    with pytest.raises(ValueError, match=said):
        det.image_threshold()
    det.map_kind = "msfr"  # back: still set aside, and named by the map they were set on (it named 'residual')
    with pytest.raises(ValueError, match=said):
        det.image_threshold()
    with pytest.raises(ValueError, match="no image threshold: the model file holds no threshold"):
        Detector(_model(), image_size=128).image_threshold()


def test_predict_accepts_every_input_kind_at_any_size(tmp_path):
    det = Detector(_model(), image_size=128, calibration={"pixel_q999": 0.0})
    img = _images(1, 128)[0]
    hwc = img.permute(1, 2, 0).numpy()
    Image.fromarray(hwc).save(tmp_path / "a.png")
    ref = det.predict(img)
    assert ref["maps"].shape == (1, 128, 128) and ref["scores"].shape == (1,)
    for other in (hwc, Image.fromarray(hwc), tmp_path / "a.png", str(tmp_path / "a.png"), img[None], [img]):
        res = det.predict(other)
        torch.testing.assert_close(res["maps"], ref["maps"])
        torch.testing.assert_close(res["scores"], ref["scores"])
    big = _images(1, 200)[0]
    res = det.predict([img, big, np.zeros((90, 150), dtype=np.uint8)])
    assert [tuple(m.shape) for m in res["maps"]] == [(128, 128), (200, 200), (90, 150)]
    assert res["scores"].shape == (3,) and len(res["regions"]) == 3
    # threshold 0 on a positive map: one region covering everything
    assert res["regions"][0][0]["area"] == 128 * 128 and res["regions"][0][0]["box"] == (0, 0, 128, 128)
    with pytest.raises(TypeError, match="cannot read"):
        det.predict(3.0)


def test_find_regions_boxes_areas_peaks():
    m = np.zeros((20, 30), dtype=np.float32)
    m[2:5, 3:9] = 1.0
    m[3, 4] = 5.0
    m[10:12, 20:21] = 2.0
    m[15, 0] = 0.4  # below the threshold
    regions = find_regions(m, 0.5)
    assert regions == [{"box": (3, 2, 9, 5), "area": 18, "peak": 5.0}, {"box": (20, 10, 21, 12), "area": 2, "peak": 2.0}]
    assert find_regions(m, 10.0) == []


def test_load_restores_model_calibration_and_normalization(tmp_path):
    m = _model()
    run = tmp_path / "run"
    run.mkdir()
    mean = torch.full((128, 128), 0.5)
    atomic_save({"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128,
                 "calibration": {"pixel_q999": 1.5, "score_max": 2.0}, "normalization": {"mean": mean, "std": torch.tensor(2.0)}},
                run / "model.pt")
    det = defect_fast.load(run, device="cpu")
    assert isinstance(det, torch.nn.Module) and isinstance(det, defect_fast.Detector)
    assert det.calibration["pixel_q999"] == 1.5 and torch.equal(det.norm_mean, mean)
    x = _images(1, 128)
    raw = Detector(m, image_size=128)(x)[0]
    torch.testing.assert_close(det(x)[0], (raw - 0.5) / 2.0)
    # what the file fixes is refused by name (it was "multiple values for keyword argument")
    with pytest.raises(ValueError, match=r"image_size cannot be given to load: the model file fixes it"):
        defect_fast.load(run, device="cpu", image_size=256)
    if not torch.cuda.is_available():  # a torch.device is checked as its name is (it was torch's AssertionError)
        from defect_fast.safety import DeviceError

        with pytest.raises(DeviceError, match="cuda"):
            defect_fast.load(run, device=torch.device("cuda"))


def test_a_uint8_batch_of_another_size_scores_as_its_images_do_through_predict():
    """predict resizes uint8 pixels as image files are resized (PIL); predict_batched, reconstruct
    and fit_normalization resized them by the pipeline's float bilinear instead, so thresholds set
    with calibrate(batch) were on another scale than predict's scores (magnetic-tile photos: up to
    0.21 apart at a threshold of 6.86)."""
    from defect_fast.data.io import resize_image

    det = Detector(_model(), image_size=128, precision="float32")
    x = _images(2, 160)[:, :, :96]  # 96 x 160
    resized = torch.stack([resize_image(img, 128) for img in x])
    want = det.predict_batched(resized)
    got = det.predict_batched(x)
    assert torch.equal(got["scores"], want["scores"]) and torch.equal(got["maps"], want["maps"])
    assert torch.equal(got["scores"], det.predict(x)["scores"])
    assert torch.equal(det.reconstruct(x), det.reconstruct(resized))


def test_a_stored_part_another_version_wrote_is_one_error_naming_the_file():
    """Parts of a model file this version cannot read (an unknown map kind, a model option it does
    not know): a RunError naming the file, not a traceback from deep inside the build."""
    from defect_fast.runs import RunError

    m = _model()
    state = {"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128}
    assert isinstance(Detector.from_state(state, "cpu"), Detector)
    with pytest.raises(RunError, match=r"^line\.pt: the stored map kind does not load .*another version"):
        Detector.from_state({**state, "detector": {"map_kind": "newmap"}}, "cpu", where="line.pt")
    with pytest.raises(RunError, match=r"^line\.pt: the stored model does not load .*new_option"):
        Detector.from_state({**state, "model_config": {**m.config(), "new_option": 1}}, "cpu", where="line.pt")
    # parts of another type (a file another program wrote, or edited and digested again): named, not a
    # TypeError or AttributeError from inside the build
    for part, value in (("calibration", 5), ("calibration", [1, 2]), ("detector", [1]), ("normalization", [1]),
                        ("perceptual", "x"), ("context", 3.0)):
        with pytest.raises(RunError, match=rf"^line\.pt: the stored {part} is a \w+, not a dict"):
            Detector.from_state({**state, part: value}, "cpu", where="line.pt")
    # a weight the model lacks: PyTorch's message spans lines, the error is one
    with pytest.raises(RunError, match="^line\\.pt: the stored model does not load") as info:
        Detector.from_state({**state, "model_state": {k: v for k, v in m.state_dict().items() if "memory" not in k}},
                            "cpu", where="line.pt")
    assert "\n" not in str(info.value)


def test_a_model_file_of_a_later_format_is_refused_naming_the_file(tmp_path):
    from defect_fast.runs import CHECKPOINT_VERSION, RunError, atomic_save, load_model_state

    m = _model()
    state = {"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128}
    for version in (None, 1, CHECKPOINT_VERSION):
        atomic_save({**state, **({} if version is None else {"version": version})}, tmp_path / "model.pt")
        assert load_model_state(tmp_path)["image_size"] == 128
    later = CHECKPOINT_VERSION + 1
    atomic_save({**state, "version": later}, tmp_path / "model.pt")
    with pytest.raises(RunError, match=rf"model\.pt: written in file format {later} by a later defect_fast"):
        load_model_state(tmp_path)
    # said first: a later format whose layout or digest changed was called foreign or damaged
    renamed = {("weights" if k == "model_state" else k): v for k, v in state.items()}
    atomic_save({**renamed, "version": later}, tmp_path / "model.pt")
    with pytest.raises(RunError, match=rf"written in file format {later} by a later defect_fast"):
        load_model_state(tmp_path)
    from defect_fast.safety import DIGEST_KEY

    torch.save({**state, "version": later, DIGEST_KEY: {"algorithm": "blake3", "hex": "00"}}, tmp_path / "model.pt")
    with pytest.raises(RunError, match=rf"written in file format {later} by a later defect_fast"):
        load_model_state(tmp_path)
    atomic_save({**state, "version": "3.0"}, tmp_path / "model.pt")  # no version this package writes
    with pytest.raises(RunError, match=r"model\.pt: not a defect_fast file of a known format \(its version is '3.0'\)"):
        load_model_state(tmp_path)


def test_model_options_are_a_dataclass_matching_the_constructor():
    for name in model_names():
        cls = model_class(name)
        assert dataclasses.is_dataclass(cls.Config), name
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        defaults = cls.Config()
        model = build_model(name)
        for key, value in model.config().items():
            assert key in fields, (name, key)
            want = getattr(defaults, key)
            if want is None:  # resolved by the constructor (e.g. AW-SSIM AE's two_stage)
                continue
            assert value == (list(want) if isinstance(want, tuple) else want), (name, key)
        assert model.default_map in cls.anomaly_maps
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        assert not params or set(params) == fields, name


def test_train_and_detect_do_not_import_each_other_and_trainer_does_not_probe():
    def imports(path):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[-1])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[-1] for a in node.names)
        return names

    assert "detect" not in imports(PKG / "train.py") and "train" not in imports(PKG / "detect.py")
    assert "hasattr" not in (PKG / "train.py").read_text()
    names = ["gaaga", "adga", "msfr", "residual", *model_names()]
    for path in (PKG / "train.py", PKG / "detect.py", PKG / "cli.py", PKG / "evaluate.py", PKG / "export.py"):
        text = path.read_text().replace(" ", "")
        for name in names:  # no switch on a model, map or synthesis name outside models/
            assert f'=="{name}"' not in text and f'!="{name}"' not in text and f'("{name}",' not in text, (path, name)
        assert ".synthesis==" not in text, path


@pytest.mark.parametrize("name", ["cmaae", "awae"])
def test_forward_returns_the_msfr_features_of_its_input(name):
    """The detector's MSFR map takes the encoder features of x from the forward pass instead of
    running the encoder on x a second time: they must be exactly features(x)."""
    m = _model(name)
    x = torch.rand(3, 3, m.patch_size, m.patch_size) * 2 - 1
    with torch.no_grad():
        out = m(x)
        again = m.features(x)
        assert len(out["features"]) == len(again) == 3
        for a, b in zip(out["features"], again):
            assert torch.equal(a, b)
        torch.testing.assert_close(m.anomaly_map(x, out["recon"], "msfr", out["features"]),
                                   m.anomaly_map(x, out["recon"], "msfr"), atol=0, rtol=0)


# -- what an embedding program can get wrong ---------------------------------------------------------


def test_one_detector_called_from_two_threads_gives_each_its_own_maps():
    """The patch maps of a call larger than one chunk go through a reused buffer: per thread, so
    two threads with different images never read each other's maps."""
    import threading

    det = Detector(_model(), image_size=128, batch_size=2)  # 4 patches per image: every call chunks
    xs = [_images(3, 128, seed=1), torch.full((3, 3, 128, 128), 128, dtype=torch.uint8)]
    with torch.inference_mode():
        want = [det(x) for x in xs]
    wrong = []

    def work(i):
        with torch.inference_mode():
            for _ in range(8):
                maps, scores = det(xs[i])
                wrong.append(not (torch.equal(maps, want[i][0]) and torch.equal(scores, want[i][1])))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wrong) == 16 and not any(wrong)


def test_an_array_s_transparent_pixels_are_said_as_a_file_s_are():
    """A 4-channel array dropped its alpha in silence, where the same image as a file is warned of."""
    import warnings

    from defect_fast.data import DataWarning

    det = Detector(_model(), image_size=64)
    rgb = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    alpha = np.full((64, 64, 1), 255, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        opaque = det.predict(np.concatenate([rgb, alpha], -1))  # an alpha channel, nothing transparent
        padded = det.predict(np.concatenate([rgb, 0 * alpha], -1))  # RGBX: a 4th channel of 0, no alpha
    alpha[:16] = 0
    with pytest.warns(DataWarning, match=r"numpy images: their 4th channel, alpha, has transparent pixels \(1 of 1, "
                                         r"25\.0% of their pixels\), read as the colour stored under them: alpha is "
                                         r"dropped") as seen:
        cut = det.predict(np.concatenate([rgb, alpha], -1)[None])
    assert seen[0].filename == __file__
    # a batch: each image's 4th channel judged by itself (padding beside alpha is no transparency)
    batch = np.stack([np.concatenate([rgb, 0 * alpha], -1), np.concatenate([rgb, alpha], -1),
                      np.concatenate([rgb, 0 * alpha + 255], -1)])
    with pytest.warns(DataWarning, match=r"\(1 of 3, 25\.0% of their pixels\)"):
        det.predict(batch)
    assert torch.equal(cut["scores"], opaque["scores"]) and torch.equal(opaque["scores"], det.predict(rgb)["scores"])
    assert torch.equal(padded["scores"], opaque["scores"])


def test_a_16_bit_array_scaled_as_the_refusal_says_scores_as_its_file(tmp_path):
    """The refusal told x // 257, which floors where the file reader rounds: 3.4 % higher scores on
    a line's photo than its file's, near enough a threshold to flip a verdict."""
    det = Detector(_model(), image_size=64)
    x = np.random.default_rng(5).integers(0, 65536, (64, 64), dtype=np.uint16)
    Image.fromarray(x).save(tmp_path / "grey16.png")
    with pytest.raises(TypeError) as refused:
        det.predict(x)
    assert "np.rint(x * (255 / 65535)).astype(np.uint8)" in str(refused.value)
    told = np.rint(x * (255 / 65535)).astype(np.uint8)
    assert torch.equal(det.predict(told)["scores"], det.predict(tmp_path / "grey16.png")["scores"])
    assert not torch.equal(det.predict((x // 257).astype(np.uint8))["maps"], det.predict(told)["maps"])


def test_predict_refuses_pixels_it_would_misread():
    det = Detector(_model(), image_size=128)
    img = _images(1, 128)[0].permute(1, 2, 0).numpy()  # HxWx3 uint8
    # a 16-bit array is told the 16-bit scaling (it was told the [0, 1] one, x * 255)
    for bad, kind, words in ((img.astype(np.uint16) * 257, TypeError, "uint16; scale them to uint8 (e.g. np.rint(x * (255 / 65535))"),
                             (img > 128, TypeError, "bool"),
                             (img.astype(np.float32), TypeError, "numpy images must be uint8"),  # most often [0, 1]
                             (img.astype(np.float32) / 255, TypeError, "float32"),
                             (torch.from_numpy(img).permute(2, 0, 1).float(), ValueError, "must lie in [-1, 1]"),
                             (torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
                             (torch.ones(3, 8, 8, dtype=torch.int32), TypeError, "int32"),
                             ([], ValueError, "empty list"),
                             (np.zeros((0, 0, 3), np.uint8), ValueError, "numpy images of shape (0, 0, 3) have no pixels"),
                             (torch.zeros(150, 200, 3, dtype=torch.uint8), ValueError, "C = 1 or 3, got (150, 200, 3)")):
        with pytest.raises(kind, match=re.escape(words)):
            det.predict(bad)
    # [-1, 1] floats and uint8 are the same image
    as_float = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(det.predict(as_float)["maps"], det.predict(img)["maps"], atol=1e-4, rtol=0)
    # results are plain tensors: an embedding program may change them in place
    res, batched = det.predict(img), det.predict_batched(torch.from_numpy(img).permute(2, 0, 1)[None])
    for t in (res["maps"], res["scores"], batched["maps"], batched["scores"]):
        assert not t.is_inference()
        t.add_(1)
    with torch.inference_mode():  # also for a caller inside inference mode
        res = det.predict([img, img[:100]])  # a map at the model's size and a resized one
    for t in (*res["maps"], res["scores"]):
        assert not t.is_inference()
        t.add_(1)


def test_predict_refuses_a_nan_score_that_would_pass_any_threshold():
    """A model whose weights diverged gave NaN scores from predict, which every `score > threshold`
    passes; the commands and the C++ runner refuse them, and so does predict, naming the image."""
    from defect_fast.runs import NonFiniteMaps

    det = Detector(_model(), image_size=128, precision="float32")
    imgs = _images(2, 128)
    assert torch.isfinite(det.predict(imgs)["scores"]).all()
    with torch.no_grad():
        next(det.model.parameters()).fill_(float("nan"))
    det = Detector(det.model, image_size=128, precision="float32")
    assert torch.isnan(det.predict_batched(imgs)["scores"]).all()  # the low-level call returns what it computes
    with pytest.raises(NonFiniteMaps, match=re.escape("for 2 of 2 images (the first: image 0; inference in float32)")):
        det.predict(imgs)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_callers_autocast_does_not_change_maps_or_scores(precision):
    """The Detector computes in its own precision, the arithmetic its statistics and thresholds
    were set with: a calling program's autocast left open around predict changed scores by 1e-3."""
    det = Detector(_model(), image_size=128, precision=precision, stride=32, blend="hann", smooth_sigma=2.0)
    x = _images(2, 128)
    want = det.predict_batched(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = det.predict_batched(x)
        raw = det.raw_maps(x)
        finished = det.finish(raw)
        recon = det.reconstruct(x)
    assert torch.equal(got["maps"], want["maps"]) and torch.equal(got["scores"], want["scores"])
    assert raw.dtype == torch.float32 and torch.equal(finished[1], want["scores"])
    assert torch.equal(recon, det.reconstruct(x))


def test_predict_reads_a_16_bit_pil_image_as_its_file_is_read(tmp_path):
    det = Detector(_model(), image_size=64)
    gray = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        from_object = det.predict(im)["maps"]
    torch.testing.assert_close(from_object, det.predict(tmp_path / "g16.png")["maps"])
    (tmp_path / "notes.png").write_text("not an image")
    from defect_fast.data import DataError

    with pytest.raises(DataError, match="notes.png"):
        det.predict(tmp_path / "notes.png")


def test_predict_warns_of_a_12_bit_frame_and_names_a_truncated_pil_image(tmp_path, monkeypatch):
    """A 12-bit camera's frame in a 16-bit file or PIL image is read at a few grey levels: said, as
    the CLI's readers say it. A truncated file opened lazily by PIL fails as its path does (a
    ValueError naming it), not with PIL's bare OSError."""
    import warnings

    from defect_fast.data import DataError, DataWarning

    det = Detector(_model(), image_size=64)
    frame = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 4096).astype(np.uint16)
    Image.fromarray(frame).save(tmp_path / "cam12.png")
    with pytest.warns(DataWarning, match=r"hold values up to 4095 at most \(of 65535\).*cam12\.png") as seen:
        det.predict(tmp_path / "cam12.png")
    assert seen[0].filename == __file__  # attributed to the line that called predict
    with Image.open(tmp_path / "cam12.png") as im, pytest.warns(DataWarning, match=r"PIL image\)"):
        det.predict(im)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        det.predict(Image.fromarray((frame.astype(np.uint32) * 16).astype(np.uint16)))  # the full range: nothing said
    with pytest.raises(TypeError, match=r"round\(x \* 255 / \(2\*\*bits - 1\)\)"):
        det.predict(torch.from_numpy(frame.astype(np.int32)).to(torch.uint16))
    data = _png_bytes_of(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.png") as im, pytest.raises(DataError, match=r"PIL image: corrupt or truncated"):
        det.predict(im)
    # its rest zeros (a copy that stalled): PIL decodes it, its missing part as black; the file by its path
    # was refused, its PIL image scored
    (tmp_path / "stalled.png").write_bytes(data[:-12] + bytes(12))  # its IEND chunk not written
    with Image.open(tmp_path / "stalled.png") as im, pytest.raises(
            DataError, match=re.escape(f"PIL image of {tmp_path / 'stalled.png'}: a PNG without its IEND chunk")):
        det.predict(im)
    with Image.open(tmp_path / "stalled.png") as im:
        im.load()
        assert det.predict(im.copy())["scores"].shape == (1,)  # a copy has no file: its pixels are what is given
    # a frame reached by a seek whose file was closed since: said as a closed file (a bare AssertionError)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.png") as im:
        im.load()
        im.seek(1)
    with pytest.raises(DataError, match="its file was closed before its pixels were read"):
        det.predict(im)
    # a frame after a seek is decoded by the call (its pixels were not loaded): the file's end is checked
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(3)]
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:])
    (tmp_path / "stalled_apng.png").write_bytes(apng.getvalue()[:-12] + bytes(12))
    with Image.open(tmp_path / "stalled_apng.png") as im, pytest.raises(DataError, match="without its IEND chunk"):
        im.load()
        im.seek(1)
        det.predict(im)
    # an image decoded before holds its pixels: its file written over since (a camera's latest.png) is not its
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "latest.png")
    with Image.open(tmp_path / "latest.png") as im:
        im.load()
        (tmp_path / "latest.png").write_bytes(data[:-12] + bytes(12))
        assert det.predict(im)["scores"].shape == (1,)
    # a mode PIL does not convert, and an empty image: named as the PIL image, not PIL's or numpy's words
    # (premultiplied "La", which PIL converts to "LA" only, is read through it)
    assert det.predict(Image.new("LA", (32, 32)).convert("La"))["maps"].shape[-2:] == (32, 32)
    import defect_fast.data.io as dio

    monkeypatch.setattr(dio, "_to_8bit", lambda img, channels, path: img.convert("XYZ"))
    with pytest.raises(DataError, match=r"PIL image: cannot convert its La pixels"):
        det.predict(Image.new("LA", (32, 32)).convert("La"))
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"PIL image: image has zero size \(0x0\)"):
        det.predict(Image.new("L", (0, 0)))


def _png_bytes_of(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_tensor_entry_points_check_their_input():
    det = Detector(_model(), image_size=128)
    x = _images(2, 128)
    for call, arg, kind in ((det, x.permute(0, 2, 3, 1), ValueError), (det, x.numpy(), ValueError),
                            (det.reconstruct, x[0], ValueError), (det.fit_normalization, list(x), TypeError),
                            (det.calibrate, x[:0], ValueError), (det.predict_batched, x.float(), ValueError)):
        with pytest.raises(kind):
            call(arg)


def test_fit_normalization_sets_aside_thresholds_of_the_maps_before_it_and_calibrate_sets_new_ones():
    from defect_fast.calibration import stored_thresholds

    det = Detector(_model(), image_size=128)
    x = _images(6, 128, seed=3)
    cal = det.calibrate(x[:3])
    assert {"image_threshold", "pixel_threshold", "far", "pixel_q999"} <= set(cal)
    image_t, pixel_t, source = stored_thresholds(det.calibration)
    assert image_t == cal["image_threshold"] and "older model file" not in source
    regions = det.predict(x[3])["regions"][0]  # at the stored pixel threshold, as the CLI and watch use it
    assert regions == det.predict(x[3], pixel_threshold=pixel_t)["regions"][0]
    det.fit_normalization(x[3:])
    assert stored_thresholds(det.calibration)[:2] == (None, None)
    assert "fit_normalization" in stored_thresholds(det.calibration)[2]
    assert det.predict(x[3])["regions"] == [[]]
    det.calibrate(x[:3])  # calibrated again on the normalised maps
    assert stored_thresholds(det.calibration)[0] is not None


def test_find_regions_are_scipy_labels_of_the_map():
    """The regions Detector.predict gives are the 8-connected components scipy finds, all of them."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    m = ndimage.uniform_filter(rng.random((96, 80)), 5)  # smooth blobs, dozens of components
    t = float(np.quantile(m, 0.9))
    labels, n = ndimage.label(m > t, structure=np.ones((3, 3), dtype=bool))
    want = sorted(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), int((labels == i + 1).sum()), float(m[labels == i + 1].max()))
                  for i, sl in enumerate(ndimage.find_objects(labels)))
    got = find_regions(m, t)
    assert n > 50 and len(got) == n  # not capped as watch's journal is
    got_sorted = sorted((r["box"], r["area"], r["peak"]) for r in got)
    assert [(b, a) for b, a, _ in got_sorted] == [(b, a) for b, a, _ in want]
    assert [p for _, _, p in got_sorted] == pytest.approx([p for _, _, p in want], rel=1e-6)  # float32 maps
    assert [r["peak"] for r in got] == sorted((r["peak"] for r in got), reverse=True)


def test_predict_resizes_arrays_and_pil_images_as_their_file(tmp_path):
    """A photo of another size scores the same whether passed as its file, as a PIL image or as a
    uint8 array (one resize for all: the file reader's)."""
    det = Detector(_model(), image_size=64, precision="float32")
    rgb = np.random.default_rng(4).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    want = det.predict(tmp_path / "odd.png")
    for x in (Image.open(tmp_path / "odd.png"), rgb, torch.from_numpy(rgb).permute(2, 0, 1)):
        got = det.predict(x)
        assert torch.equal(got["scores"], want["scores"]) and torch.equal(got["maps"], want["maps"])
    assert want["maps"].shape == (1, 50, 90)


def test_settings_of_the_wrong_type_are_refused_naming_the_argument():
    """stride=32.0 failed deep in torch, True ran as a stride of 1, compile='no' turned compile on,
    batch_size=2.7 became 2, and numpy's and torch's numbers were refused as pixel thresholds."""
    m = _model()
    bad = [({"stride": 32.0}, "stride must be an integer >= 1, got 32.0"), ({"stride": True}, "stride must be an integer"),
           ({"image_size": 0}, "image_size must be an integer >= 1"), ({"smooth_sigma": "2"}, "smooth_sigma must be a finite number"),
           ({"top_fraction": "0.01"}, "top_fraction must be a finite number"), ({"batch_size": None}, "batch_size must be"),
           ({"batch_size": 2.7}, "batch_size must be"), ({"batch_size": True}, "batch_size must be"),
           ({"compile": "no"}, "compile must be True or False, got 'no'"),
           ({"norm_std": 0.0}, "norm_std must be finite and > 0"), ({"norm_std": -1.0}, "norm_std must be finite and > 0"),
           ({"norm_std": float("nan")}, "norm_std must be finite"), ({"norm_mean": torch.zeros(64, 64)},
                                                                     "norm_mean must be a number or [128, 128]")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            Detector(m, **{"image_size": 128, **kwargs})
    assert Detector(m, image_size=np.int64(128), stride=np.int64(32), batch_size=np.int64(4)).stride == 32
    # a stride over the patch is named as such (the grid's hint named image sizes it refuses too)
    with pytest.raises(ValueError, match=re.escape("stride 100 > patch 64 leaves pixels uncovered")):
        Detector(m, image_size=128, stride=100)
    # image_size under the patch is named (it said "image height 32 is smaller than the patch size":
    # the images, which any size of is resized)
    with pytest.raises(ValueError, match=re.escape("image_size 32 is smaller than the model's patch size 64")):
        Detector(m, image_size=32)
    # fuse and channels_last take numpy's bools as the other flags do; "yes" is no flag
    det = Detector(m, image_size=128, fuse=np.bool_(False), channels_last=np.bool_(True))
    assert det.fuse is False
    for name in ("fuse", "channels_last", "cudnn_benchmark"):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be True, False or 'auto', got 'yes'")):
            Detector(m, image_size=128, **{name: "yes"})
    det = Detector(m, image_size=128, precision="float32")
    x = _images(2, 128)
    for kwargs, message in (({"images_per_batch": 2.5}, "images_per_batch must be an integer >= 1, got 2.5"),
                            ({"images_per_batch": None}, "images_per_batch must be an integer >= 1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            det.predict(x, **kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            det.predict_batched(x, **kwargs)
    with pytest.raises(ValueError, match="min_std must be"):
        det.fit_normalization(x, min_std=float("nan"))
    for bad_std in (0.0, -1.0, 1e-50):  # 1e-50: 0 in float32, where the clamp runs (NaN scores)
        with pytest.raises(ValueError, match="min_std must be > 0"):
            det.fit_normalization(x, min_std=bad_std)
    ref = det.predict(x, pixel_threshold=0.5)
    for t in (np.float32(0.5), torch.tensor(0.5), np.float64(0.5)):
        assert det.predict(x, pixel_threshold=t)["regions"] == ref["regions"]
    for t in (float("nan"), "0.5", True, torch.tensor([0.5])):
        with pytest.raises(ValueError, match="pixel_threshold must be a finite number"):
            det.predict(x, pixel_threshold=t)


def test_settings_the_pipeline_is_built_for_cannot_be_changed_under_it():
    """stride, smoothing, image size set after construction met buffers built for the old values
    deep in torch; a fused model's precision its bf16 weights; a map kind changed kept the old
    map's thresholds (every image flagged, the region the whole image)."""
    from defect_fast.calibration import stored_thresholds

    m = _model()
    det = Detector(m, image_size=128, precision="bfloat16")
    for name, value in (("stride", 32), ("smooth_sigma", 4.0), ("image_size", 64), ("blend", "hann"),
                        ("grid", (2, 2)), ("patch", 32), ("top_k", 3)):
        with pytest.raises(AttributeError, match=re.escape(f"Detector.{name} is fixed when the Detector is built")) as err:
            setattr(det, name, value)
        # the advice names arguments that exist (patch=, grid=, top_k= are no arguments)
        advised = set(re.findall(r"(\w+)=\.\.\.", str(err.value)))
        assert advised <= set(inspect.signature(Detector.__init__).parameters), (name, advised)
    with pytest.raises(AttributeError, match="Detector.precision is fixed for a fused model"):
        det.precision = "float32"
    # fuse too: set False on a fused bf16 Detector, it let precision float32 through (the next call
    # met bf16 weights) and save() wrote the folded weights under the model's config
    with pytest.raises(AttributeError, match=re.escape("Detector.fuse is fixed when the Detector is built")):
        det.fuse = False
    assert det.fuse is True
    # a map that needs statistics this Detector does not have: refused as the constructor refuses it
    # (it was taken, and the next call failed with KeyError: 'perceptual')
    with pytest.raises(ValueError, match="map 'perceptual' needs the statistics fitted at the end of training"):
        det.map_kind = "perceptual"
    assert det.map_kind == "msfr"
    det.precision = "bfloat16"  # the same: nothing to refuse
    with pytest.raises(ValueError, match="precision must be one of"):
        det.precision = "fp8"
    unfused = Detector(m, image_size=128, precision="bfloat16", fuse=False)
    unfused.precision = "float32"  # an unfused model's weights are float32: it may
    torch.testing.assert_close(unfused(_images(1, 128))[0],
                               Detector(m, image_size=128, precision="float32", fuse=False)(_images(1, 128))[0])
    det = Detector(m, image_size=128, precision="float32")
    det.calibrate(_images(4, 128, seed=2))
    assert stored_thresholds(det.calibration)[0] is not None
    det.map_kind = "residual"
    assert stored_thresholds(det.calibration)[0] is None and "map_kind changed to 'residual'" in det.calibration["inapplicable"]
    with pytest.raises(ValueError):
        det.map_kind = "nonsense"


def test_a_pil_image_scores_as_its_file_whatever_its_exif_orientation(tmp_path):
    """The file reader turns a photo upright by its EXIF orientation; its PIL image went in sideways
    (another map shape, another score)."""
    det = Detector(_model(), image_size=128, precision="float32")
    a = np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    a[:40, :30] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif.tobytes())
    f = det.predict(tmp_path / "rot.png")
    with Image.open(tmp_path / "rot.png") as pil:
        p = det.predict(pil)
        assert pil.size == (160, 96)  # the caller's image is left as it was
    assert f["maps"].shape == p["maps"].shape == (1, 160, 96)
    assert torch.equal(f["scores"], p["scores"]) and torch.equal(f["maps"], p["maps"])
    # a TIFF: PIL turns it as it loads it, and a lazily opened one was turned a second time after
    from PIL import TiffImagePlugin

    from defect_fast.data.io import upright

    # grey and 16-bit ones sideways: PIL decodes those at the turned width (scrambled pixels)
    grey = a[..., 0]
    for pixels in (a, grey, grey.astype(np.uint16) * 257):
        for orientation, shape in ((3, (1, 96, 160)), (6, (1, 160, 96)), (8, (1, 160, 96))):
            tags = TiffImagePlugin.ImageFileDirectory_v2()
            tags[0x0112] = orientation
            Image.fromarray(pixels).save(tmp_path / "rot.tif", tiffinfo=tags)
            f = det.predict(tmp_path / "rot.tif")
            with Image.open(tmp_path / "rot.tif") as pil:
                p = det.predict(pil)
                again = det.predict(pil)  # decoded now, its tag kept: turned once again, not twice
            assert f["maps"].shape == p["maps"].shape == shape
            assert torch.equal(f["scores"], p["scores"]) and torch.equal(f["maps"], p["maps"]), (pixels.dtype, orientation)
            assert torch.equal(again["maps"], p["maps"])
            turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
            with Image.open(tmp_path / "rot.tif") as pil:  # the helper for images opened by hand: turned once
                assert np.array_equal(np.asarray(upright(pil)), np.asarray(Image.fromarray(pixels).transpose(turn)))


def test_a_cast_of_the_detector_is_refused_naming_the_precision_option():
    """det.half() then predict failed inside the first convolution ("Input type (float) and bias
    type (c10::Half) should be the same"); a move to another device stays as it was."""
    det = Detector(_model(), image_size=128, precision="float32")
    x = _images(1, 128)
    want = det.predict(x)["scores"]
    for cast in (det.half, det.bfloat16, det.double, lambda: det.type(torch.float16), lambda: det.to(torch.float16),
                 lambda: det.to("cpu", torch.float64), lambda: det.to(torch.zeros(1, dtype=torch.float16))):
        with pytest.raises(TypeError, match=r"^Detector\.\S+: the precision of a Detector is its precision option"):
            cast()
    assert det.to("cpu") is det and det.to(device=torch.device("cpu")) is det and det.cpu() is det
    # float32 on a float32 Detector changes nothing: allowed, as is following a float32 tensor's device
    assert det.to(torch.float32) is det and det.to(torch.zeros(1)) is det and det.float() is det
    bf16 = Detector(_model(), image_size=128, precision="bfloat16")
    with pytest.raises(TypeError, match="runs in bfloat16"):
        bf16.to(torch.float32)  # its weights are stored in bfloat16: a cast to float32 is not a no-op
    assert torch.equal(det.predict(x)["scores"], want)


def test_save_never_replaces_a_file_written_there_during_its_write(tmp_path, monkeypatch):
    """save() checked the name, then renamed its file over it: a model another process saved
    there meanwhile was replaced without overwrite=True."""
    import os

    from defect_fast.safety import OutputRefused

    path = tmp_path / "line3.pt"
    real = os.fsync

    def fsync(fd):  # another process writes the name during this one's write (after every check)
        if not path.exists():
            path.write_bytes(b"theirs")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    det = Detector(_model(), image_size=128, precision="float32")
    with pytest.raises(OutputRefused, match="Detector.save: .*line3.pt: a file appeared there while the model was "
                                            r"written; not replacing it \(pass overwrite=True"):
        det.save(path)
    assert path.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["line3.pt"]
    assert det.save(path, overwrite=True) == path and path.read_bytes() != b"theirs"


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_save_writes_what_load_reads_back(tmp_path, precision):
    """An embedding program that calibrates or normalises a Detector in Python can keep it: save()
    writes a model file (the model as given, not the fused copy) that load() reads to the same
    maps, scores and thresholds; an existing file is refused unless overwrite."""
    from defect_fast.safety import OutputRefused

    det = Detector(_model(), image_size=128, precision=precision, stride=32, blend="hann", smooth_sigma=1.0)
    normal = _images(6, 128)
    det.fit_normalization(normal[:3])
    cal = det.calibrate(normal[3:], far=0.25)
    assert det.calibrate(normal[3:])["far"] == 0.25  # the rate asked before, not 0.01 (as defect-fast calibrate)
    path = det.save(tmp_path / "line3.pt")
    again = Detector.load(path, device="cpu", precision=precision)
    x = _images(2, 128)
    a, b = det.predict_batched(x), again.predict_batched(x)
    assert torch.equal(a["maps"], b["maps"]) and torch.equal(a["scores"], b["scores"])
    assert again.calibration == cal and (again.stride, again.blend, again.smooth_sigma) == (32, "hann", 1.0)
    assert again.normalization() == det.normalization() and again.normalization()["kind"] == "per-position"
    with pytest.raises(OutputRefused, match="line3.pt: file exists; pass overwrite=True"):  # Python's word for it
        det.save(path)
    assert det.save(path, overwrite=True) == path
    with pytest.raises(ValueError, match="top_fraction"):
        Detector(_model(), image_size=128, top_fraction=0.01).save(tmp_path / "other.pt")


def test_overlapping_cudnn_benchmark_blocks_restore_the_setting_once_all_have_left():
    """One Detector called from two threads: A enters, B enters, A leaves, B leaves. A's exit
    turned the flag off while B still ran, and B's exit "restored" the True it saw on entry, so the
    process kept cuDNN's benchmark mode on after both. (The flag alone: no GPU needed.)"""
    import threading

    from defect_fast.precision import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def a():
            with cudnn_benchmark(True):
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def b():
            a_in.wait(10)
            with cudnn_benchmark(True):
                b_in.set()
                a_out.wait(10)
                seen["inside b after a left"] = torch.backends.cudnn.benchmark

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"inside b after a left": True}
        assert torch.backends.cudnn.benchmark is False
        # nested in one thread (a CUDA graph's capture inside a call): the inner value, then the outer's
        with cudnn_benchmark(True):
            with cudnn_benchmark(True, value=False):
                assert torch.backends.cudnn.benchmark is False
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_images_per_call_is_what_predict_batched_feeds_the_pipeline(monkeypatch):
    """The benchmark's rows claimed the tuned pipeline took "the whole batch per call"; on a CPU it
    takes what ``batch_size`` patches hold. ``images_per_call`` says it, and is what runs."""
    det = Detector(_model(), image_size=256, precision="float32")  # 16 patches of 64 per image
    wide = Detector(_model(), image_size=256, precision="float32", batch_size=48)
    assert det.batch_size == 64 and det.images_per_call(64) == 4 and det.images_per_call(2) == 2
    assert wide.images_per_call(64) == 3 and Detector(_model(), image_size=256, batch_size=0).images_per_call(64) == 64
    seen = []
    real = Detector.forward

    def forward(self, images):
        seen.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(Detector, "forward", forward)
    wide.predict_batched(_images(7, 256), 64)
    assert seen == [3, 3, 1]


def test_a_float64_default_dtype_is_named_not_a_dtype_mismatch_inside():
    """A calling program's torch.set_default_dtype(torch.float64) made predict fail with scatter() or
    bias-dtype errors deep inside; it is now said in one line, at construction and at each call."""
    det = Detector(_model(), image_size=64)
    x = _images(1, 64)
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(RuntimeError, match=r"default dtype is torch.float64 \(torch.set_default_dtype\)"):
            det.predict(x)
        with pytest.raises(RuntimeError, match="default dtype is torch.float64"):
            Detector(_model(), image_size=64)
    finally:
        torch.set_default_dtype(torch.float32)
    assert det.predict(x)["maps"].dtype == torch.float32


def test_resize_map_is_bilinear_without_aligned_corners():
    """Maps drawn at a photo's own size: pixel centres map to pixel centres (no half-pixel shift)."""
    from defect_fast.maps import resize_map

    out = resize_map(torch.tensor([[0.0, 1.0]]), (1, 4))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))


def test_the_image_score_takes_the_rounded_count_of_top_pixels():
    """0.1 % of a 256 x 256 map is 65.5 pixels: 66 (the stored thresholds were set on that count;
    the detector tests' oracle calls the same function)."""
    from defect_fast.detect import _top_count

    assert _top_count(256 * 256, 0.001) == 66 and _top_count(64 * 64, 0.001) == 4


def test_the_residual_map_is_the_channel_mean_of_squared_differences():
    """The residual map by hand: ((0-1)^2 + (0-2)^2 + (0-(-3))^2) / 3 = 14 / 3 at every pixel."""
    from defect_fast.maps import residual_map

    x = torch.zeros(2, 3, 4, 4)
    recon = torch.tensor([1.0, 2.0, -3.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = residual_map(x, recon)
    assert out.shape == (2, 1, 4, 4)
    torch.testing.assert_close(out, torch.full((2, 1, 4, 4), 14.0 / 3.0))


def test_a_map_too_small_for_its_top_fraction_scores_its_largest_value():
    """A map whose top fraction rounds to no pixel (16 x 16 at 0.1 %) is scored by its single
    largest value, not by the mean of nothing."""
    from defect_fast.detect import _top_count

    assert _top_count(16 * 16, 0.001) == 1
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_scores(maps, 0.001), maps.flatten(1).amax(1))


def test_float_images_below_minus_one_are_refused_like_those_above_one():
    """Float pixels outside [-1, 1] on either side (here an ImageNet-normalised image, down to
    about -2) would be misread as images of another brightness: refused, naming the range."""
    det = Detector(_model(), image_size=64)
    low = torch.linspace(-2.0, 1.0, 3 * 64 * 64).reshape(1, 3, 64, 64)
    for call in (det.predict, det.predict_batched):
        with pytest.raises(ValueError, match=re.escape("must lie in [-1, 1]")):
            call(low)


def test_a_top_fraction_of_zero_is_refused():
    """The image score averages a fraction in (0, 1] of the map's pixels: 0 asks for none."""
    for bad in (0, 0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=re.escape("top_fraction must be in (0, 1]")):
            Detector(_model(), image_size=64, top_fraction=bad)


def test_fit_normalization_on_one_image_asks_for_two():
    """A per-position std needs two maps at least: one image is refused saying so (not taken for
    maps that are all identical)."""
    det = Detector(_model(), image_size=64)
    with pytest.raises(ValueError, match="fit_normalization needs at least 2 images, got 1"):
        det.fit_normalization(_images(1, 64))


def test_smoothing_blurs_the_map_along_both_axes_alike():
    """smooth_sigma is a Gaussian blur of the whole map: a spike spreads the same way across
    rows and columns (the smoothed map of a centred spike is symmetric), and its sum stays."""
    det = Detector(_model(), image_size=64, smooth_sigma=2.0)
    raw = torch.zeros(1, 64, 64)
    raw[0, 32, 32] = 1.0
    maps, _scores = det.finish(raw)
    m = maps[0]
    torch.testing.assert_close(m, m.T)
    assert m[32, 35] > 0.01 and m[35, 32] > 0.01
    assert float(m.sum()) == pytest.approx(1.0, abs=1e-4)


def unfused_with_batch_statistics() -> tuple[Detector, torch.Tensor]:
    """An unfused CMA-AE Detector whose batch norms hold running variances of their own (a batch's
    statistics would then change its maps), and two images for it."""
    model = build_model("cmaae", memory_size=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    det = Detector(model, image_size=64, precision="float32", fuse=False)
    return det, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_train_mode_leaves_the_model_in_eval_mode_and_the_maps_as_they_were():
    """``det.train()``, or a parent module's, reached an unfused model's batch norms: predict then
    normalised by each batch, and taught the running statistics that batch's, so the maps stayed
    changed after ``eval()``."""
    det, x = unfused_with_batch_statistics()
    before = det.predict_batched(x)
    parent = torch.nn.ModuleDict({"detector": det})
    assert parent.train() is parent and det.training
    assert not any(m.training for m in det.model.modules())
    during = det.predict_batched(x)
    det.eval()
    after = det.predict_batched(x)
    for out in (during, after):
        assert torch.equal(out["maps"], before["maps"]) and torch.equal(out["scores"], before["scores"])
    det.model.train()  # by hand: eval() puts it back, as nn.Module's does
    assert det.eval() is det and not any(m.training for m in det.modules())
    with pytest.raises(ValueError, match="boolean"):
        det.train("no")


def test_thread_counts_set_by_two_detectors_called_at_once_are_given_back():
    """Two Detectors with their own ``threads``, called at once from two threads: each call gave
    back the count it had seen, which could be one the other had set, and the process kept it
    (a new thread started with 1 or 3 of the program's 2)."""
    import threading

    before = torch.get_num_threads()
    program = 2 if before != 2 else 1
    dets = [Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32", threads=n)
            for n in (1, 3)]
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)

    def fresh() -> int:
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    torch.set_num_threads(program)
    try:
        counts = []
        for _ in range(8):
            workers = [threading.Thread(target=lambda d=d: [d.predict_batched(x) for _ in range(3)]) for d in dets]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            counts.append(fresh())
        assert counts == [program] * 8 and torch.get_num_threads() == program
    finally:
        torch.set_num_threads(before)


def test_inputs_the_api_misread_or_failed_on_deep_inside_are_refused_by_name(tmp_path):
    from defect_fast.data.io import DataError

    det = Detector(build_model("cmaae", memory_size=10), image_size=64, precision="float32")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:  # the block closed the file before any pixel was read
        pass
    with pytest.raises(DataError, match=r"^PIL image: its file was closed before its pixels were read"):
        det.predict(im)
    with Image.open(tmp_path / "a.png") as im:
        im.load()
    assert tuple(det.predict(im)["maps"].shape[-2:]) == (70, 70)
    # calibrate named predict_batched, which the caller never called
    with pytest.raises(TypeError, match=r"^calibrate: expected a tensor \[N, 3, H, W\], got ndarray"):
        det.calibrate(np.zeros((4, 64, 64, 3), np.uint8))
    # the forward call: int64 pixels were taken for floats (a score of hundreds), no image failed deep in a reshape
    x = torch.randint(0, 256, (1, 3, 64, 64))
    with pytest.raises(TypeError, match=r"^Detector: expected uint8 \(0\.\.255\) or float \(\[-1, 1\]\) images, got torch.int64"):
        det(x)
    with pytest.raises(ValueError, match=r"^Detector: expected a tensor of images \[N, 3, H, W\] with N >= 1, got \(0, 3, 64, 64\)"):
        det(x[:0].to(torch.uint8))
    assert det(x.to(torch.uint8))[1].shape == (1,)


def test_a_hann_blend_on_tiles_keeps_the_stored_thresholds():
    """--blend hann where patches do not overlap changes maps by rounding only (tiles have no seam),
    yet set the stored thresholds aside as another setting; with overlapping patches it still does."""
    from defect_fast.detect import _changed_settings

    model = _model()
    tiles = {"map_kind": "msfr", "stride": None, "smooth_sigma": 0.0, "blend": "none"}
    assert _changed_settings(tiles, model, None, None, None, "hann") == []
    assert _changed_settings(tiles, model, None, 32, None, "hann") == ["stride 64 -> 32", "blend none -> hann"]
    overlapping = {**tiles, "stride": 32}
    assert _changed_settings(overlapping, model, None, None, None, "hann") == ["blend none -> hann"]
    x = _images(2, 128)
    a, b = (Detector(model, image_size=128, precision="float32", blend=blend).predict_batched(x) for blend in ("none", "hann"))
    torch.testing.assert_close(a["maps"], b["maps"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["cmaae", "awae"])
def test_making_or_loading_a_detector_leaves_the_caller_s_random_numbers_alone(tmp_path, name):
    """Building the model and fusing its layers drew initial weights from the global generator,
    which the stored ones then replaced: a program's seeded draws came out otherwise after a load."""
    model = _model(name)
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        want = torch.rand(3)
        torch.manual_seed(0)
        det = Detector(model, image_size=128, precision=precision)
        assert torch.equal(torch.rand(3), want), precision
    det.save(tmp_path / "model.pt")
    torch.manual_seed(0)
    loaded = Detector.load(tmp_path / "model.pt", precision="bfloat16")
    assert torch.equal(torch.rand(3), want)
    x = _images(2, 128)
    assert torch.equal(loaded.predict(x)["scores"], Detector.load(tmp_path / "model.pt", precision="bfloat16").predict(x)["scores"])


def _predict_in_worker(det, x, threads):
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return det.predict(x)["scores"].tolist()
    except RuntimeError as exc:
        return str(exc)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_detector_used_in_a_forked_worker_says_why_instead_of_hanging():
    """A worker forked after the parent made a Detector (multiprocessing's default "fork" on
    Linux) waited for ever in its first parallel op: torch's OpenMP pool does not survive a fork."""
    import multiprocessing

    if torch.get_num_threads() < 2:
        pytest.skip("one thread runs no OpenMP team: nothing hangs")
    det = Detector(_model(), image_size=128, precision="float32")
    x = _images(1, 128)
    want = det.predict(x)["scores"].tolist()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        said = pool.apply_async(_predict_in_worker, (det, x, None)).get(timeout=120)
    assert isinstance(said, str) and said.startswith("Detector: this process was forked from one that had made"), said
    assert "'spawn'" in said and "torch.set_num_threads(1)" in said
    with ctx.Pool(1) as pool:  # one thread in the worker, as the message says: it runs
        got = pool.apply_async(_predict_in_worker, (det, x, 1)).get(timeout=120)
    assert got == pytest.approx(want, rel=1e-5)
    own = Detector(_model(), image_size=128, precision="float32", threads=2)  # its own count: named
    with ctx.Pool(1) as pool:
        said = pool.apply_async(_predict_in_worker, (own, x, 1)).get(timeout=120)
    assert isinstance(said, str) and "make the Detector with threads=1 (it has threads=2)" in said, said


def _other_entry_in_worker(det, x, call):
    try:
        out = {"reconstruct": lambda: det.reconstruct(x), "raw_maps": lambda: det.raw_maps(x),
               "fit_normalization": lambda: det.fit_normalization(x),  # (x of 2 images: no op before the call)
               "predict": lambda: det.predict(x)["scores"], "forward": lambda: det(x)[1]}[call]()
        return "ran", float(out.float().sum())
    except RuntimeError as exc:
        return "refused", str(exc)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_entry_point_in_a_forked_worker_says_why_or_runs_with_threads_1():
    """reconstruct, raw_maps and the fits had no check and hung in a forked worker; a Detector with
    threads=1, the remedy the message gives, hung in predict's checks of the images and in forward,
    which ran with the process's count."""
    import multiprocessing

    if torch.get_num_threads() < 2:
        pytest.skip("one thread runs no OpenMP team: nothing hangs")
    det = Detector(_model(), image_size=128, precision="float32")
    x = _images(1, 128)
    det.predict(x)  # the parent's OpenMP pool in use
    ctx = multiprocessing.get_context("fork")
    two = _images(2, 128)
    for call in ("reconstruct", "raw_maps", "fit_normalization"):
        with ctx.Pool(1) as pool:
            kind, said = pool.apply_async(_other_entry_in_worker, (det, two, call)).get(timeout=60)
        assert kind == "refused" and said.startswith("Detector: this process was forked"), (call, said)
    one = Detector(_model(), image_size=128, precision="float32", threads=1)
    for call in ("predict", "forward", "raw_maps"):
        with ctx.Pool(1) as pool:
            kind, got = pool.apply_async(_other_entry_in_worker, (one, x, call)).get(timeout=60)
        assert kind == "ran", (call, got)
    assert torch.get_num_threads() >= 2  # the parent's count as it was


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_worker_forked_while_a_parent_thread_is_inside_a_call_runs():
    """The lock that a call with the threads option holds was inherited held by the forked worker,
    where no thread releases it: its Detector with threads=1 waited for ever."""
    import multiprocessing
    import threading

    from defect_fast import detect

    one = Detector(_model(), image_size=128, precision="float32", threads=1)
    x = _images(1, 128)
    want = one.predict(x)["scores"].tolist()
    inside, done = threading.Event(), threading.Event()

    def parent_call():  # a parent thread inside a call as the worker is forked (the lock taken as a call takes it)
        with detect.cpu_threads(1):
            inside.set()
            done.wait(60)

    t = threading.Thread(target=parent_call)
    t.start()
    try:
        assert inside.wait(10)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            kind, got = pool.apply_async(_other_entry_in_worker, (one, x, "predict")).get(timeout=60)
    finally:
        done.set()
        t.join()
    assert kind == "ran" and got == pytest.approx(sum(want), rel=1e-5)


def test_a_shallow_copy_fits_and_calibrates_without_changing_the_original():
    """copy.copy shared the module's tables of buffers and parts: a fit on the copy changed the
    original's maps, which kept thresholds set on the maps before."""
    import copy

    det = Detector(_model(), image_size=128, precision="float32")
    good = _images(4, 128)
    det.fit_normalization(good)
    det.calibrate(_images(4, 128, seed=5))
    x = _images(2, 128, seed=9)
    want, cal = det.predict(x)["scores"], dict(det.calibration)
    twin = copy.copy(det)
    assert torch.equal(twin.predict(x)["scores"], want)
    twin.fit_normalization(_images(4, 128, seed=3))
    assert not torch.equal(twin.predict(x)["scores"], want)
    assert torch.equal(det.predict(x)["scores"], want) and det.calibration == cal
    assert "image_threshold" in cal and "image_threshold" not in twin.calibration  # set aside on the copy only

    # what would change the tensors they share (or leave one half moved) is refused while both live
    other = {k: v + 1 if v.is_floating_point() else v for k, v in det.state_dict().items()}
    for who in (det, twin):
        with pytest.raises(RuntimeError, match="shallow copy of it.*copy.deepcopy"):
            who.to("meta")
        with pytest.raises(RuntimeError, match="shallow copy of it"):
            who.load_state_dict(other)
        with pytest.raises(RuntimeError, match="to_empty is refused while a shallow copy"):
            who.to_empty(device="cpu")  # on its own device: it filled the tensors the other reads
        who.load_state_dict(who.state_dict())  # its own weights back: nothing changes
        who.to("cpu")  # where it is
    assert torch.equal(det.predict(x)["scores"], want) and det.calibration == cal
    deep = copy.deepcopy(det)
    deep.load_state_dict(other)  # a deep copy shares nothing
    assert torch.equal(det.predict(x)["scores"], want)
    twin.__dict__["_cycle"] = twin  # a copy let go that only a cycle of its own keeps (a compiled pipeline)
    del twin, who
    import gc

    gc.disable()
    try:
        det.load_state_dict(other)  # alone again
    finally:
        gc.enable()
    assert "image_threshold" not in det.calibration
    # on another device a cast alone moves nothing: not refused while a copy lives
    meta = Detector(_model(), image_size=128, precision="float32").to("meta")
    meta_twin = copy.copy(meta)
    meta.float()
    meta.to(torch.float32)
    meta.to(memory_format=torch.channels_last)
    meta_twin.to("meta")  # where it is


def test_a_module_holding_the_detector_cannot_cast_it():
    """host.half() or host.to(torch.float64) reached the Detector's tensors past Detector.to: every
    later call failed deep inside, or a fused Detector ran its statistics in float16."""
    det = Detector(_model(), image_size=64, precision="float32")
    x = _images(1, 64)
    want = det.predict(x)["scores"]
    host = torch.nn.Module()
    host.det, host.head = det, torch.nn.Linear(2, 2)
    for cast in (lambda: host.half(), lambda: host.to(torch.float64), lambda: host.bfloat16()):
        with pytest.raises(TypeError, match=r"Detector: a cast of its torch.float32 tensors.*precision option"):
            cast()
    host.float()  # float32 on a float32 Detector: nothing changes
    host.to("cpu")
    assert torch.equal(det.predict(x)["scores"], want)
    assert all(t.dtype == torch.float32 for t in det.state_dict().values() if t.is_floating_point())


def test_fits_inside_inference_mode_keep_plain_tensors():
    """Fitted inside torch.inference_mode(), the statistics were inference tensors: the Detector's
    own snapshot could not be loaded back into it."""
    det = Detector(_model(), image_size=128, precision="float32")
    with torch.inference_mode():
        det.fit_normalization(_images(4, 128))
        det.calibrate(_images(4, 128, seed=5))
    assert not det.norm_mean.is_inference() and not det.norm_std.is_inference()
    x = _images(1, 128, seed=9)
    want = det.predict(x)["scores"]
    det.load_state_dict(det.state_dict())
    assert torch.equal(det.predict(x)["scores"], want)


def test_a_pickled_or_copied_detector_leaves_its_caches_behind_and_scores_the_same():
    """A pickle or a deep copy carried the buffers of every thread that had called the Detector."""
    import copy
    import pickle

    det = Detector(_model(), image_size=128, precision="float32", batch_size=1)
    x = _images(2, 128)
    want = det.predict(x)["scores"]
    assert det._workspace  # filled by the call
    for twin in (pickle.loads(pickle.dumps(det)), copy.deepcopy(det)):
        assert twin._workspace == {} and twin._graphs == {} and twin._compiled is None
        assert torch.equal(twin.predict(x)["scores"], want)
    assert det._workspace  # the original keeps its own


def test_float_images_in_0_1_are_said_to_be_read_as_minus_1_1():
    """torchvision's to_tensor gives [0, 1]; read as [-1, 1] every pixel is lighter (a score of
    half the uint8 image's) and nothing said it, where [0, 255] floats are refused."""
    import warnings

    from defect_fast.data import DataWarning

    det = Detector(_model(), image_size=64, precision="float32")
    unit = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DataWarning, match=r"^predict: float images are read as \[-1, 1\] and these lie in \[0, 1\].*"
                                         r"map them with x \* 2 - 1"):
        det.predict(unit)
    with pytest.warns(DataWarning, match=r"^predict_batched: float images are read as \[-1, 1\]"):
        det.predict_batched(unit.unsqueeze(0))
    with warnings.catch_warnings(record=True) as caught:  # said once, as calibrate's
        warnings.simplefilter("always")
        det.calibrate(torch.stack([unit, unit.flip(-1), unit.flip(-2), unit.flip(-1, -2)]))
    assert [str(w.message).split(":")[0] for w in caught if issubclass(w.category, DataWarning)] == ["calibrate"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        det.predict(unit * 2 - 1)  # [-1, 1], dark pixels and light: nothing said
        det.predict((unit * 255).to(torch.uint8))


def test_predict_marks_and_names_blank_frames_which_would_pass(recwarn, tmp_path):
    """A frame of one colour (a covered lens, a failed exposure) scores low and passed through the
    API without a word, where predict marks it "blank" in scores.json and watch sets it aside."""
    from defect_fast.data import DataWarning

    det = Detector(_model(), image_size=128)
    img = _images(1, 128)[0]
    grey = np.full((90, 150), 128, np.uint8)
    res = det.predict([img, grey, torch.full((3, 64, 64), -0.5)])
    assert res["blank"] == [False, True, True]
    said = [str(w.message) for w in recwarn if issubclass(w.category, DataWarning)]
    assert said == ["predict: 2 of 3 images are of one colour throughout (image 1, image 2): blank frames (a failed "
                    "exposure, a covered lens)?"], said
    assert all(w.filename == __file__ for w in recwarn if issubclass(w.category, DataWarning))  # the caller's line
    recwarn.clear()
    assert det.predict(img)["blank"] == [False] and not [w for w in recwarn if issubclass(w.category, DataWarning)]
    # judged at the model's size, as a file is read: a photo is blank or not as its file, array or PIL image
    # alike (one pixel off in a large grey frame: the file was blank, its array not)
    frame = np.full((600, 700), 128, np.uint8)
    frame[300, 350] = 129
    Image.fromarray(frame).save(tmp_path / "grey.png")
    forms = (frame, Image.fromarray(frame), tmp_path / "grey.png")
    assert [det.predict(f)["blank"] for f in forms] == [[True]] * 3
    # float frames as given: their resize leaves a constant frame a spread of about 4e-7 (they were not blank)
    assert det.predict([torch.full((3, 300, 200), 0.3), torch.full((3, 129, 130), -1.0)])["blank"] == [True, True]
    # named in the order given
    res = det.predict([grey] * 3 + [img] * 8 + [grey])
    assert "(image 0, image 1, image 2, ...)" in str([w.message for w in recwarn][-1])


def test_an_item_of_a_list_that_is_refused_is_named_by_its_position(tmp_path):
    """One bad frame among a batch of camera frames was refused by a message that did not say
    which one; a file's error names the file, as before."""
    det = Detector(_model(), image_size=128)
    img = _images(1, 128)[0]
    hwc = img.permute(1, 2, 0).numpy()
    for batch, kind, words in (([img, img.float() * 2], ValueError, "list item 1 (of 2): predict: float images must lie in [-1, 1]"),
                               ([hwc.astype(np.uint16), hwc], TypeError, "list item 0 (of 2): numpy images must be uint8"),
                               ([img, hwc, torch.zeros(4, 8, 8)], ValueError, "list item 2 (of 3): tensor images must be")):
        with pytest.raises(kind, match="^" + re.escape(words)):
            det.predict(batch)
    from defect_fast.data import DataError

    with pytest.raises(DataError, match="^" + re.escape(str(tmp_path / "gone.png"))):
        det.predict([img, tmp_path / "gone.png"])
    with pytest.raises(TypeError, match="^numpy images must be uint8"):  # a list of one: as the item itself
        det.predict([hwc.astype(np.uint16)])


def test_other_weights_by_load_state_dict_set_the_thresholds_aside_and_its_own_keep_them(tmp_path):
    """load_state_dict of another Detector's weights kept this one's thresholds (a stale one judged
    the new scores: 12 of 12 images flagged where the other flagged 6), and a fused Detector's save()
    then wrote its own earlier weights beside them. Other weights now set the thresholds aside (a
    fused Detector then refuses to save), also through a module holding the Detector; its own
    weights loaded back, from a plain dict too, keep them."""
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    a, b = Detector(_model(), image_size=128), Detector(m, image_size=128)
    a.calibrate(_images(5, 128, seed=4))
    b.calibrate(_images(5, 128, seed=5))
    b.trained_proportions = [0.5, 2.0]
    own = {k: v.clone() for k, v in b.state_dict().items()}
    kept = b.calibration
    b.load_state_dict(own)  # a snapshot of its own: nothing changes
    assert b.calibration == kept and b.image_threshold() == kept["image_threshold"]
    with pytest.raises(RuntimeError):  # a non-tensor entry: torch refuses it, and nothing was set aside for it
        b.load_state_dict({**own, next(iter(own)): [1.0]})
    assert b.calibration == kept and b.trained_proportions == [0.5, 2.0]
    key = next(k for k, v in own.items() if v.dim() >= 2)
    for other in (own[key].reshape(-1) + 1, own[key][:1]):  # nor a tensor of another shape, which torch refuses
        with pytest.raises(RuntimeError, match="size mismatch"):
            b.load_state_dict({**own, key: other})
        assert b.calibration == kept and b.trained_proportions == [0.5, 2.0]
    b.load_state_dict({**own, "norm_mean": own["norm_mean"].reshape(1)})  # one value for a 0-d buffer: torch takes it
    assert own["norm_mean"].dim() == 0 and b.calibration == kept
    b.load_state_dict({**own, "norm_mean": own["norm_mean"].reshape(1) + 5})  # another value: taken, and said
    with pytest.raises(ValueError, match="set on the weights load_state_dict replaced"):
        b.image_threshold()
    b.load_state_dict(own)
    b.calibration = dict(kept)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    x = _images(3, 128, seed=9)
    assert torch.equal(b.predict_batched(x)["scores"], a.predict_batched(x)["scores"])  # a's weights
    with pytest.raises(ValueError, match="set on the weights load_state_dict replaced"):
        b.image_threshold()
    assert b.trained_proportions is None  # those of other weights' training images: not known
    assert b.predict(x[0])["regions"] == [[]]  # no pixel threshold either: no region drawn on another scale
    with pytest.raises(ValueError, match="given other weights by load_state_dict"):
        b.save(tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    # through a module that holds the Detector
    c = Detector(m, image_size=128)
    c.calibrate(_images(5, 128, seed=5))
    torch.nn.Sequential(c).load_state_dict(torch.nn.Sequential(a).state_dict())
    with pytest.raises(ValueError, match="set on the weights load_state_dict replaced"):
        c.image_threshold()
    # an unfused Detector saves the weights it holds, without thresholds
    unfused = Detector(_model(), image_size=128, fuse=False)
    unfused.calibrate(_images(5, 128, seed=4))
    unfused.load_state_dict(Detector(m, image_size=128, fuse=False).state_dict())
    again = Detector.load(unfused.save(tmp_path / "u.pt"), device="cpu", fuse=False)
    assert torch.equal(again.predict_batched(x)["maps"], unfused.predict_batched(x)["maps"])
    with pytest.raises(ValueError, match="set on the weights load_state_dict replaced"):
        again.image_threshold()
