"""Image context: the decomposition of the distance into positions, what it responds to, storage,
and the Detector's combination of it with its own map and score."""
from __future__ import annotations

import json
import re

import pytest
import torch

from defect_fast.context import ImageContext, _contribution, grid_side, profile_across_streaks
from defect_fast.detect import Detector
from defect_fast.models import build_model
from defect_fast.perceptual import PerceptualMap
from tests.test_perceptual import _trunk, random_trunk_map


class RandomTrunkContext(ImageContext):
    """An ImageContext whose trunk defaults to :func:`_trunk` (for code that builds its own)."""

    def __init__(self, image_size: int, trunk: dict[str, torch.Tensor] | None = None, **kw):
        super().__init__(image_size, trunk=trunk or _trunk(), **kw)


def _surfaces(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Defect-free surfaces in [-1, 1]: vertical streaks of random strength over fine noise."""
    g = torch.Generator().manual_seed(seed)
    streaks = torch.randn(n, 1, 1, size, generator=g) * (0.15 + 0.05 * torch.rand(n, 1, 1, 1, generator=g))
    noise = torch.randn(n, 1, size, size, generator=g) * 0.05
    return (streaks + noise).expand(-1, 3, -1, -1).clamp(-1, 1).contiguous()


def _fitted(size: int = 128, n: int = 20, profile: str = "none") -> ImageContext:
    ctx = ImageContext(size, trunk=_trunk(), profile=profile)
    normal = _surfaces(n, size)
    assert ctx.fit(lambda: normal.split(8)) == n
    return ctx


def test_each_position_share_averages_to_the_squared_distance():
    g = torch.Generator().manual_seed(1)
    f = torch.rand(3, 6, 5, 5, generator=g)
    mean = torch.rand(6, generator=g)
    a = torch.randn(6, 6, generator=g)
    precision = a @ a.T + torch.eye(6)
    d = f.mean(dim=(2, 3)) - mean
    torch.testing.assert_close(_contribution(f, mean, precision).mean(dim=(1, 2)), ((d @ precision) * d).sum(1))


def test_grid_side_matches_the_trunk():
    ctx = ImageContext(128, trunk=_trunk(), layers=(1, 2, 3, 4, 5))
    for size in (64, 128, 256, 300):
        feats = ctx.features(torch.zeros(1, 3, size, size))
        assert [f.shape[-1] for f in feats] == [grid_side(size, i) for i in range(1, 6)]
        assert all(f.shape[-2] == f.shape[-1] for f in feats)


@pytest.mark.parametrize("layers", [(2, 3, 4, 5), (1, 4), (5,)])
def test_other_layers_fit_map_and_round_trip(layers):
    ctx = ImageContext(128, trunk=_trunk(), layers=layers)
    normal = _surfaces(10)
    ctx.fit(lambda: normal.split(5))
    back = ImageContext.from_state(ctx.state())
    assert back.layers == tuple(sorted(layers))
    x = _surfaces(2, seed=3)
    with torch.no_grad():
        m = ctx.map(ctx.features(x), 128)
        torch.testing.assert_close(back.map(back.features(x), 128), m)
    assert m.shape == (2, 128, 128) and torch.isfinite(m).all()


@pytest.mark.parametrize("layers", [(), (0,), (6,), (3, 3), (2.0,)])
def test_bad_layers_are_refused(layers):
    with pytest.raises(ValueError, match="layers"):
        ImageContext(128, trunk=_trunk(), layers=layers)


def test_a_brighter_band_raises_the_score_and_the_map_over_it():
    """A region-wide change in miniature: the top 48 rows of a surface brighter by 0.3. The image
    scores above fresh defect-free surfaces, and the map is higher over the band (its fields
    reach about 50 pixels past it) than over the far part of the image."""
    ctx = _fitted()
    with torch.no_grad():
        normal_scores = ctx.score(ctx.features(_surfaces(10, seed=5)))
    for seed in (6, 7, 8):
        x = _surfaces(1, seed=seed)
        x[..., :48, :] = (x[..., :48, :] + 0.3).clamp(-1, 1)
        with torch.no_grad():
            feats = ctx.features(x)
            score = ctx.score(feats)
            m = ctx.map(feats, 128)[0]
        assert float(score) > float(normal_scores.max()) + 2.0
        assert float(m[:48].mean()) > float(m[96:].mean()) + 1.5


def test_the_defect_free_statistics_are_those_of_unseen_images():
    """Cross-fitted: fresh defect-free surfaces score about 0 with spread about 1, not far above
    (as the in-sample distances of a Gaussian would make them)."""
    ctx = _fitted(n=40)
    with torch.no_grad():
        s = ctx.score(ctx.features(_surfaces(40, seed=7)))
    assert abs(float(s.mean())) < 1.0 and 0.3 < float(s.std()) < 3.0


def test_fit_needs_ten_images_and_the_same_batches_twice():
    ctx = ImageContext(64, trunk=_trunk())
    with pytest.raises(ValueError, match="at least 10"):
        ctx.fit(lambda: [_surfaces(9, 64)])
    calls = iter([[_surfaces(12, 64)], [_surfaces(6, 64)]])
    with pytest.raises(ValueError, match="second pass"):
        ctx.fit(lambda: next(calls))


def test_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 64"):
        ImageContext(32, trunk=_trunk())


def test_state_round_trip_gives_the_same_score_and_map():
    ctx = _fitted()
    ctx.set_detector_stats(base_maps=torch.rand(3, 8, 8), scores=torch.tensor([1.0, 2.0, 4.0]))
    back = ImageContext.from_state(ctx.state())
    x = _surfaces(2, seed=8)
    with torch.no_grad():
        a, b = ctx.features(x), back.features(x)
        torch.testing.assert_close(back.score(b), ctx.score(a))
        torch.testing.assert_close(back.map(b, 128), ctx.map(a, 128))
    assert float(back.score_std) == pytest.approx(float(torch.tensor([1.0, 2.0, 4.0]).std()))


@pytest.mark.parametrize("position_normalized", [False, True])
def test_detector_adds_the_context_to_its_map_and_score(monkeypatch, position_normalized):
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=32, blend="hann", smooth_sigma=2.0,
                   precision="float32")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib = to_u8(_surfaces(12, seed=1)), to_u8(_surfaces(6, seed=2))
    with torch.no_grad():
        if position_normalized:  # --normalize position: per-position mean and spread of the raw maps
            det.fit_normalization(normal)
            assert float(det.norm_std.std()) > 0
        plain_maps, _ = det(calib)
        assert det.fit_context(normal, calib) == 12
        maps, scores = det(calib)
        ctx = det.context
        feats = ctx.features(det._to_model_input(calib))
        normalized = (det.raw_maps(calib) - det.norm_mean) / det.norm_std
        want = (normalized - ctx.base_mean) / ctx.base_std + ctx.map(feats, 128)
        want = det.blur @ want @ det.blur.T
    torch.testing.assert_close(maps, want, atol=1e-4, rtol=1e-4)
    # the map term of the calibration images is standardised: mean 0 and spread 1 over their pixels
    z = (normalized - ctx.base_mean) / ctx.base_std
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, rel=1e-3)
    # and so is the score term: the combined score minus the context score
    s = scores - ctx.score(feats)
    assert abs(float(s.mean())) < 1e-4 and float(s.std()) == pytest.approx(1.0, rel=1e-3)
    assert not torch.allclose(maps, plain_maps)
    # the fit's own predictions of the calibration images (what a run's thresholds come from)
    # are those of the fitted detector
    with torch.no_grad():
        _n, fitted = det._fit_context(normal, calib)
        again = det.predict_batched(calib)
    torch.testing.assert_close(fitted["maps"], again["maps"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted["scores"], again["scores"], atol=1e-4, rtol=1e-4)
    # a normalisation fitted afterwards changes the maps the context standardised: it goes with it
    # (as with fit_perceptual), rather than weigh the map against the context by a stale spread
    det.fit_normalization(normal)
    assert det.context is None


def test_the_context_fit_reads_images_of_another_size_as_predict_does(monkeypatch):
    """uint8 images not at the model's size: the fit resized them with the float pipeline's
    interpolation while predict_batched resizes as image files are, so the fit's calibration
    scores were not the detector's."""
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=32, precision="float32")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib = to_u8(_surfaces(12, seed=1, size=160)), to_u8(_surfaces(4, seed=2, size=160))
    _n, fitted = det._fit_context(normal, calib)
    again = det.predict_batched(calib)
    torch.testing.assert_close(fitted["scores"], again["scores"], atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="fit_context: expected a tensor"):
        det.fit_context([normal], calib)


