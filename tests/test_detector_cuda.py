"""The Detector's tuned path on a CUDA device: the paper's maps and the recommended run's
(perceptual map + image context), eager and replayed from CUDA graphs, against the float32
pipeline on the CPU. ``pytest -m cuda`` (the GPU suite's tests step) runs them; elsewhere they
are skipped, and the same check runs on the CPU without graphs
(``test_the_check_itself_on_the_cpu``), so that its own logic is tested everywhere."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from defect_fast.detect import Detector
from defect_fast.perceptual import PerceptualMap, reference_brightness
from tests.test_context import RandomTrunkContext, _surfaces
from tests.test_detector import _images, _model
from tests.test_perceptual import _trunk

SIZE = 128


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 on CUDA is float32 here: cuDNN's default TF32 convolutions round inputs to 10
    mantissa bits, about 1e-3 of the recommended map's range, the size of these tests' tolerance."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@functools.lru_cache(maxsize=None)
def _recommended(name: str, placement: str = "cells") -> tuple[dict, torch.Tensor]:
    """Keyword arguments of a Detector with a fitted perceptual map (pyramid 1 2) and image context
    (with the row profile), both levelling the brightness as the recommended run does, on random trunks (fitted by a CPU float32 Detector), and uint8 test images; fitted once per
    model name and ``placement`` (the checks copy what they move to a device)."""
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib = to_u8(_surfaces(12, SIZE, seed=1)), to_u8(_surfaces(4, SIZE, seed=2))
    kw = dict(stride=32, blend="hann", smooth_sigma=2.0)
    base = Detector(_model(name), SIZE, precision="float32", **kw)
    pm = PerceptualMap(SIZE, trunk=_trunk(), scales=(1, 2), placement=placement)
    pm.brightness = reference_brightness(normal)
    with torch.no_grad():
        x = base._to_model_input(normal)
        pm.fit([(x, base._stitched_recon(x))])
    det = Detector(_model(name), SIZE, precision="float32", map_kind="perceptual", perceptual=pm, **kw)
    # ImageContext is RandomTrunkContext here (the tests' monkeypatch); with the row profile, as the recommended run
    det.fit_context(normal, calib, profile="rows", level_brightness=True, placement=placement)
    kw.update(map_kind="perceptual", perceptual=pm, context=det.context)
    return kw, to_u8(_surfaces(3, SIZE, seed=3))


def check_tuned_pipeline(device: str, name: str, recommended: bool, graphs: bool, placement: str = "cells") -> None:
    """The tuned Detector on ``device`` (precision "auto", channels-last, fused model, CUDA graphs
    with ``graphs``) against the float32 pipeline on the CPU, and float32 on ``device`` against it;
    ``placement``: the recommended pipeline's (its weights are made before a graph is captured)."""
    if recommended:
        kw, x = _recommended(name, placement)
    else:
        kw, x = dict(stride=16 if name == "awae" else None), _images(3, SIZE)
    with torch.no_grad():
        want_maps, want_scores = Detector(_model(name), SIZE, precision="float32", channels_last=False, **kw)(x)
        f32 = Detector(_model(name), SIZE, device=device, precision="float32", **copy.deepcopy(kw))
        maps, scores = f32(x.to(device))
        scale = float(want_maps.abs().max())
        torch.testing.assert_close(maps.cpu(), want_maps, atol=1e-3 * scale, rtol=1e-3)
        torch.testing.assert_close(scores.cpu(), want_scores, atol=1e-3 * float(want_scores.abs().max()), rtol=1e-3)

        tuned = Detector(_model(name), SIZE, device=device, cuda_graphs=graphs, **copy.deepcopy(kw))
        if recommended:
            assert tuned._shared_stem(tuned.context) == 2
        # cuDNN's timed algorithm search while the model runs on CUDA ("auto"), the setting as it was after
        assert tuned.cudnn_benchmark == (torch.device(device).type == "cuda")
        before, seen = torch.backends.cudnn.benchmark, []
        hook = tuned.model.register_forward_pre_hook(lambda _m, _a: seen.append(torch.backends.cudnn.benchmark))
        maps, scores = tuned(x.to(device))
        hook.remove()
        assert seen and torch.backends.cudnn.benchmark == before
        if tuned.cuda_graphs:  # timed in the warm-up calls, not inside the capture that follows them
            assert seen[0] is True and seen[-1] is False
        else:
            assert set(seen) == {tuned.cudnn_benchmark or before}
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and torch.isfinite(scores).all()
        assert _corr(maps.cpu(), want_maps) > 0.99
        assert (scores.cpu() - want_scores).abs().max() <= 0.05 * float(want_scores.abs().max()) + 1e-3
        # a second call (a graph replay) gives the same maps, and the first call's outputs stay theirs
        kept = maps.clone()
        other = tuned(torch.flip(x, dims=[-1]).to(device))[0]
        again = tuned(x.to(device))[0]
        assert torch.equal(maps, kept) and not torch.equal(other, kept)
        torch.testing.assert_close(again, kept, atol=1e-5 * float(kept.abs().max()), rtol=1e-5)


