"""Perceptual MSFR map: statistics, shapes, locality, storage, and the detector's use of it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defect_fast.detect import Detector
from defect_fast.models import build_model
from defect_fast.perceptual import PerceptualMap, brightness_gain, reference_brightness


def _trunk(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random AlexNet conv1..conv5 weights in torchvision's layout (tests need no download)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    t = {}
    for i, s in shapes.items():
        fan_in = s[1] * s[2] * s[3]
        t[f"features.{i}.weight"] = torch.randn(*s, generator=g) * (2.0 / fan_in) ** 0.5
        t[f"features.{i}.bias"] = torch.zeros(s[0])
    return t


def random_trunk_map(image_size: int, layers: int = 2, prior: float = 0.01, scales=(1,), trunk=None) -> PerceptualMap:
    """A PerceptualMap built as the Detector builds one, on :func:`_trunk` unless given a trunk
    (the one a detector holds already)."""
    return PerceptualMap(image_size, layers, trunk or _trunk(), prior, scales)


def _images(n: int, s: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1


def test_unfitted_map_is_the_residual_energy_and_zero_for_a_perfect_reconstruction():
    pm = PerceptualMap(64, trunk=_trunk())
    x = _images(2)
    m = pm(x, x)
    assert m.shape == (2, 64, 64)
    assert torch.count_nonzero(m) == 0
    assert pm(x, torch.zeros_like(x)).min() >= 0 and pm(x, torch.zeros_like(x)).max() > 0


def test_residual_equal_to_the_stored_mean_maps_to_zero():
    pm = PerceptualMap(64, trunk=_trunk())
    xs = _images(3)
    n = pm.fit([(xs, xs * 0.5)])
    assert n == 3 and float(pm.fitted) == 3
    x, r = xs[:1], xs[:1] * 0.3
    assert pm(x, r).max() > 0
    pm.stats(0)[0].copy_(pm.residual(x, r)[0])
    assert pm(x, r).abs().max() < 1e-4


def test_fitted_map_standardises_each_position_and_channel():
    pm = PerceptualMap(64, layers=1, trunk=_trunk(), prior=0.0)
    xs, rs = _images(40, seed=2), _images(40, seed=3) * 0.2
    pm.fit([(xs[:20], rs[:20]), (xs[20:], rs[20:])])  # batches are summed, not averaged per batch
    e = pm.residual(xs, rs)
    mean, inv_std = pm.stats(0)
    torch.testing.assert_close(mean, e.mean(0), atol=1e-4, rtol=1e-4)
    z = (e - mean) * inv_std
    # unit variance per channel and position (up to the small floor)
    assert 0.9 < float(z.var(0, unbiased=True).mean()) <= 1.0


def test_a_local_change_raises_the_map_locally():
    pm = PerceptualMap(128, trunk=_trunk())
    normal = _images(12, s=128, seed=4) * 0.1
    pm.fit([(normal, normal * 0.9)])
    x = normal[:1].clone()
    x[..., 80:100, 20:40] = 1.0  # a bright square
    m = pm(x, normal[:1] * 0.9)[0]
    inside = m[80:100, 20:40].mean()
    far = m[:40, 80:].mean()
    assert inside > 3 * far


@pytest.mark.parametrize("scales", [(1,), (1, 2)])
def test_state_round_trip_gives_the_same_map(scales):
    pm = PerceptualMap(64, layers=3, trunk=_trunk(), prior=0.05, scales=scales)
    x, r = _images(4, seed=5), _images(4, seed=6)
    pm.fit([(x, r)])
    back = PerceptualMap.from_state(pm.state())
    assert back.scales == scales
    torch.testing.assert_close(back(x, r), pm(x, r))


def test_one_level_files_from_before_the_pyramid_still_load():
    pm = PerceptualMap(64, trunk=_trunk())
    x, r = _images(4, seed=5), _images(4, seed=6)
    pm.fit([(x, r)])
    old = pm.state()
    del old["scales"]
    t = old["tensors"]
    t["mean"], t["inv_std"] = t.pop("mean_0"), t.pop("inv_std_0")
    torch.testing.assert_close(PerceptualMap.from_state(old)(x, r), pm(x, r))


def test_brightness_gain_takes_each_image_to_the_level():
    x = torch.stack([torch.full((3, 8, 8), v) for v in (-0.5, 0.0, 0.6, -1.0)])  # means 0.25, 0.5, 0.8, 0
    g = brightness_gain(x, 0.4)
    assert g.shape == (4, 1, 1, 1)
    levelled = (x + 1) * g - 1
    torch.testing.assert_close(((levelled[:3] + 1) / 2).mean(dim=(1, 2, 3)), torch.full((3,), 0.4))
    assert torch.isfinite(g).all() and float(g[3]) == pytest.approx(0.4 * 255)  # black: mean counted as 1/255
    u8 = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8).expand(2, 3, 2, 2)
    assert reference_brightness(u8) == pytest.approx((0 + 255 + 51 + 102) / 4 / 255)


@pytest.mark.parametrize("scales", [(1,), (1, 2)])
def test_levelled_map_is_that_of_the_image_under_other_light(scales):
    """With a brightness level, an image and its reconstruction both 40 % darker give the map of
    the image itself (both scaled by the input's factor); a reconstruction brighter than its
    input still leaves a residual (it is scaled by the input's factor, not its own)."""
    x, r = (_images(3, seed=5) + 1) * 0.4 - 0.5, (_images(3, seed=6) + 1) * 0.4 - 0.5
    pm = PerceptualMap(64, trunk=_trunk(), scales=scales)
    pm.brightness = 0.45
    pm.fit([(x, r)])
    dim = lambda t: (t + 1) * 0.6 - 1  # noqa: E731
    torch.testing.assert_close(pm(dim(x), dim(r)), pm(x, r), atol=1e-4, rtol=1e-4)
    plain = PerceptualMap(64, trunk=_trunk(), scales=scales)
    plain.fit([(x, r)])
    assert float((plain(dim(x), dim(r)) - plain(x, r)).abs().max()) > 0.1
    assert float(pm(x, (x + 1) * 1.2 - 1).max()) > 0.1 * float(pm(x, r).max())
    back = PerceptualMap.from_state(pm.state())
    assert back.brightness == 0.45
    torch.testing.assert_close(back(x, r), pm(x, r))
    old = pm.state()
    old.pop("brightness")
    assert PerceptualMap.from_state(old).brightness is None  # files from before the option: as read


def test_the_detector_levels_to_its_images_or_to_the_level_given(monkeypatch):
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    images = ((_images(3, seed=2) + 1) * 100).to(torch.uint8)
    det.fit_perceptual(images, level_brightness=True)
    assert det.image_map.brightness == reference_brightness(images)
    det.fit_perceptual(images, level_brightness=0.3)
    assert det.image_map.brightness == 0.3
    det.fit_perceptual(images)
    assert det.image_map.brightness is None
    # the same images as floats in [-1, 1] (which the fits take too): the same level, not 1/255 of it
    det.fit_perceptual(images.float() / 127.5 - 1, level_brightness=True)
    assert det.image_map.brightness == pytest.approx(reference_brightness(images), abs=1e-6)  # float32 rounding
    det.fit_perceptual(images, level_brightness=np.bool_(True))  # numpy's True is True, not the level 1.0
    assert det.image_map.brightness == reference_brightness(images)
    for bad in (1.5, "yes", "0.5", float("nan")):
        with pytest.raises(ValueError, match="level_brightness must be True, False or a level in"):
            det.fit_perceptual(images, level_brightness=bad)
    # all black: a level of 0 made every image black before the trunk (every image the same score)
    with pytest.raises(ValueError, match="mean brightness is 0"):
        det.fit_perceptual(torch.zeros_like(images), level_brightness=True)


def test_a_refit_map_sets_aside_the_thresholds_set_on_the_map_it_replaces(monkeypatch):
    """fit_normalization set the stored thresholds aside; fit_perceptual and fit_context kept them,
    so a loaded run refitted on other images flagged on a scale they were not set on (v7 refitted
    on 30 images: 10 false alarms of 100 good test images at the stored threshold, 0 before)."""
    import defect_fast.perceptual as perceptual
    from defect_fast.calibration import stored_thresholds

    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
    images = ((_images(4, seed=2) + 1) * 100).to(torch.uint8)
    det.calibrate(images)
    assert stored_thresholds(det.calibration)[0] is not None
    det.fit_perceptual(images)
    assert stored_thresholds(det.calibration)[0] is None and "fit_perceptual" in det.calibration["inapplicable"]


def test_pyramid_map_is_the_mean_of_its_levels():
    """Each level is a one-level map of the 2x2-averaged images (same statistics); the levels'
    maps are averaged (a level's map is upsampled once, from its grid to the image: the one-level
    reference goes through its own image size first, hence the tolerance)."""
    x, r = _images(6, s=128, seed=7), _images(6, s=128, seed=8) * 0.5
    both = PerceptualMap(128, trunk=_trunk(), scales=(1, 2))
    assert both.fit([(x, r)]) == 6
    levels = []
    for i, f in enumerate((1, 2)):
        one = PerceptualMap(128 // f, trunk=_trunk())
        one.fit([(F.avg_pool2d(x, f), F.avg_pool2d(r, f))])
        for a, b in zip(one.stats(0), both.stats(i)):
            torch.testing.assert_close(a, b)
        levels.append(F.interpolate(one(F.avg_pool2d(x[:2], f), F.avg_pool2d(r[:2], f))[:, None], size=(128, 128),
                                    mode="bilinear", align_corners=False)[:, 0])
    torch.testing.assert_close(both(x[:2], r[:2]), (levels[0] + levels[1]) / 2, atol=1e-2, rtol=1e-2)


def test_each_level_responds_to_a_region_of_stronger_texture():
    """Stronger texture over a quarter of the image: the full- and the half-resolution level both
    raise the map inside it well above the surface around it."""
    g = torch.Generator().manual_seed(9)
    normal = (torch.rand(16, 1, 128, 128, generator=g) * 0.4 - 0.2).expand(-1, 3, -1, -1).contiguous()
    pm1 = PerceptualMap(128, trunk=_trunk(), scales=(1,))
    pm2 = PerceptualMap(128, trunk=_trunk(), scales=(2,))
    smooth = F.avg_pool2d(normal, 9, 1, 4, count_include_pad=False)
    for pm in (pm1, pm2):
        pm.fit([(normal, smooth)])
    x = normal[:1].clone()
    x[..., 32:96, 32:96] *= 1.8  # stronger texture over a quarter of the image
    r = F.avg_pool2d(x, 9, 1, 4, count_include_pad=False)
    ratios = []
    for pm in (pm1, pm2):
        m = pm(x, r)[0]
        ratios.append(float(m[40:88, 40:88].mean() / m[:, :24].mean()))
    assert ratios[0] > 1.5 and ratios[1] > 1.5


@pytest.mark.parametrize("bad", [dict(layers=0), dict(layers=4), dict(image_size=16), dict(prior=-1.0),
                                 dict(prior=float("nan")), dict(prior=float("inf")), dict(prior="0.01"),
                                 dict(scales=()), dict(scales=(0,)), dict(scales=(1, 1)), dict(scales=(1, 4)),
                                 dict(layers=2.0), dict(scales=2)])
def test_bad_arguments_are_refused(bad):
    kw = dict(image_size=64, layers=2, trunk=_trunk(), prior=0.01) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):  # named (layers=2.0 and scales=2 were TypeErrors deep inside)
        PerceptualMap(**kw)


def test_numpy_integers_are_whole_numbers_and_the_detector_names_scales():
    assert PerceptualMap(64, layers=np.int64(2), trunk=_trunk()).layers == 2
    det = Detector(build_model("cmaae", memory_size=20), image_size=64)
    with pytest.raises(ValueError, match="scales must be a list"):
        det.fit_perceptual(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), scales=2)


def test_fit_needs_two_images_that_differ():
    pm = PerceptualMap(64, trunk=_trunk())
    with pytest.raises(ValueError, match="at least 2"):
        pm.fit([(_images(1), _images(1))])
    # the same image twice: the variance floor alone made every later map about 1e6 times too large
    x, r = _images(1), _images(1, seed=2)
    with pytest.raises(ValueError, match="cannot be fitted on 2 images whose residuals are identical"):
        pm.fit([(x, r), (x, r)])
    assert float(pm.fitted) == 0


def test_detector_uses_the_perceptual_map_on_stitched_reconstructions(monkeypatch):
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    torch.manual_seed(0)
    model = build_model("cmaae", memory_size=20)
    det = Detector(model, image_size=128, stride=32, blend="hann")
    normal = (torch.rand(6, 3, 128, 128) * 255).to(torch.uint8)
    det.fit_normalization(normal)  # of the model's own map: it does not carry over to the map that replaces it
    assert det.normalization()["kind"] == "per-position"
    assert det.fit_perceptual(normal, images_per_batch=4) == 6
    assert det.normalization() == {"kind": "identity"}
    assert det.map_kind == "perceptual"
    maps, scores = det(normal[:2])
    assert maps.shape == (2, 128, 128) and scores.shape == (2,)
    # the map is the perceptual map of the image and its stitched reconstruction, the trunk run
    # in the detector's precision
    x = det._to_model_input(normal[:2])
    torch.testing.assert_close(maps, det.image_map(x, det._stitched_recon(x), **det._trunk_options()))
    # the detector refuses the map when no statistics were fitted
    with pytest.raises(ValueError, match="statistics"):
        Detector(model, image_size=128, map_kind="perceptual")
    # and a map or context fitted at another image size (its statistics are per position; the
    # map was made on the wrong grid, the context failed deep in torch)
    from defect_fast.context import ImageContext

    with pytest.raises(ValueError, match="perceptual is built for 128-px images, this Detector's image_size is 64"):
        Detector(model, image_size=64, map_kind="perceptual", perceptual=det.image_map)
    with pytest.raises(ValueError, match="context is built for 256-px images, this Detector's image_size is 128"):
        Detector(model, image_size=128, context=ImageContext(256, trunk=_trunk()))


def test_trunk_in_low_precision_hands_on_float32_features_close_to_float32_ones():
    pm = PerceptualMap(64, trunk=_trunk())
    x, r = _images(2), _images(2, seed=2)
    f32 = pm.features(x)
    low = pm.features(x, torch.bfloat16, channels_last=True)
    for a, b in zip(f32, low):
        assert b.dtype == torch.float32 and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02 * float(a.abs().max()))
    m32, m16 = pm(x, r), pm(x, r, dtype=torch.bfloat16, channels_last=True)
    assert m16.dtype == torch.float32
    torch.testing.assert_close(m16, m32, rtol=0.05, atol=0.02 * float(m32.max()))
    # the low-precision weights are copied once per layer, and follow a change of the weights
    cache = pm.__dict__["_cast_weights"]
    kept = dict(cache)
    assert len(kept) == 2
    pm.features(x, torch.bfloat16, channels_last=True)
    assert cache.keys() == kept.keys() and all(cache[k][0] is kept[k][0] for k in kept)
    with torch.no_grad():
        pm.convs[0].weight.mul_(2)  # a power of two: the new outputs are exactly twice the old
    assert torch.equal(pm.features(x, torch.bfloat16, channels_last=True)[0], 2 * low[0])
    assert len(cache) == 2