def test_the_context_alone_can_be_the_image_score(monkeypatch):
    """image_score="context": the score is the context score alone, the maps are those of the
    combination, the fit's calibration scores are the detector's, and the choice is stored
    (files from before it load as "combined"; a foreign value is refused)."""
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=32, precision="float32")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib, x = to_u8(_surfaces(12, seed=1)), to_u8(_surfaces(6, seed=2)), to_u8(_surfaces(3, seed=3))
    x[0, :, 40:60, 40:60] = 255  # a bright spot
    with torch.no_grad():
        det.fit_context(normal, calib)
        combined_maps, combined = det(x)
        _n, fitted = det._fit_context(normal, calib, image_score="context")
        maps, scores = det(x)
        feats = det.context.features(det._to_model_input(x))
        torch.testing.assert_close(scores, det.context.score(feats))
        again = det.predict_batched(calib)
    torch.testing.assert_close(maps, combined_maps)
    assert not torch.allclose(scores, combined)
    torch.testing.assert_close(fitted["scores"], again["scores"], atol=1e-5, rtol=1e-5)
    state = det.context.state()
    assert ImageContext.from_state(state).image_score == "context"
    assert ImageContext.from_state({k: v for k, v in state.items() if k != "image_score"}).image_score == "combined"
    with pytest.raises(ValueError, match="image_score"):
        ImageContext.from_state({**state, "image_score": "max"})
    with pytest.raises(ValueError, match="image_score"):
        det.fit_context(normal, calib, image_score="sum")


@pytest.mark.parametrize("profile,level,image_score", [("none", False, "combined"), ("rows", False, "combined"),
                                                       ("rows", True, "combined"), ("rows", True, "context")])
