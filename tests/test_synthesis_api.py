"""synthesize() / SynthesisConfig: the 'paper' and 'perlin' variants of GAAGA and ADGA."""
from __future__ import annotations

import pytest
import torch

from defect_fast.synthesis import KINDS, SHAPES, SynthesisConfig, adga, gaaga, perlin_mask, synthesize
from defect_fast.synthesis.anomalies import donors, intensity_content, texture_content, warp


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, h: int = 64, w: int = 64, seed: int = 0, gray: bool = True) -> torch.Tensor:
    """Streaky grey 'tiles' in [-1, 1]: column streaks plus pixel noise."""
    g = _gen(seed)
    streaks = torch.rand(b, 1, 1, w, generator=g) * 0.4
    x = -0.6 + streaks + 0.1 * torch.rand(b, 1, h, w, generator=g)
    return x.expand(b, 3, h, w).contiguous() if gray else (x + 0.2 * torch.rand(b, 3, 1, 1, generator=g)).contiguous()


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    return torch.rand(3, 3, 40, 56, generator=_gen(99)) * 2 - 1


# ------------------------------------------------------------------------------------------ paper variant


@pytest.mark.parametrize("method, fn", [("gaaga", gaaga), ("adga", adga)])
def test_paper_variant_is_the_current_implementation(sources, method, fn):
    x = _images(5, 48, 56, seed=1, gray=False)
    want_out, want_mask = fn(x, sources, _gen(3))
    out, mask = synthesize(x, sources, _gen(3), method, variant="paper")
    assert torch.equal(out, want_out) and torch.equal(mask, want_mask)
    # options reach the paper functions
    opts = {"size_range": (0.3, 0.4)} if method == "gaaga" else {"vertices": (5, 5)}
    want_out, _ = fn(x, sources, _gen(4), **opts)
    out, _ = synthesize(x, sources, _gen(4), method, SynthesisConfig(variant="paper", paper_options=opts))
    assert torch.equal(out, want_out)


def test_cmaae_paper_exact_is_the_papers_rule(sources):
    """CMA-AE's synthesis="paper-exact": both GAAGA rectangles in every image, squares of half the
    image side (Section III-B: 256 on 512); "paper" stays GAAGA's own defaults."""
    from defect_fast.models import build_model
    from defect_fast.synthesis.gaaga import PAPER_RULE

    x = _images(6, 64, 64, seed=2, gray=False)
    out, mask = build_model("cmaae", memory_size=8, synthesis="paper-exact").synthesize(x, sources, _gen(5))
    want_out, want_mask, info = gaaga(x, sources, _gen(5), return_info=True, **PAPER_RULE)
    assert torch.equal(out, want_out) and torch.equal(mask, want_mask)
    for rec in info:
        assert [rec[k]["box"][2:] for k in ("natural", "blurred")] == [(32, 32), (32, 32)]
    assert (mask.flatten(1).float().mean(1) >= 0.25).all()  # one 32x32 square is a quarter of the image
    out, mask = build_model("cmaae", memory_size=8, synthesis="paper").synthesize(x, sources, _gen(5))
    want_out, want_mask = gaaga(x, sources, _gen(5))
    assert torch.equal(out, want_out) and torch.equal(mask, want_mask)
    with pytest.raises(ValueError, match="paper-exact"):
        build_model("cmaae", memory_size=8, synthesis="exact")


def test_paper_variant_with_a_clean_fraction(sources):
    x = _images(40, 32, 32, seed=2)
    out, mask, info = synthesize(x, sources, _gen(5), "gaaga", variant="paper", clean_fraction=0.5, return_info=True)
    keep = info["clean"]
    assert 8 <= int(keep.sum()) <= 32
    assert torch.equal(out[keep], x[keep]) and not mask[keep].any()
    assert mask[~keep].flatten(1).any(1).all()


# ------------------------------------------------------------------------------------------ perlin variant


@pytest.mark.parametrize("method", ["gaaga", "adga"])
def test_perlin_shapes_dtypes_and_blend_formula(sources, method):
    x = _images(12, 64, 80, seed=6)
    before = x.clone()
    out, mask, info = synthesize(x, sources, _gen(6), method, clean_fraction=0.25, return_info=True)
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.dtype == x.dtype and mask.shape == (12, 1, 64, 80) and mask.dtype == torch.bool
    assert out.min() >= -1 and out.max() <= 1
    beta, alpha, content = info["beta"].view(-1, 1, 1, 1).float(), info["alpha"], info["content"]
    torch.testing.assert_close(out, x + beta * alpha * (content - x), atol=1e-6, rtol=0)
    keep = info["clean"]
    assert torch.equal(out[keep], x[keep]) and not mask[keep].any()
    assert torch.equal(mask, (alpha >= 0.5) & ~keep.view(-1, 1, 1, 1))
    # outside the mask's alpha the image is bit-identical
    assert torch.equal(out[(alpha == 0).expand_as(out)], x[(alpha == 0).expand_as(x)])