def test_trunk_in_low_precision_runs_on_a_map_built_in_inference_mode():
    with torch.inference_mode():  # its weights are inference tensors, which keep no version counter
        pm = PerceptualMap(64, trunk=_trunk())
        assert pm.features(_images(1), torch.bfloat16)[1].dtype == torch.float32


def test_channels_last_residual_is_standardised_with_statistics_in_its_layout():
    """A channels-last trunk's residual meets statistics laid out like it (kept, not permuted per
    call); the standardised values are those of the default layout bit for bit, and follow every
    change of the statistics."""
    pm = PerceptualMap(64, trunk=_trunk(), scales=(1, 2))
    xs, rs = _images(4), _images(4, seed=2) * 0.3
    pm.fit([(xs, rs)])
    x, r = xs[:2], rs[:2]

    def by_hand(level):
        mean, inv_std = pm.stats(level)
        return (pm.residual(x, r, level, channels_last=True) - mean) * inv_std

    for level in (0, 1):
        z = pm.standardised(x, r, level, channels_last=True)
        assert z.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(z, by_hand(level))
        # a default-layout trunk: the same up to the convolutions' summation order
        torch.testing.assert_close(pm.standardised(x, r, level), z, rtol=1e-4, atol=1e-4)
    kept = pm.__dict__["_stats_channels_last"]
    assert len(kept) == 2
    first = {k: v[0] for k, v in kept.items()}
    pm.standardised(x, r, 0, channels_last=True)
    assert all(kept[k][0] is first[k] for k in first)  # not permuted again
    with torch.no_grad():
        pm.stats(0)[1].mul_(2)  # in place
    assert torch.equal(pm.standardised(x, r, 0, channels_last=True), by_hand(0))
    pm.fit([(xs * 0.5, rs)])
    assert torch.equal(pm.standardised(x, r, 1, channels_last=True), by_hand(1))
    other = PerceptualMap(64, trunk=_trunk(), scales=(1, 2))
    other.fit([(xs, rs * 2)])
    pm.load_state_dict(other.state_dict())
    assert torch.equal(pm.standardised(x, r, 0, channels_last=True), by_hand(0))