def test_onnx_export_of_a_detector_with_context_matches_it(tmp_path, monkeypatch, profile, level, image_score):
    pytest.importorskip("onnxruntime")
    from defect_fast.cli import main
    from defect_fast.runs import atomic_save
    from tests.test_export import _run_exported

    torch.manual_seed(0)
    m = build_model("cmaae", memory_size=20)
    det = Detector(m, image_size=128, stride=64, precision="float32")
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    det.fit_context(to_u8(_surfaces(10, seed=1)), to_u8(_surfaces(4, seed=2)), profile=profile, level_brightness=level,
                    image_score=image_score)
    assert (det.context.brightness is not None) == level
    run = tmp_path / "run"
    run.mkdir()
    atomic_save({"model_name": "cmaae", "model_config": m.config(), "model_state": m.state_dict(), "image_size": 128,
                 "context": det.context.state()}, run / "model.pt")
    out = tmp_path / "det.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--batch", "2"]) == 0
    sidecar = json.loads((tmp_path / "det.onnx.json").read_text())
    assert sidecar["context"] is True and sidecar["context_profile"] == profile
    assert sidecar["context_profile_in_score"] is False  # fitted now: the score reads the map without it
    assert sidecar["brightness"] == {"perceptual": None, "context": det.context.brightness}
    assert sidecar["image_score"] == image_score
    det = Detector.load(run, device="cpu", precision="float32")
    assert det.context is not None and det.context.profile == profile and det.context.image_score == image_score
    assert Detector.load(run, device="cpu", map_kind="residual").context is None  # standardised for its own map only
    x = to_u8(_surfaces(2, seed=9))
    with torch.no_grad():
        want_maps, want_scores = det(x)
    maps, scores = _run_exported("onnx", out, x)
    torch.testing.assert_close(maps, want_maps, atol=1e-4 * float(want_maps.abs().max()), rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-4 * float(want_scores.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("layers", [(3, 4, 5), (1, 2, 5)])
def test_features_from_a_shared_stem_are_those_computed_afresh(dtype, layers):
    pm = PerceptualMap(128, trunk=_trunk())  # conv1 and conv2
    ctx = ImageContext(128, trunk=_trunk(), layers=layers)
    assert ctx.shares_stem(pm) == 2
    assert ctx.shares_stem(PerceptualMap(128, layers=1, trunk=_trunk())) == 1
    assert ctx.shares_stem(PerceptualMap(128, trunk=_trunk(seed=1))) == 0  # other weights
    x = _surfaces(3)
    stem = pm.features(x, dtype, channels_last=True)
    for k in (1, 2):
        shared = ctx.features(x, dtype, True, stem=stem[:k])
        fresh = ctx.features(x, dtype, True)
        assert len(shared) == len(fresh) == len(layers)
        for a, b in zip(shared, fresh):
            assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("level", [False, True])
def test_detector_computes_the_trunk_layers_it_shares_once(monkeypatch, level):
    import defect_fast.context as context
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=32, blend="hann", precision="bfloat16")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib = to_u8(_surfaces(12, seed=1)), to_u8(_surfaces(4, seed=2))
    det.fit_perceptual(normal, images_per_batch=4, level_brightness=level)
    # the statistics were fitted with the trunk in the detector's precision (its bf16 weight copies)
    assert {k[:2] for k in det.image_map.__dict__["_cast_weights"]} == {(0, torch.bfloat16), (1, torch.bfloat16)}
    seen = {}
    fit = ImageContext.fit
    monkeypatch.setattr(ImageContext, "fit", lambda self, batches, **kw: seen.update(kw) or fit(self, batches, **kw))
    det.fit_context(normal, calib, level_brightness=level)
    assert seen == {"dtype": torch.bfloat16, "channels_last": True}  # and so was the context
    # levelled to the same brightness (that of the same images), the trunks still share their stem
    assert det.context.brightness == det.image_map.brightness and (det.context.brightness is not None) == level
    assert det._shared_stem(det.context) == 2
    calls = []
    conv = ImageContext._trunk_conv
    monkeypatch.setattr(ImageContext, "_trunk_conv", lambda self, i, h: calls.append(i) or conv(self, i, h))
    with torch.no_grad():
        maps, scores = det(calib)
        assert calls == [2, 3, 4]  # conv1 and conv2 of the image come from the perceptual map
        calls.clear()
        monkeypatch.setattr(det, "_shared_stem", lambda ctx: 0)
        unshared = det(calib)
        assert calls == [0, 1, 2, 3, 4]
    assert torch.equal(maps, unshared[0]) and torch.equal(scores, unshared[1])
    monkeypatch.undo()
    # the answer follows the objects and their brightness: a context levelled otherwise shares
    # nothing, whether it is a new object (it was keyed by id, which a new one can reuse) or the
    # same one changed in place
    assert det._shared_stem(det.context) == 2
    kept = det.context.brightness
    det.context.brightness = 0.123
    assert det._shared_stem(det.context) == 0
    det.context.brightness = kept
    assert det._shared_stem(det.context) == 2
    other = ImageContext.from_state({**det.context.state(), "brightness": 0.123})
    assert other.shares_stem(det.image_map) == 0 and det._shared_stem(other) == 0


def test_the_median_written_for_export_is_torch_median():
    from defect_fast.context import _median, _sorted_median

    x = torch.randn(3, 5, 7, 6)
    x[0, 0, 0, :2] = x[0, 0, 0, 2]  # ties
    for dim in (1, 2, 3):
        assert torch.equal(_median(x, dim), x.median(dim=dim).values)
        assert torch.equal(_sorted_median(x, dim), x.median(dim=dim).values)


def test_the_selection_network_gives_torch_median_bit_for_bit():
    from defect_fast import context
    from defect_fast.context import _median_network, _network_median

    g = torch.Generator().manual_seed(0)
    for n in range(1, 70):
        for shape, dim in (((3, 5, n), 2), ((2, n, 4, 3), 1), ((n,), 0)):
            x = torch.randn(shape, generator=g)
            if n % 3 == 0:  # many ties, as the exact zeros of ReLU features give
                x = torch.randint(0, 4, shape, generator=g).float()
            assert torch.equal(_network_median(x, dim), x.median(dim=dim).values), (n, shape, dim)
    # a 256-px profile's first median: channels-last features, rows split into blocks
    x = torch.relu(torch.randn(3, 256, 31, 31, generator=g)).log1p().contiguous(memory_format=torch.channels_last)
    assert x.numel() // 31 > context._NETWORK_ROWS
    assert torch.equal(_network_median(x, 3), x.median(dim=3).values)
    assert torch.equal(context._median(x, 3), x.median(dim=3).values)
    x[1, 7, 3, 5] = float("nan")  # a NaN in a row gives NaN, as torch.median does
    assert torch.isnan(_network_median(x, 3)[1, 7, 3]) and not torch.isnan(_network_median(x, 3)[1, 7, 4])
    assert len(_median_network(31)) == 152


def test_the_median_takes_the_network_only_where_it_pays(monkeypatch):
    from defect_fast import context

    used = []
    real = context._network_median
    monkeypatch.setattr(context, "_network_median", lambda x, dim: used.append(x.shape) or real(x, dim))
    big, small = torch.rand(1, 256, 31, 31), torch.rand(8, 256, 31)
    context._median(big, 3)
    context._median(small, 2)  # 2048 rows: torch.median is as quick
    assert used == [big.shape]
    traced = torch.jit.trace(lambda t: context._median(t, 3), (big,), check_trace=False)
    assert used == [big.shape] and torch.equal(traced(big), big.median(dim=3).values)
    assert "aten::median" in str(traced.graph)


def _band_and_spot(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows 40-71 ground differently: streaks twice as strong over the whole width, a bright
    12 x 12 spot at the centre) of surfaces x."""
    band, spot = x.clone(), x.clone()
    band[..., 40:72, :] = (x[..., 40:72, :] * 2.0).clamp(-1, 1)
    spot[..., 58:70, 58:70] = 0.9
    return band, spot


def test_the_profile_lights_a_band_across_the_streaks_far_more_than_a_spot(monkeypatch):
    """A band across the width stands out of the profile map, one value per row. A small spot
    moves the median of its rows much less than it would move their mean (the reason for the
    median: defects narrower than half a row), and far less than the band does."""
    import defect_fast.context as context

    band, spot = _band_and_spot(_surfaces(3, seed=6))
    ctx = _fitted(profile="rows")
    with torch.no_grad():
        normal = ctx.profile_map(ctx.features(_surfaces(10, seed=5))[-1], 128)
        m_band = ctx.profile_map(ctx.features(band)[-1], 128)
        m_spot = ctx.profile_map(ctx.features(spot)[-1], 128)[:, 56:72].amax(dim=(1, 2))
    assert torch.equal(m_band[:, :, 0], m_band[:, :, 77])  # one value per row
    assert float(m_band[:, 44:68].mean(dim=(1, 2)).min()) > float(normal.max()) + 2.0
    assert float(m_band[:, 44:68].mean(dim=(1, 2)).min()) > 3 * float(m_spot.max())
    monkeypatch.setattr(context, "_median", lambda x, dim: x.mean(dim))
    by_mean = _fitted(profile="rows")
    with torch.no_grad():
        m_spot_mean = by_mean.profile_map(by_mean.features(spot)[-1], 128)[:, 56:72].amax(dim=(1, 2))
    assert (m_spot < 0.5 * m_spot_mean).all()


def test_the_profile_is_standardised_on_unseen_images_and_joins_the_context_map():
    ctx = _fitted(n=40, profile="rows")
    plain = ImageContext(128, trunk=_trunk())
    normal = _surfaces(40)
    plain.fit(lambda: normal.split(8))
    x = _surfaces(30, seed=7)
    with torch.no_grad():
        feats = ctx.features(x)
        p = ctx.profile_map(feats[-1], 128)
        assert len(feats) == len(ctx.layers) + 1 and feats[-1].shape == (30, 64 + 192, ctx.profile_grid)
        torch.testing.assert_close(ctx.map(feats, 128), plain.map(plain.features(x), 128) + p)
        torch.testing.assert_close(ctx.score(feats), plain.score(plain.features(x)))  # the score: its own terms
    per_row = p[:, :, 0]
    assert abs(float(per_row.mean())) < 0.5 and 0.4 < float(per_row.std()) < 2.5


def test_columns_light_a_band_along_the_image_of_surfaces_streaked_across_it():
    ctx = ImageContext(128, trunk=_trunk(), profile="columns")
    normal = _surfaces(20).transpose(2, 3).contiguous()  # streaks from side to side
    ctx.fit(lambda: normal.split(8))
    band, _spot = _band_and_spot(_surfaces(3, seed=6))
    band = band.transpose(2, 3).contiguous()  # columns 40-71
    with torch.no_grad():
        normal_map = ctx.profile_map(ctx.features(_surfaces(10, seed=5).transpose(2, 3).contiguous())[-1], 128)
        m = ctx.profile_map(ctx.features(band)[-1], 128)
    assert torch.equal(m[:, 0, :], m[:, 77, :])  # one value per column
    assert float(m[:, :, 44:68].mean(dim=(1, 2)).min()) > float(normal_map.max()) + 2.0


def test_the_profile_round_trips_and_files_without_it_load_as_before():
    ctx = _fitted(profile="rows")
    back = ImageContext.from_state(ctx.state())
    assert back.profile == "rows"
    x = _surfaces(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back.map(back.features(x), 128), ctx.map(ctx.features(x), 128))
    old = _fitted().state()
    old.pop("profile")
    assert ImageContext.from_state(old).profile == "none"
    with pytest.raises(ValueError, match="profile"):
        ImageContext(128, trunk=_trunk(), profile="diagonal")


def test_the_profile_reads_every_conv1_row_and_older_files_keep_their_resampling():
    """conv1's 63 rows (at 256 px) reach the profile's 31 by a 3 x 3 average with stride 2 (its
    own pool geometry); the bilinear resize before read at most 2 of them per grid row, and near
    the centre none of some: a texture change on conv1 row 32 alone did not move the profile."""
    from defect_fast.context import _to_grid

    h = torch.zeros(1, 1, 63, 63)
    h[..., 32, :] = 1.0  # one conv1 row
    assert float(_to_grid(h, 31, "pool")[..., 15, :].mean()) == pytest.approx(1 / 3)
    assert float(_to_grid(h, 31, "bilinear").abs().max()) < 1e-6  # never read
    for n in range(63):  # every conv1 row counts in the pooled grid
        h = torch.zeros(1, 1, 63, 63)
        h[..., n, :] = 1.0
        assert float(_to_grid(h, 31, "pool").max()) > 0.3
    ctx = _fitted(profile="rows")
    assert ctx.profile_resample == "pool" and ImageContext.from_state(ctx.state()).profile_resample == "pool"
    old = ctx.state()
    old.pop("profile_resample")  # a file from before the choice: the resampling its statistics were fitted with
    assert ImageContext.from_state(old).profile_resample == "bilinear"


def _u8(t: torch.Tensor) -> torch.Tensor:
    return ((t + 1) * 127.5).round().to(torch.uint8)


def test_auto_takes_the_profile_across_the_streaks_the_images_share():
    """Streaks top to bottom: rows; side to side: columns; no shared direction: refused, with the counts."""
    streaked = _u8(_surfaces(12, seed=3))
    profile, why = profile_across_streaks(streaked)
    assert profile == "rows" and "in 12 of 12" in why and "top to bottom" in why
    profile, why = profile_across_streaks(streaked.transpose(2, 3))
    assert profile == "columns" and "in 0 of 12" in why and "side to side" in why
    g = torch.Generator().manual_seed(0)
    plain = _u8((torch.randn(12, 1, 128, 128, generator=g) * 0.1).expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"share no streak direction: in \d+ of 12 .* choose the profile"):
        profile_across_streaks(plain)
    # 11 of 12 agreeing is beyond chance (sign test p = 0.0063), 10 of 12 is not (p = 0.039)
    assert profile_across_streaks(torch.cat([streaked[:11], streaked[11:].transpose(2, 3)]))[0] == "rows"
    with pytest.raises(ValueError, match=r"share no streak direction: in 10 of 12"):
        profile_across_streaks(torch.cat([streaked[:10], streaked[10:].transpose(2, 3)]))
    with pytest.raises(ValueError, match="at least 2 images"):
        profile_across_streaks(streaked[:1])


def test_auto_says_which_images_are_blank_and_keeps_them_out_of_the_ratio():
    """Frames of one grey level (a failed shutter) vary in no direction: they are named as such,
    not left out of the count in silence while their 0 / 0 pulled the median ratio to 0."""
    streaked = _u8(_surfaces(12, seed=3))
    blank = torch.zeros(3, 3, 128, 128, dtype=torch.uint8)
    profile, why = profile_across_streaks(torch.cat([streaked, blank]))
    alone = profile_across_streaks(streaked)[1]
    ratio = re.search(r"median ratio ([\d.]+)", alone).group(1)
    assert profile == "rows" and f"median ratio {ratio};" in why and "in 12 of 12" in why
    assert "3 of the 15 images are of one grey level throughout" in why
    with pytest.raises(ValueError, match=r"in 0 of 0 .*median ratio n/a.*4 of the 4 images are of one grey level"):
        profile_across_streaks(torch.full((4, 3, 64, 64), 200, dtype=torch.uint8))


def test_a_detector_fitted_with_auto_stores_the_profile_it_chose_and_why(monkeypatch):
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=64, precision="float32")
    normal, calib = _u8(_surfaces(10, seed=1)), _u8(_surfaces(4, seed=2))
    det.fit_context(normal.transpose(2, 3).contiguous(), calib.transpose(2, 3).contiguous(), profile="auto")
    assert det.context.profile == "columns" and det.context.profile_basis.startswith("columns, across streaks")
    back = ImageContext.from_state(det.context.state())
    assert (back.profile, back.profile_basis) == ("columns", det.context.profile_basis)
    det.fit_context(normal, calib, profile="rows")  # chosen by the caller: no basis to give
    assert det.context.profile == "rows" and det.context.profile_basis is None


@pytest.mark.parametrize("profile", ["rows", "columns"])
def test_the_profile_joins_the_detector_map_but_not_the_map_its_score_comes_from(monkeypatch, profile):
    """The map is the smoothed sum with the profile spread across the image; the score's top values
    come from the map without it (a row's value covers more pixels than the score's top share).
    A model file from before this choice scores with the profile in, as it was calibrated."""
    import defect_fast.context as context
    from defect_fast.detect import top_mean

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=32, blend="hann", smooth_sigma=2.0,
                   precision="float32")
    normal, calib = _u8(_surfaces(12, seed=1)), _u8(_surfaces(6, seed=2))
    if profile == "columns":
        normal, calib = normal.transpose(2, 3).contiguous(), calib.transpose(2, 3).contiguous()
    det.fit_context(normal, calib, profile=profile)
    ctx = det.context
    assert not ctx.profile_in_score
    x = _u8(_surfaces(3, seed=7))
    x[0, :, 40:60] = x[0, :, 40:60] // 2 + 100  # a band across the streaks: a high row (column) value
    if profile == "columns":
        x = x.transpose(2, 3).contiguous()
    with torch.no_grad():
        maps, scores = det(x)
        feats = ctx.features(det._to_model_input(x))
        normalized = (det.raw_maps(x) - det.norm_mean) / det.norm_std
        local = ctx.combine_maps(normalized, ctx.map_parts(feats, 128)[0])
        want = det.blur @ (local + ctx.profile_map(feats[-1], 128)) @ det.blur.T
        without = det.blur @ local @ det.blur.T
    torch.testing.assert_close(maps, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, ctx.combine_scores(top_mean(without, det.top_k), feats), atol=1e-4, rtol=1e-4)
    assert float((maps - without).abs().max()) > 1.0  # the profile is in the map, and it matters
    assert float((top_mean(maps, det.top_k) - top_mean(without, det.top_k)).abs().max()) > 0.1
    # what diagnose marks: the maps the scores come from, in the same pass as the maps and scores
    res = det.predict_batched(x, score_maps=True)
    torch.testing.assert_close(res["maps"], maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["scores"], scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["score_maps"], without, atol=1e-4, rtol=1e-4)
    assert "score_maps" not in det.predict_batched(x)
    assert det.scores_from_other_maps  # what diagnose asks for the score maps by
    # a file written before the choice: its thresholds were set on scores with the profile in
    state = ctx.state()
    state.pop("profile_in_score")
    det.context = ImageContext.from_state(state)
    det._graphs = {}
    assert det.context.profile_in_score
    with torch.no_grad():
        old_maps, old_scores = det(x)
    torch.testing.assert_close(old_maps, maps)
    torch.testing.assert_close(old_scores, ctx.combine_scores(top_mean(maps, det.top_k), feats), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.predict_batched(x, score_maps=True)["score_maps"], maps, atol=1e-5, rtol=1e-5)
    assert not det.scores_from_other_maps
    assert ImageContext.from_state(ctx.state()).profile_in_score is False
    det.context = None
    res = det.predict_batched(x, score_maps=True)
    assert not det.scores_from_other_maps and torch.equal(res["score_maps"], res["maps"])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_profile_from_a_shared_stem_is_the_one_computed_afresh(dtype):
    pm = PerceptualMap(128, trunk=_trunk())
    ctx = ImageContext(128, trunk=_trunk(), profile="rows")
    assert ctx.shares_stem(pm) == 2
    x = _surfaces(3)
    stem = pm.features(x, dtype, channels_last=True)
    shared, fresh = ctx.features(x, dtype, True, stem=stem), ctx.features(x, dtype, True)
    assert len(shared) == len(fresh) == 4
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)


def test_levelled_brightness_takes_lighting_out_of_the_context():
    """With a brightness level, a tile lit 30 % darker has the features, score and map of the
    tile itself; without it, it scores as far from the defect-free tiles as a defect would."""
    ctx = _fitted()
    normal = _surfaces(20)
    levelled = ImageContext(128, trunk=_trunk())
    levelled.brightness = float(((normal + 1) / 2).mean())
    levelled.fit(lambda: normal.split(8))
    x = _surfaces(2, seed=5)
    dim = (x + 1) * 0.7 - 1  # the same surfaces under 30 % less light
    with torch.no_grad():
        for a, b in zip(levelled.features(x), levelled.features(dim)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(levelled.score(levelled.features(dim)), levelled.score(levelled.features(x)),
                                   atol=1e-3, rtol=1e-3)
        assert float((ctx.score(ctx.features(dim)) - ctx.score(ctx.features(x))).min()) > 1.0
    back = ImageContext.from_state(levelled.state())
    assert back.brightness == levelled.brightness
    old = levelled.state()
    old.pop("brightness")
    assert ImageContext.from_state(old).brightness is None  # files from before the option: as read
    # another level, another input: no stem to share with a trunk that reads the images as they are
    assert levelled.shares_stem(PerceptualMap(128, trunk=_trunk())) == 0


def test_identical_images_are_refused_not_a_context_that_never_flags():
    """Ten copies of one image (a way to reach the 10 images the context needs) gave a zero
    covariance whose pseudo-inverse is zero: every image, noise included, scored 0, silently."""
    from defect_fast.data.io import DataError

    ctx = RandomTrunkContext(64)
    one = _surfaces(1, 64, seed=0)
    with pytest.raises(DataError, match="identical images"):
        ctx.fit(lambda: iter([one.repeat(12, 1, 1, 1)]))
    # identical calibration maps or scores: a spread floored at 1e-12 made every later score about 1e12
    for kw in (dict(base_maps=torch.ones(3, 8, 8)), dict(scores=torch.full((4,), 2.5))):
        with pytest.raises(DataError, match=r"defect-free spread over \d calibration images is 0 \(identical images\?\)"):
            ctx.set_detector_stats(**kw)


def test_fit_context_wants_two_calibration_images_before_the_fit(monkeypatch):
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64)
    normal = ((_surfaces(12, 64) + 1) * 127.5).to(torch.uint8)
    monkeypatch.setattr(context.ImageContext, "fit", lambda *a, **k: pytest.fail("fitted before the check"))
    with pytest.raises(ValueError, match="calibration_images must hold at least 2 images"):
        det.fit_context(normal, normal[:1])


def test_the_map_and_profile_put_each_cell_on_its_receptive_field_centre():
    """A one-cell share c(p) of conv3 lands on the centre of that cell's field (16 i + 15), a
    one-row profile value on its row's (8 j + 7), where the resize by size alone ("cells", files
    from before) drew them several pixels off near the edges; files without the setting keep it."""
    from tests.test_perceptual import _centroid

    ctx = ImageContext(256, trunk=_trunk(), layers=(3,), profile="rows", placement="centres")
    ctx.map_precision_3.copy_(torch.eye(384))  # c(p) = fbar . f(p): one lit cell, one lit share
    ctx.profile_precision.copy_(torch.eye(ctx.profile_precision.shape[0]))
    for i in (1, 7, 13):
        f = torch.zeros(1, 384, 15, 15)
        f[0, 0, i, i] = 1.0
        d = torch.zeros(1, ctx.profile_mean.shape[0], 31)
        d[0, 0, 2 * i] = 1.0
        m, rows = ctx.map_parts([f, d], 256)
        p = 16 * i + 15
        assert abs(_centroid(m[0, p]) - p) < 1e-3 and abs(_centroid(m[0, :, p]) - p) < 1e-3
        assert abs(_centroid(rows[0]) - (8 * 2 * i + 7)) < 1e-3
    ctx.placement = "cells"
    m, rows = ctx.map_parts([f, d], 256)
    assert _centroid(m[0, 223]) - 223 > 5 and _centroid(rows[0]) - 215 > 3
    state = _fitted(profile="rows").state()
    assert state["placement"] == "cells"  # the default (perceptual.PLACEMENTS)
    state["placement"] = "centres"
    assert ImageContext.from_state(state).placement == "centres"
    state.pop("placement")
    assert ImageContext.from_state(state).placement == "cells"


def test_the_distance_is_the_mahalanobis_norm_and_the_descriptor_mean_and_spread():
    """By hand: the distance under the identity precision is the Euclidean norm (not its square),
    and an image's descriptor holds each channel's mean and then its standard deviation."""
    from defect_fast.context import _descriptor, _distance

    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    torch.testing.assert_close(_distance(x, torch.zeros(2), torch.eye(2)), torch.tensor([5.0, 2.0 ** 0.5]))
    torch.testing.assert_close(_distance(x, torch.tensor([1.0, 1.0]), 4 * torch.eye(2)),
                               torch.tensor([2 * 13.0 ** 0.5, 0.0]))
    f = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    f[:, 1] *= 2
    d = _descriptor(f)
    torch.testing.assert_close(d, torch.tensor([[4.0, 8.0, f[0, 0].std().item(), f[0, 1].std().item()]]))


def test_the_defect_free_spread_is_refused_when_negligible_beside_the_mean_or_from_one_image():
    """A spread of float rounding beside a large mean (identical scores, computed apart) is no
    spread: floored at 1e-9 of the mean. One image has no spread at all: said as such."""
    from defect_fast.data.io import DataError

    ctx = RandomTrunkContext(64)
    with pytest.raises(DataError, match="defect-free spread over 3 calibration images"):
        ctx.set_detector_stats(scores=torch.tensor([1e6, 1e6 + 1e-4, 1e6 - 1e-4], dtype=torch.float64))
    ctx.set_detector_stats(scores=torch.tensor([1e6, 1e6 + 1.0, 1e6 - 1.0], dtype=torch.float64))
    for kw in (dict(scores=torch.tensor([2.5])), dict(base_maps=torch.rand(1, 8, 8))):
        with pytest.raises(ValueError, match="needs at least 2 images, got 1"):
            ctx.set_detector_stats(**kw)


def test_a_file_written_before_the_profile_score_choice_scores_with_the_profile():
    """Files from before ``profile_in_score`` took the profile into the image score's top values:
    read without the key, they still do; the key, when there, is kept."""
    state = RandomTrunkContext(64).state()
    state.pop("profile_in_score")
    assert ImageContext.from_state(state).profile_in_score is True
    state["profile_in_score"] = False
    assert ImageContext.from_state(state).profile_in_score is False


def _fitted_on_a_random_trunk(monkeypatch):
    """A Detector with a perceptual map and an image context fitted on a random AlexNet trunk; its
    defect-free and calibration images, and the context's five (weight, bias) pairs."""
    import defect_fast.context as context
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    normal, calib = to_u8(_surfaces(10, 64, seed=1)), to_u8(_surfaces(3, 64, seed=2))
    det.fit_perceptual(normal)
    det.fit_context(normal, calib, profile="rows")
    return det, normal, calib, [(conv.weight.clone(), conv.bias.clone()) for conv in det.context.convs]