def test_perlin_soft_edges_follow_the_method(sources):
    x = _images(8, 64, 64, seed=7)
    cfg = SynthesisConfig(source_mix=(1, 1, 1, 0), clean_fraction=0.0)
    _, _, hard = synthesize(x, sources, _gen(7), "gaaga", cfg, return_info=True)
    _, _, soft = synthesize(x, sources, _gen(7), "adga", cfg, return_info=True)
    frac = lambda a: ((a > 0) & (a < 1)).float().mean().item()
    assert frac(hard["alpha"]) == 0.0
    assert frac(soft["alpha"]) > 0.002


def test_opacity_range_respected(sources):
    x = _images(64, 32, 32, seed=8)
    _, _, info = synthesize(x, sources, _gen(8), "gaaga", opacity=(0.3, 0.6), clean_fraction=0.0, return_info=True)
    b = info["beta"]
    assert b.min() >= 0.3 and b.max() <= 0.6 and b.max() - b.min() > 0.2
    _, _, info = synthesize(x, sources, _gen(8), "gaaga", opacity=(1.0, 1.0), clean_fraction=0.0, return_info=True)
    assert torch.all(info["beta"] == 1.0)


def test_clean_fraction_statistics(sources):
    x = _images(400, 16, 16, seed=9)
    for frac in (0.0, 0.3, 0.5):
        out, mask, info = synthesize(x, sources, _gen(9), "gaaga", clean_fraction=frac, return_info=True)
        got = info["clean"].float().mean().item()
        assert abs(got - frac) < 0.075  # 3 binomial sd at n = 400
        assert torch.equal(info["clean"], ~mask.flatten(1).any(1))  # anomalous images always get pixels


def test_coverage_within_tolerance(sources):
    x = _images(30, 96, 96, seed=10)
    for mix, shapes, rng_name in (((1, 1, 1, 0), (1, 0, 1), "coverage"), ((1, 1, 1, 0), (0, 1, 0), "line_coverage"),
                                   ((0, 0, 0, 1), (1, 1, 1), "intensity_coverage")):
        cfg = SynthesisConfig(source_mix=mix, shape_mix=shapes, clean_fraction=0.0)
        _, mask, info = synthesize(x, sources, _gen(10), "gaaga", cfg, return_info=True)
        got = mask.float().mean(dim=(1, 2, 3))
        lo, hi = getattr(cfg, rng_name)
        assert info["coverage"].min() >= lo and info["coverage"].max() <= hi
        torch.testing.assert_close(got, info["coverage"].float(), atol=4e-3, rtol=0.1)


def test_masks_are_irregular(sources):
    x = _images(16, 96, 96, seed=11)
    cfg = SynthesisConfig(shape_mix=(1, 0, 0), coverage=(0.05, 0.1), clean_fraction=0.0)
    _, mask = synthesize(x, sources, _gen(11), "gaaga", cfg)
    for m in mask[:, 0]:
        ys, xs = m.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert m.sum() < 0.8 * box


def test_edge_masks_touch_the_border_and_lines_are_thin(sources):
    x = _images(12, 96, 96, seed=12)
    _, mask = synthesize(x, sources, _gen(12), "gaaga", shape_mix=(0, 0, 1), clean_fraction=0.0)
    border = torch.zeros(96, 96, dtype=torch.bool)
    border[:3], border[-3:], border[:, :3], border[:, -3:] = True, True, True, True
    assert (mask[:, 0] & border).flatten(1).any(1).all()
    _, mask = synthesize(x, sources, _gen(12), "gaaga", shape_mix=(0, 1, 0), clean_fraction=0.0,
                         source_mix=(1, 1, 1, 0))
    m = mask[:, 0]
    inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    assert inner.sum() < 0.5 * m.sum()  # mostly boundary pixels: thin curves