@pytest.mark.parametrize("dtype,channels_last", [(None, False), (None, True), (torch.bfloat16, True)])
def test_the_map_layer_by_layer_is_the_concatenated_one_bit_for_bit(dtype, channels_last):
    """forward standardises and squares each layer's residual where it lies: the same values as
    level_map(standardised(...)) on the concatenated residual, in inference mode (in place) and
    with a gradient recorded (out of place, and the gradient flows)."""
    pm = PerceptualMap(64, trunk=_trunk(), scales=(1, 2))
    xs, rs = _images(4), _images(4, seed=2) * 0.3
    pm.fit([(xs, rs)], dtype=dtype, channels_last=channels_last)
    x, r = xs[:3], rs[:3]
    opts = {"dtype": dtype, "channels_last": channels_last}

    def concatenated(recon):
        levels = [pm.level_map(pm.standardised(x, recon, i, **opts), 64) for i in range(2)]
        return (levels[0] + levels[1])[:, 0] / 2

    with torch.inference_mode():
        assert torch.equal(pm(x, r, **opts), concatenated(r))
        feats = pm.features(x, **opts)
        assert torch.equal(pm(x, r, x_features=feats, **opts), concatenated(r))
    # after calls in inference mode (whose kept copies are inference tensors), a gradient still flows
    recon = r.clone().requires_grad_(True)
    m = pm(x, recon, **opts)
    m.sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(m, concatenated(r))