def _no_trunk_file_anywhere(monkeypatch, tmp_path) -> None:
    """The plain modules back, and no trunk file anywhere: no variable, an empty hub cache, no torchvision."""
    import sys

    import defect_fast.context as context
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(context, "ImageContext", ImageContext)
    monkeypatch.setattr(perceptual, "PerceptualMap", PerceptualMap)
    monkeypatch.delenv("DEFECT_FAST_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torchvision", None)


def test_a_map_and_context_fitted_again_run_the_trunk_the_detector_holds(monkeypatch, tmp_path):
    """A model file carries its trunk, and predict needs no weights file; fitting its map or its
    context again (audit does both, on every fold, in the order training does: the map, which
    drops the context, then the context) needed ``$DEFECT_FAST_ALEXNET_WEIGHTS``, and with
    another file there would have run another trunk than the run's."""
    det, normal, calib, held = _fitted_on_a_random_trunk(monkeypatch)
    assert len(held) == 5  # conv1..conv5
    _no_trunk_file_anywhere(monkeypatch, tmp_path)
    det.fit_perceptual(normal)
    assert det.context is None  # fit_perceptual drops it; the trunk it ran is kept for the next fit
    det.fit_context(normal, calib, profile="rows")
    for module in (det.image_map, det.context):
        for conv, (weight, bias) in zip(module.convs, held):
            assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)
    # a map fitted on another trunk given by the caller: the context's old trunk is not mixed in
    # under it (the two share their first layers); its weights are asked for instead
    from defect_fast.losses.lpips import WeightsNotFound
    from tests.test_perceptual import _trunk

    det.fit_perceptual(normal, trunk=_trunk(seed=7))
    with pytest.raises(WeightsNotFound):
        det.fit_context(normal, calib, profile="rows")