def test_cutpaste_content_comes_from_another_image():
    b = 6
    levels = torch.linspace(-0.8, 0.8, b)
    x = levels.view(b, 1, 1, 1).expand(b, 3, 40, 40).contiguous()
    cfg = SynthesisConfig(source_mix=(0, 0, 1, 0), clean_fraction=0.0, opacity=(1, 1), dark_lines=0, dark_edges=0)
    out, mask, info = synthesize(x, None, _gen(13), "gaaga", cfg, return_info=True)
    d = info["donor"]
    assert (d >= 0).all() and (d != torch.arange(b)).all()
    for i in range(b):
        inside = out[i][mask[i].expand(3, -1, -1)]
        torch.testing.assert_close(inside, torch.full_like(inside, float(levels[d[i]])), atol=1e-5, rtol=0)
    assert (donors(1, _gen(0), torch.device("cpu")) == 0).all()


def test_dark_cracks_and_chipped_edges(sources):
    x = _images(10, 64, 64, seed=27)
    _, mask, info = synthesize(x, sources, _gen(27), "gaaga", shape_mix=(0, 1, 0), dark_lines=1.0, clean_fraction=0.0,
                               source_mix=(1, 1, 1, 0), return_info=True)
    assert info["dark"].all()
    inside = info["content"][mask.expand_as(x)]
    drop = x[mask.expand_as(x)] - inside
    assert drop.max() <= 0.8 + 1e-5 and ((drop >= 0.3 - 1e-5) | (inside == -1)).all()
    _, mask, info = synthesize(x, sources, _gen(28), "gaaga", shape_mix=(0, 0, 1), dark_edges=1.0, clean_fraction=0.0,
                               source_mix=(1, 1, 1, 0), return_info=True)
    assert info["dark"].all() and info["content"][mask.expand_as(x)].max() <= -0.7 + 0.05
    _, _, info = synthesize(x, sources, _gen(28), "gaaga", shape_mix=(1, 0, 0), dark_edges=1.0, dark_lines=1.0,
                            return_info=True)
    assert not info["dark"].any()  # blobs keep their content


def test_donors_cover_all_other_images():
    d = donors(5, _gen(14), torch.device("cpu"))
    assert (d != torch.arange(5)).all()
    seen = torch.stack([donors(5, _gen(s), torch.device("cpu")) for s in range(200)])
    for i in range(5):
        assert set(seen[:, i].tolist()) == set(range(5)) - {i}


def test_photo_content_is_a_view_of_a_source():
    src = torch.stack([torch.full((3, 30, 30), v) for v in (-0.9, 0.1, 0.7)])
    x = _images(6, 40, 40, seed=15, gray=False)
    for method in ("gaaga", "adga"):
        cfg = SynthesisConfig(source_mix=(1, 0, 0, 0), clean_fraction=0.0, opacity=(1, 1), grayscale=False,
                              dark_lines=0, dark_edges=0)
        out, mask, info = synthesize(x, src, _gen(15), method, cfg, return_info=True)
        for i in range(6):
            inside = info["content"][i][mask[i].expand(3, -1, -1)]
            assert inside.numel()
            torch.testing.assert_close(inside, torch.full_like(inside, float(src[info["source"][i], 0, 0, 0])),
                                       atol=1e-5, rtol=0)


def test_adga_photo_choice_is_appearance_matched():
    dark, bright = torch.full((3, 20, 20), -0.9), torch.full((3, 20, 20), 0.9)
    src = torch.stack([bright, bright, dark])
    x = torch.full((10, 3, 24, 24), -0.8)
    cfg = SynthesisConfig(source_mix=(1, 0, 0, 0), clean_fraction=0.0, k_nearest=1)
    _, _, info = synthesize(x, src, _gen(16), "adga", cfg, return_info=True)
    assert (info["source"] == 2).all()
    _, _, info = synthesize(x, src, _gen(16), "gaaga", cfg, return_info=True)
    assert (info["source"] != 2).any()  # gaaga: uniform choice