@pytest.mark.parametrize("dtype,channels_last", [(None, False), (torch.bfloat16, True)])
def test_the_statistics_layer_by_layer_are_those_of_the_concatenated_residual(dtype, channels_last):
    pm = PerceptualMap(64, trunk=_trunk(), scales=(1, 2))
    xs, rs = _images(6), _images(6, seed=2) * 0.3
    for level in (0, 1):
        e = pm.residual(xs, rs, level, dtype=dtype, channels_last=channels_last).double()
        ones, squares = pm._batch_sums(xs, rs, level, dtype, channels_last)
        assert ones.dtype == squares.dtype == torch.float64
        assert torch.equal(ones, e.sum(0)) and torch.equal(squares, (e * e).sum(0))
    pm.fit([(xs[:3], rs[:3]), (xs[3:], rs[3:])], dtype=dtype, channels_last=channels_last)
    e = pm.residual(xs, rs, 0, dtype=dtype, channels_last=channels_last).double()
    mean = e.mean(0)
    torch.testing.assert_close(pm.stats(0)[0], mean.float(), rtol=1e-6, atol=1e-7)


def test_channels_last_statistics_follow_a_refit_of_a_map_built_in_inference_mode():
    with torch.inference_mode():  # its statistics are inference tensors: no version counter to compare
        pm = PerceptualMap(64, trunk=_trunk())
        xs, rs = _images(4), _images(4, seed=2) * 0.3
        pm.fit([(xs, rs)])
        before = pm.standardised(xs[:1], rs[:1], channels_last=True)
        pm.fit([(xs, rs * 3)])
        after = pm.standardised(xs[:1], rs[:1], channels_last=True)
        mean, inv_std = pm.stats(0)
        assert not torch.equal(before, after)
        assert torch.equal(after, (pm.residual(xs[:1], rs[:1], channels_last=True) - mean) * inv_std)