def test_a_detector_loaded_on_another_map_kind_keeps_the_trunk_for_a_later_fit(monkeypatch, tmp_path):
    """``Detector.load(run, map_kind="residual")`` leaves out the stored perceptual map and context
    (fitted on the stored kind's maps); a perceptual map or context fitted after it runs the trunk
    the file carries, as on the stored kind, not one a weights file would give."""
    det, normal, calib, held = _fitted_on_a_random_trunk(monkeypatch)
    det.save(tmp_path / "model.pt")
    _no_trunk_file_anywhere(monkeypatch, tmp_path)
    other = Detector.load(tmp_path / "model.pt", "cpu", map_kind="residual", precision="float32")
    assert other.image_map is None and other.context is None
    other.fit_perceptual(normal)  # the order training fits them in (fit_perceptual drops a context)
    other.fit_context(normal, calib, profile="rows")
    for module, convs in ((other.context, 5), (other.image_map, 2)):
        assert len(module.convs) == convs
        for conv, (weight, bias) in zip(module.convs, held):
            assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)
    # a stored context that does not load is of no matter to a detector that leaves it out
    from defect_fast.runs import RunError, load_model_state

    state = load_model_state(tmp_path / "model.pt")
    state["context"] = {**state["context"], "tensors": {}}
    assert Detector.from_state(state, "cpu", map_kind="residual", precision="float32").context is None
    with pytest.raises(RunError, match="the stored image context does not load"):
        Detector.from_state(state, "cpu", precision="float32")