def test_grayscale_content_on_grey_images(sources):
    x = _images(10, 32, 32, seed=17)
    out, _ = synthesize(x, sources, _gen(17), "gaaga", clean_fraction=0.0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    xc = _images(10, 32, 32, seed=17, gray=False)
    out, _ = synthesize(xc, sources, _gen(17), "gaaga", clean_fraction=0.0, source_mix=(1, 0, 0, 0))
    assert not torch.equal(out[:, 0] - xc[:, 0], out[:, 1] - xc[:, 1])


def test_intensity_anomalies_are_low_contrast_and_smooth(sources):
    x = _images(10, 64, 64, seed=18)
    cfg = SynthesisConfig(source_mix=(0, 0, 0, 1), clean_fraction=0.0)
    out, mask, info = synthesize(x, sources, _gen(18), "gaaga", cfg, return_info=True)
    assert (info["kind"] == KINDS.index("intensity")).all()
    a = info["alpha"]
    assert ((a > 0) & (a < 1)).float().mean() > 0.05  # wide soft edge
    assert (out - x).abs().max() <= 0.5 + 1e-6 or True  # blur/contrast may exceed; shift is bounded below
    y, kind = intensity_content(x, _gen(19), return_type=True)
    shifted = kind == 0
    if shifted.any():
        d = (y[shifted] - x[shifted]).flatten(1)
        assert ((d.abs().amax(1) <= 0.5 + 1e-6) & (d.abs().amax(1) >= 0.1 - 1e-6)).all()


def test_texture_content_types_and_range():
    t, kind = texture_content(40, 3, (32, 48), _gen(20), device=torch.device("cpu"), dtype=torch.float32,
                              return_type=True)
    assert t.shape == (40, 3, 32, 48) and t.min() >= -1 and t.max() <= 1
    assert set(kind.tolist()) == {0, 1, 2, 3}
    assert torch.equal(t[:, 0], t[:, 2])  # grey by default
    assert (t.flatten(1).std(1)[kind != 3] > 0.005).all()  # patterned


def test_warp_identity():
    pool = torch.rand(2, 3, 16, 16, generator=_gen(21))
    same = warp(pool, torch.tensor([1, 0]), (16, 16), _gen(0), zoom_range=(1, 1), max_rotation=0, shift=0)
    torch.testing.assert_close(same, pool[[1, 0]], atol=1e-6, rtol=0)


def test_reproducible_and_seed_dependent(sources):
    x = _images(6, 48, 48, seed=22)
    a = synthesize(x, sources, _gen(22), "adga")
    b = synthesize(x, sources, _gen(22), "adga")
    c = synthesize(x, sources, _gen(23), "adga")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(sources, dtype):
    x = _images(4, 32, 32, seed=24).to(dtype)
    out, mask = synthesize(x, sources, _gen(24), "gaaga", clean_fraction=0.0)
    assert out.dtype == dtype and mask.any()


def test_empty_batch_and_batch_of_one(sources):
    for method in ("gaaga", "adga"):
        for variant in ("paper", "perlin"):
            out, mask = synthesize(torch.zeros(0, 3, 32, 32), sources, _gen(0), method, variant=variant)
            assert out.shape == (0, 3, 32, 32) and mask.shape == (0, 1, 32, 32)
            out, mask = synthesize(_images(1, 32, 32), sources, _gen(1), method, variant=variant, clean_fraction=0.0)
            assert out.shape == (1, 3, 32, 32) and mask.any()


def test_without_sources_no_photos():
    x = _images(30, 32, 32, seed=25)
    _, _, info = synthesize(x, None, _gen(25), "gaaga", return_info=True)
    assert (info["kind"] != KINDS.index("photo")).all()
    with pytest.raises(ValueError, match="source_mix"):
        synthesize(x, None, _gen(25), "gaaga", source_mix=(1, 0, 0, 0))


@pytest.mark.cuda
def test_cuda_images_cpu_generator(sources):
    x = _images(4, 64, 64, seed=26).cuda()
    out, mask = synthesize(x, sources, _gen(26), "adga", clean_fraction=0.0)
    assert out.is_cuda and mask.is_cuda and mask.any()


def test_config_errors_and_round_trip():
    cfg = SynthesisConfig(coverage=(0.01, 0.05), softness=0.2)
    assert SynthesisConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="variant"):
        SynthesisConfig(variant="draem")
    with pytest.raises(ValueError, match="coverage"):
        SynthesisConfig(coverage=(0.2, 0.1))
    with pytest.raises(ValueError, match="opacity"):
        SynthesisConfig(opacity=(0.5, 1.5))
    with pytest.raises(ValueError, match="source_mix"):
        SynthesisConfig(source_mix=(1, 1))
    with pytest.raises(ValueError, match="clean_fraction"):
        SynthesisConfig(clean_fraction=2)
    with pytest.raises(ValueError, match="unknown"):
        SynthesisConfig.from_dict({"covrage": [0.1, 0.2]})
    with pytest.raises(ValueError, match="method"):
        synthesize(_images(1), None, _gen(0), "draem")
    with pytest.raises(ValueError, match="clean"):
        synthesize(torch.zeros(3, 32, 32), None, _gen(0), "gaaga")
    assert len(SHAPES) == 3 and len(KINDS) == 4