def test_channels_last_trunk_keeps_its_weights_in_that_layout():
    """A channels-last trunk convolves with channels-last weight copies, made once (float32 too),
    and gives the features of the weights as they are."""
    pm = PerceptualMap(64, trunk=_trunk())
    x = _images(2)
    for dtype in (None, torch.bfloat16):
        first = pm.features(x, dtype, channels_last=True)
        kept = {k: v for k, v in pm.__dict__["_cast_weights"].items() if k[1] == (dtype or torch.float32)}
        assert len(kept) == 2
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w, _b in kept.values())
        again = pm.features(x, dtype, channels_last=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert all(pm.__dict__["_cast_weights"][k][0] is v[0] for k, v in kept.items())
    # the default layout runs on the module's own float32 weights, no copy
    n = len(pm.__dict__["_cast_weights"])
    f32 = pm.features(x)
    assert len(pm.__dict__["_cast_weights"]) == n
    torch.testing.assert_close(pm.features(x, channels_last=True)[1], f32[1], rtol=1e-4, atol=1e-5)


def _delta_trunk() -> dict[str, torch.Tensor]:
    """AlexNet conv1..conv5 whose every output channel copies one input channel at the kernel's
    centre: a one-pixel spot lights the cells whose receptive field is centred on it."""
    from defect_fast.perceptual import _ALEXNET

    t = {}
    for idx, cin, cout, k, _s, _p in _ALEXNET:
        w = torch.zeros(cout, cin, k, k)
        w[torch.arange(cout), torch.arange(cout) % cin, k // 2, k // 2] = 1.0
        t[f"features.{idx}.weight"], t[f"features.{idx}.bias"] = w, torch.zeros(cout)
    return t


def _centroid(v: torch.Tensor) -> float:
    v = v.double()
    return float((v * torch.arange(v.numel(), dtype=torch.float64)).sum() / v.sum())


def test_alexnet_centres_are_the_cells_a_spot_lights():
    """alexnet_centres(layer, pooled) against the layers themselves: a spot on pixel p lights the
    cell i with a * i + b == p, of every layer, before and after the max-pools."""
    from defect_fast.perceptual import _ALEXNET, alexnet_centres

    t = _delta_trunk()
    assert [alexnet_centres(n) for n in (1, 2, 3, 4, 5)] == [(4, 3), (8, 7), (16, 15), (16, 15), (16, 15)]
    for p in (15, 47, 79, 111):  # a cell centre of every layer at 128 px
        h = torch.zeros(1, 3, 128, 128)
        h[..., p, p] = 1.0
        for n, (idx, *_rest, s, pad) in enumerate(_ALEXNET, 1):
            h = F.conv2d(h, t[f"features.{idx}.weight"], t[f"features.{idx}.bias"], s, pad)
            for pooled in ((False, True) if n <= 2 else (False,)):
                g = F.max_pool2d(h, 3, 2) if pooled else h
                a, b = alexnet_centres(n, pooled)
                lit = g[0, 0].sum(0).nonzero().flatten().tolist()
                assert lit == [(p - b) / a], (n, pooled, p)
            if n <= 2:
                h = F.max_pool2d(h, 3, 2)


@pytest.mark.parametrize("scales", [(1,), (2,)])
def test_the_map_of_a_spot_is_centred_on_it(scales):
    """Each feature cell is placed on its receptive field's centre: the map of a one-pixel spot is
    centred on it across the image. The resize by size alone ("cells", files from before) drew
    the grid as if it tiled the image, up to 3.8 px off near the edges at 128 px."""
    pm = PerceptualMap(128, layers=2, trunk=_delta_trunk(), scales=scales, placement="centres")
    f = scales[0]
    for q in ((15, 63, 111) if f == 1 else (15, 31, 47)):  # inner conv2 cell centres of the level's image
        x, bg = torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 128, 128)
        x[..., f * q:f * q + f, f * q:f * q + f] = 1.0  # one pixel of the level's image
        m = pm(x, bg)[0]
        centre, p = f * q + (f - 1) / 2, f * q
        assert abs(_centroid(m[p]) - centre) < 0.05 and abs(_centroid(m[:, p]) - centre) < 0.05, (q, scales)
    if scales == (1,):
        pm.placement = "cells"
        x[...] = 0
        x[..., 111, 111] = 1.0
        assert _centroid(pm(x, bg)[0, 111]) - 111 > 3


def test_placement_is_a_bilinear_resize_where_the_cells_tile_the_image():
    """place_features with the geometry a resize assumes (cells of extent / n pixels, centred)
    is that resize, in either memory format; a one-cell delta lands on its centre."""
    from defect_fast.perceptual import place_features, place_profile

    g = torch.Generator().manual_seed(0)
    for n, cells, extent in ((16, 64, 64), (31, 64, 256), (63, 64, 256)):
        f = torch.randn(2, 5, n, n, generator=g)
        step = extent / n
        ref = F.interpolate(f, size=(cells, cells), mode="bilinear", align_corners=False)
        for x in (f, f.contiguous(memory_format=torch.channels_last)):
            out = place_features(x, step, step / 2 - 0.5, cells, extent)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert out.is_contiguous(memory_format=torch.channels_last) == (x is not f)
        v = torch.randn(3, n, generator=g)
        torch.testing.assert_close(place_profile(v, step, step / 2 - 0.5, cells, extent),
                                   F.interpolate(v[:, None], size=cells, mode="linear", align_corners=False)[:, 0])
    delta = torch.zeros(1, 1, 31, 31)
    delta[..., 12, 12] = 1.0
    out = place_features(delta, 8, 7, 256, 256)[0, 0]
    assert abs(_centroid(out[103]) - 103) < 1e-6  # 8 * 12 + 7
    # the weights first made under inference mode still serve a call that records gradients
    f = torch.randn(1, 2, 9, 9, dtype=torch.float64, generator=g)
    with torch.inference_mode():
        place_features(f, 8, 7, 80, 80)
    assert torch.autograd.gradcheck(lambda t: place_features(t, 8, 7, 80, 80), (f.requires_grad_(True),))


def test_files_from_before_the_placement_keep_the_resize_they_were_fitted_with():
    assert PerceptualMap(64, trunk=_trunk()).placement == "cells"  # the default (PLACEMENTS)
    pm = PerceptualMap(64, trunk=_trunk(), placement="centres")
    x, r = _images(4, seed=5), _images(4, seed=6)
    pm.fit([(x, r)])
    assert PerceptualMap.from_state(pm.state()).placement == "centres"
    old = pm.state()
    old.pop("placement")
    back = PerceptualMap.from_state(old)
    assert back.placement == "cells"
    assert not torch.allclose(back(x, r), pm(x, r))
    pm.placement = "cells"
    torch.testing.assert_close(back(x, r), pm(x, r))
    old["placement"] = "nearest"
    with pytest.raises(ValueError, match="placement must be one of cells, centres"):
        PerceptualMap.from_state(old)


def test_a_callers_autocast_does_not_change_what_the_fits_measure(monkeypatch):
    """The Detector computes its maps in its own precision whatever autocast the caller has open;
    its fits must measure those maps, not the caller's bf16 ones (the statistics moved by 2.7)."""
    import defect_fast.perceptual as perceptual

    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    images = ((_images(4, seed=2) + 1) * 100).to(torch.uint8)

    def fitted(autocast: bool):
        torch.manual_seed(0)
        det = Detector(build_model("cmaae", memory_size=20), image_size=64, precision="float32")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            det.fit_perceptual(images)
        return det.image_map.state()

    def tensors(state, where=""):
        items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
        for key, value in items:
            if isinstance(value, torch.Tensor):
                yield f"{where}{key}", value
            else:
                yield from tensors(value, f"{where}{key}.")

    plain, inside = dict(tensors(fitted(False))), dict(tensors(fitted(True)))
    assert plain and plain.keys() == inside.keys()
    for key, value in plain.items():
        assert torch.equal(value, inside[key]), key


def test_an_image_s_gain_does_not_depend_on_the_images_levelled_with_it():
    """A batch's mean summed in another order: its last-bit difference, scaled into the trunk's
    bf16 input, flipped roundings there and moved a --preset photos score by 0.012 with the images
    called with it. Each image's gain is now its own."""
    x = torch.rand(16, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    alone = torch.cat([brightness_gain(x[i:i + 1], 0.4) for i in range(16)])
    assert torch.equal(brightness_gain(x, 0.4), alone)