def _changed_during_a_call(monkeypatch, det, frame, part, name, change) -> torch.Tensor:
    """Run ``change`` on a thread while a camera thread's call of ``det`` on ``frame`` is held in
    ``part.name`` (after the call read what it reads there); assert that the change waits for the
    call, then that both end without an error. Returns the camera's scores."""
    import threading
    import time

    inside, go_on, changed, errors, results = threading.Event(), threading.Event(), threading.Event(), [], []
    real = getattr(part, name)

    def held(*args, **kwargs):  # the camera's call stops there
        if threading.current_thread().name == "camera":
            inside.set()
            assert go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(part, name, held)

    def camera():
        try:
            with torch.no_grad():
                results.append(det(frame)[1])
        except Exception as exc:  # noqa: BLE001 - what the camera met, asserted below
            errors.append(exc)

    def make_change():
        try:
            change()
            changed.set()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    cam, changer = threading.Thread(target=camera, name="camera"), threading.Thread(target=make_change)
    cam.start()
    assert inside.wait(60)
    changer.start()
    time.sleep(0.5)
    assert not changed.is_set()  # it waits for the call in progress
    go_on.set()
    cam.join(60)
    changer.join(60)
    assert not errors, errors
    assert changed.is_set()
    return results[0]


def test_a_fit_waits_for_the_calls_in_progress_and_holds_new_ones(monkeypatch):
    """A re-fit on one thread while a camera thread predicted on the same Detector: the fit set the
    context to None in the middle of the camera's call (an AttributeError there), or put in a new
    context whose statistics standardised the old one's features (a score neither Detector gives)."""
    import threading
    import time

    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32")
    normal, calib = _u8(_surfaces(12, seed=1)), _u8(_surfaces(6, seed=2))
    det.fit_context(normal, calib)
    frame = calib[:1]
    with torch.no_grad():
        before = det(frame)[1]
    during = _changed_during_a_call(monkeypatch, det, frame, det.context, "features",
                                    lambda: det.fit_normalization(normal))  # (its context then set aside)
    assert det.context is None
    torch.testing.assert_close(during, before, rtol=0, atol=0)  # the old Detector's score, whole
    # a call made while a fit runs waits for it: it gives the new Detector's score
    waits = threading.Event()
    real = det._fit_context

    def slow(*args, **kwargs):
        waits.set()
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(det, "_fit_context", slow)
    fit = threading.Thread(target=lambda: det.fit_context(normal, calib))
    fit.start()
    assert waits.wait(60)
    with torch.no_grad():
        during = det(frame)[1]
    fit.join(60)
    with torch.no_grad():
        after = det(frame)[1]
    assert det.context is not None
    torch.testing.assert_close(during, after, rtol=0, atol=0)