@pytest.fixture(autouse=True)
def _random_trunk_context(monkeypatch):
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name,recommended", [("cmaae", False), ("awae", False), ("ae-ssim", False), ("cmaae", True)])
def test_tuned_cuda_pipeline_matches_float32_on_the_cpu(name, recommended, graphs):
    check_tuned_pipeline("cuda", name, recommended, graphs)


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_tuned_cuda_pipeline_with_the_cells_on_their_centres(graphs):
    check_tuned_pipeline("cuda", "cmaae", True, graphs, placement="centres")


@pytest.mark.parametrize("name,recommended,placement", [("cmaae", False, "cells"), ("ae-ssim", False, "cells"),
                                                        ("cmaae", True, "cells"), ("cmaae", True, "centres")])
def test_the_check_itself_on_the_cpu(name, recommended, placement):
    """The same check on the CPU (no graphs there), so that the CUDA test's own logic is tested
    on every machine."""
    check_tuned_pipeline("cpu", name, recommended, graphs=False, placement=placement)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_graph_owns_its_workspace():
    """A graph captured while the workspace held a buffer for its shape wrote that buffer on every
    replay; once the workspace let it go (more than MAX_WORKSPACE shapes since), its memory went to other tensors.
    Calls of many other shapes between two replays must leave the replay's result unchanged."""
    det = Detector(_model("cmaae"), SIZE, device="cuda", cuda_graphs=True, batch_size=4)  # 8 patches: two chunks, a workspace
    x = _images(2, SIZE).cuda()
    with torch.inference_mode():
        first = [t.clone() for t in det(x)]
        for n in range(3, 14):  # more other shapes than it keeps: the workspace lets go of the first one's buffer
            det(_images(n, SIZE).cuda())
        keep = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(8)]  # memory handed out again
        again = det(x)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(bool((k == 7.0).all()) for k in keep)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_are_kept_for_the_last_few_shapes():
    """Each captured graph holds its own memory pool: a caller passing ever new batch sizes must
    not grow GPU memory without end. A replay after the graphs were let go captures again and
    gives the same maps."""
    from defect_fast.detect import MAX_GRAPHS

    det = Detector(_model("cmaae"), SIZE, device="cuda", cuda_graphs=True)
    x = _images(2, SIZE).cuda()
    with torch.inference_mode():
        first = det(x)[0].clone()
        for n in range(3, 3 + 2 * MAX_GRAPHS):
            det(_images(n, SIZE).cuda())
            det(x)  # used again each time: kept, the least recently used go
            assert len(det._graphs) <= MAX_GRAPHS and any(k[0][0] == 2 for k in det._graphs)
        assert len(det._graphs) == MAX_GRAPHS
        torch.testing.assert_close(det(x)[0], first, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_on_a_second_gpu_while_the_first_is_current():
    """Capture makes its stream, and replay launches, on the current GPU: a Detector on cuda:1
    called while cuda:0 is current must still capture and replay on cuda:1."""
    torch.cuda.set_device(0)
    det = Detector(_model("cmaae"), SIZE, device="cuda:1", cuda_graphs=True)
    want = Detector(_model("cmaae"), SIZE, device="cuda:1")
    x = _images(2, SIZE).to("cuda:1")
    with torch.inference_mode():
        for _ in range(2):  # capture, then replay
            maps, scores = det(x)
            torch.testing.assert_close(maps, want(x)[0], atol=1e-3 * float(maps.abs().max()), rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_takes_gpu_tensors_beside_ones_it_resizes():
    """Tensors on the GPU at the model's size beside tensors of another size (resized on the
    CPU, as files are): one batch, one device; the maps are the CPU Detector's."""
    imgs = [_images(1, SIZE)[0], _images(1, 96, seed=2)[0]]
    det = Detector(_model("cmaae"), SIZE, device="cuda", precision="float32")
    got = det.predict([imgs[0].cuda(), imgs[1].cuda()])
    want = Detector(_model("cmaae"), SIZE, precision="float32").predict(imgs)
    for a, b in zip(got["maps"], want["maps"]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3 * float(b.abs().max()), rtol=1e-3)