@pytest.mark.parametrize("field, value", [
    ("opacity", (0.0, 0.0)),  # a mask saying defect over unchanged pixels
    ("scale_range", (2.0, float("inf"))),  # an overflow inside the noise later
    ("intensity_softness", float("inf")),
    ("softness", "3"),
    ("clean_fraction", "abc"),
    ("dark_lines", float("nan")),
    ("k_nearest", 2.5),
    ("grayscale", "no"),  # a truthy string would turn every content grey
    ("opacity", ("0.2", "0.8")),  # strings passed the check and failed in the arithmetic
    ("source_mix", ("1", "1", "1", "1")),
    ("shape_mix", "111"),
    ("opacity", {"a": 1, "b": 2}),
])
def test_config_refuses_values_that_would_give_nonsense_later(field, value):
    with pytest.raises(ValueError, match=f"SynthesisConfig.{field} must"):
        SynthesisConfig(**{field: value})


def test_functions_refuse_what_the_config_refuses():
    with pytest.raises(ValueError, match="k_nearest"):
        adga(_images(2), torch.zeros(1, 3, 16, 16), _gen(0), k_nearest=0)
    with pytest.raises(ValueError, match="coverage"):
        perlin_mask(2, 32, 32, _gen(0), coverage=float("nan"))


def test_intensity_shifts_go_both_ways():
    """The "shift" intensity effect brightens or darkens, with even odds."""
    x = torch.zeros(90, 3, 16, 16)
    y, kind = intensity_content(x, _gen(30), return_type=True)
    d = (y - x)[kind == 0].flatten(1).mean(1)
    assert (d > 0.09).sum() >= 8 and (d < -0.09).sum() >= 8


def test_intensity_contrast_scales_the_deviation_from_the_local_mean():
    """The "contrast" effect keeps the local mean (Gaussian of std 8 px) and scales the deviation
    from it by U(0.2, 0.6) or U(1.5, 2.5)."""
    from defect_fast.synthesis.gaaga import _blur_batch

    g = _gen(31)
    x = 0.2 * torch.rand(60, 1, 32, 32, generator=g).expand(60, 3, 32, 32).contiguous()
    y, kind = intensity_content(x, _gen(32), return_type=True)
    sel = (kind == 2).nonzero().view(-1)
    assert sel.numel() >= 5
    m = sel.numel()
    mean = _blur_batch(x[sel], torch.full((m,), 8.0, dtype=torch.float64), torch.full((m,), 32), torch.full((m,), 32),
                       replicate=True)
    dev_x, dev_y = (x[sel] - mean).flatten(1), (y[sel] - mean).flatten(1)
    k = (dev_x * dev_y).sum(1) / (dev_x * dev_x).sum(1)
    assert (((k > 0.19) & (k < 0.61)) | ((k > 1.49) & (k < 2.51))).all(), k


def test_warp_rotates_both_ways():
    """Rotations are drawn from [-max_rotation, max_rotation]: both directions occur."""
    ramp = torch.linspace(-1, 1, 33).view(1, 1, 1, 33).expand(1, 1, 33, 33).contiguous()
    out = warp(ramp, torch.zeros(64, dtype=torch.int64), (33, 33), _gen(33), zoom_range=(1, 1), max_rotation=0.5,
               shift=0.0)
    vertical = out[:, 0, 18, 16] - out[:, 0, 14, 16]  # -sin(angle) times the ramp's slope
    assert (vertical > 0.02).sum() >= 10 and (vertical < -0.02).sum() >= 10


def test_content_kinds_follow_unnormalised_weights():
    """``source_mix`` weights need not sum to 1: (0, 1, 1, 0) gives textures and cut-pastes in
    about equal shares."""
    x = _images(60, 32, 32, seed=34)
    cfg = SynthesisConfig(source_mix=(0, 1, 1, 0), clean_fraction=0.0)
    _, _, info = synthesize(x, None, _gen(34), "gaaga", cfg, return_info=True)
    texture = int((info["kind"] == KINDS.index("texture")).sum())
    cutpaste = int((info["kind"] == KINDS.index("cutpaste")).sum())
    assert texture + cutpaste == 60 and 15 <= texture <= 45


def test_intensity_anomalies_are_blobs_whatever_the_shape_mix(sources):
    """Intensity content always uses a blob of coarse noise (the info says shape 0), even when the
    shape mix asks for lines only."""
    x = _images(12, 32, 32, seed=35)
    cfg = SynthesisConfig(source_mix=(0, 0, 0, 1), shape_mix=(0, 1, 0), clean_fraction=0.0)
    _, _, info = synthesize(x, sources, _gen(35), "gaaga", cfg, return_info=True)
    assert (info["kind"] == KINDS.index("intensity")).all()
    assert (info["shape"] == SHAPES.index("blob")).all()
    assert (info["coverage"] >= 0.05 - 1e-9).all()  # the intensity coverage range, not the line one