def test_a_save_waits_for_a_fit_in_progress(tmp_path, monkeypatch):
    """A save in the middle of fit_normalization wrote the new normalisation beside the thresholds
    the fit was about to set aside: loaded, the file judged by thresholds of other maps."""
    import threading
    import time

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32")
    det.calibration = {"image_threshold": 0.5, "n_images": 9}
    normal = _u8(_surfaces(4, seed=1))
    inside, go_on = threading.Event(), threading.Event()
    raw = det.raw_maps

    def held(*args, **kwargs):
        inside.set()
        assert go_on.wait(60)
        return raw(*args, **kwargs)

    monkeypatch.setattr(det, "raw_maps", held)
    fit = threading.Thread(target=lambda: det.fit_normalization(normal))
    fit.start()
    assert inside.wait(60)
    saved = threading.Thread(target=lambda: det.save(tmp_path / "det.pt"))
    saved.start()
    time.sleep(0.5)
    assert not (tmp_path / "det.pt").exists()  # it waits for the fit
    go_on.set()
    fit.join(60)
    saved.join(60)
    stored = torch.load(tmp_path / "det.pt", weights_only=True)
    assert "image_threshold" not in stored["calibration"] and stored["calibration"].get("inapplicable")


@pytest.mark.parametrize("change", ["map_kind", "precision", "load_state_dict", "to"])
def test_a_change_of_settings_or_weights_waits_for_the_calls_in_progress(change, monkeypatch):
    """map_kind or precision set, other weights loaded or a move, on one thread while a camera
    thread's call ran on the same Detector: the call computed part of its maps with the old
    settings or weights and the rest with the new. It now waits for the call, as a fit does."""
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32", fuse=False)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in det.state_dict().items()}
    frame = _u8(_surfaces(1, seed=2))
    with torch.no_grad():
        before = det(frame)[1]
    change = {"map_kind": lambda: setattr(det, "map_kind", "residual"),
              "precision": lambda: setattr(det, "precision", "bfloat16"),
              "load_state_dict": lambda: det.load_state_dict(other),
              "to": lambda: det.to("cpu")}[change]
    during = _changed_during_a_call(monkeypatch, det, frame, det, "_patch_maps", change)
    torch.testing.assert_close(during, before, rtol=0, atol=0)  # the Detector as it was, whole


@pytest.mark.parametrize("how", ["copy", "deepcopy"])
def test_a_copy_waits_for_a_fit_in_progress(how, monkeypatch):
    """A copy made in the middle of fit_normalization (the new normalisation in, the thresholds not
    yet set aside) judged the new maps by thresholds set on the old."""
    import copy
    import threading
    import time

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32")
    det.calibration = {"image_threshold": 0.5, "n_images": 9}
    normal = _u8(_surfaces(4, seed=1))
    inside, go_on = threading.Event(), threading.Event()
    stash = det._stash_trunk

    def held():  # after the normalisation is set, before the thresholds go
        inside.set()
        assert go_on.wait(60)
        return stash()

    monkeypatch.setattr(det, "_stash_trunk", held)
    fit = threading.Thread(target=lambda: det.fit_normalization(normal))
    fit.start()
    assert inside.wait(60)
    copies = []
    made = threading.Thread(target=lambda: copies.append(getattr(copy, how)(det)))
    made.start()
    time.sleep(0.5)
    assert not copies  # it waits for the fit
    go_on.set()
    fit.join(60)
    made.join(60)
    twin = copies[0]
    torch.testing.assert_close(twin.norm_std, det.norm_std, rtol=0, atol=0)
    assert "image_threshold" not in twin.calibration and twin.calibration.get("inapplicable")
    # what the Detector shares with other objects deep-copied with it stays shared, as in any deep copy
    held = copy.deepcopy([det.calibration, det])
    assert held[0] is held[1].calibration and held[1] is not det and held[0] is not det.calibration


def test_fit_perceptual_and_fit_context_leave_out_blank_frames_or_say_they_keep_them(monkeypatch):
    """The README says blank frames are left out of what the map statistics and the context are
    fitted on (one black frame made the per-position spread 30 times wider): fit_normalization
    left them out, fit_perceptual and fit_context took them without a word. Where too few others
    are left, a fit keeps them, and now says so."""
    import warnings

    import defect_fast.context as context
    from defect_fast.data.io import BlankFramesWarning

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, precision="float32")
    normal, calib = _u8(_surfaces(12, seed=1)), _u8(_surfaces(4, seed=2))
    black, white = torch.zeros(1, 3, 128, 128, dtype=torch.uint8), torch.full((1, 3, 128, 128), 255, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlankFramesWarning)
        plain = det.fit_perceptual(normal, trunk=_trunk())
    stats = {k: v.clone() for k, v in det.image_map.state_dict().items()}
    with pytest.warns(BlankFramesWarning, match=r"fit_perceptual: 2 blank frame\(s\).*left out.*\(image 0, image 13\)"):
        n = det.fit_perceptual(torch.cat([black, normal, white]), trunk=_trunk())
    assert n == plain
    for k, v in det.image_map.state_dict().items():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)
    with pytest.warns(BlankFramesWarning, match=r"fit_perceptual: 2 of the 3 images are blank frames.*kept as fewer "
                                                r"than 2 others are left"):
        det.fit_perceptual(torch.cat([black, normal[:1], white]), trunk=_trunk())
    det.fit_perceptual(normal, trunk=_trunk())
    with pytest.warns(BlankFramesWarning) as said:
        n = det.fit_context(torch.cat([normal, black]), torch.cat([white, calib]))
    assert n == 12
    assert [str(w.message).split(" (")[-1] for w in said] == ["normal image 12)", "calibration image 0)"]
    with pytest.warns(BlankFramesWarning, match=r"fit_context: 1 of the 10 images are blank frames.*kept as fewer than "
                                                r"10 others are left"):
        assert det.fit_context(torch.cat([normal[:9], black]), calib) == 10
