"""Anomaly synthesis: GAAGA (CMA-AE), ADGA (AW-SSIM two-stage AE) and their source photos."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from defect_fast.synthesis import (adga, appearance, gaaga, gaussian_blur, load_sources, polygon_mask,
                                   select_sources)
from defect_fast.synthesis.gaaga import _sample


def _noise(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Pixel noise in [-1, 1]: any paste, blur or resize changes almost every pixel it touches."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    return _noise(2, 40, 56, seed=99)


# ---------------------------------------------------------------------------------------------- sources


def test_builtin_sources_load_offline():
    src = load_sources(size=64)
    assert src.shape == (2, 3, 64, 64) and src.dtype == torch.float32
    assert src.min() >= -1 and src.max() <= 1
    assert src.std() > 0.2  # real photos, not a blank
    assert (src[0] - src[1]).abs().mean() > 0.1  # two different photos


def test_source_folder(tmp_path):
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (20, 40), 0).save(tmp_path / "black.bmp")
    (tmp_path / "sub").mkdir()
    Image.new("RGBA", (25, 25), (255, 255, 255, 10)).save(tmp_path / "sub" / "white.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    src = load_sources(tmp_path, size=16, include_builtin=False)
    assert src.shape == (3, 3, 16, 16)
    # sorted by path: black.bmp, red.png, sub/white.PNG
    torch.testing.assert_close(src[0], torch.full((3, 16, 16), -1.0))
    torch.testing.assert_close(src[1], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))
    torch.testing.assert_close(src[2], torch.ones(3, 16, 16))
    both = load_sources(tmp_path, size=16)
    assert both.shape[0] == 5
    torch.testing.assert_close(both[2:], src)
    assert load_sources(tmp_path, size=16, include_builtin=False, max_images=2).shape[0] == 2


def test_source_photos_are_decoded_as_the_package_reads_images(tmp_path):
    """16-bit and float photos are scaled to 8 bits (they were clipped: a 16-bit ramp came out
    almost all white, a float one all black), as read_image does."""
    import numpy as np

    from defect_fast.data.io import read_image

    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "b_float.tif")
    src = load_sources(tmp_path, size=64, include_builtin=False)
    for i, name in enumerate(("a16.png", "b_float.tif")):
        want = read_image(tmp_path / name, None).float() / 127.5 - 1
        torch.testing.assert_close(src[i], want, atol=2 / 127.5, rtol=0)  # (its own resize: one grey level)


def test_source_folder_errors_name_the_files(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        load_sources(tmp_path, size=8, include_builtin=False)
    assert "broken.png" in str(err.value) and "empty.jpg" in str(err.value) and "good.png" not in str(err.value)
    # an oversized image (PIL's bomb limit) is one more named file, not an internal error
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                                        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError) as err:
        load_sources(tmp_path, size=8, include_builtin=False)
    assert "3 anomaly source file(s)" in str(err.value) and "huge.png" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_sources(tmp_path / "missing_dir")
    (tmp_path / "no_images").mkdir()
    with pytest.raises(ValueError, match="no_images"):
        load_sources(tmp_path / "no_images")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("mode, pad", [("replicate", "replicate"), ("zeros", "constant")])
def test_gaussian_blur_matches_convolution(mode, pad):
    x = _noise(2, 13, 17, seed=30)
    for sigma in (0.6, 1.7, 3.0):
        r = math.ceil(3 * sigma)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = (k / k.sum()).float()
        ref = F.conv2d(F.pad(x.view(6, 1, 13, 17), (r, r, r, r), mode=pad), (k[:, None] * k[None, :])[None, None])
        torch.testing.assert_close(gaussian_blur(x, sigma, padding_mode=mode), ref.view(2, 3, 13, 17),
                                   atol=1e-6, rtol=0)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_batched_crop_resize_matches_interpolate():
    pool = _noise(3, 40, 50, seed=31)
    idx = torch.tensor([2, 0, 2, 1])
    cy, cx = torch.tensor([0, 5, 11, 39]), torch.tensor([3, 0, 20, 49])
    ch, cw = torch.tensor([40, 9, 20, 1]), torch.tensor([30, 17, 30, 1])
    ph, pw = torch.tensor([13, 18, 20, 3]), torch.tensor([31, 8, 30, 2])  # down, up, same, a single pixel
    got = _sample(pool, idx, cy, cx, ch, cw, ph, pw, (20, 31))
    assert got.shape == (4, 3, 20, 31)
    for n in range(4):
        crop = pool[idx[n], :, cy[n]:cy[n] + ch[n], cx[n]:cx[n] + cw[n]].unsqueeze(0)
        want = F.interpolate(crop, size=(int(ph[n]), int(pw[n])), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got[n, :, :ph[n], :pw[n]], want, atol=2e-5, rtol=0)  # fp32 vs fp64 coordinates
    assert torch.equal(got[2, :, :20, :30], pool[2, :, 11:31, 20:50])  # same size: an exact copy
    same = _sample(pool, idx, cy, cx, ph.clamp(max=ch), pw.clamp(max=cw), ph.clamp(max=ch), pw.clamp(max=cw), (20, 31))
    assert torch.equal(same[1, :, :9, :8], pool[0, :, 5:14, 0:8])


# ---------------------------------------------------------------------------------------------- GAAGA


def test_gaaga_shapes_range_and_mask(sources):
    images = _noise(6, 48, 72)
    before = images.clone()
    out, mask = gaaga(images, sources, _gen(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert mask.shape == (6, 1, 48, 72) and mask.dtype == torch.bool
    assert torch.equal(images, before)  # input untouched
    assert out.min() >= -1 and out.max() <= 1
    changed = (out != images).any(dim=1, keepdim=True)
    assert not (changed & ~mask).any()  # outside the mask: bit-identical
    assert changed[mask].float().mean() > 0.95  # inside: nearly all replaced
    assert mask.flatten(1).any(dim=1).all()  # every image is anomalous


def test_gaaga_mask_is_union_of_pasted_boxes(sources):
    images = _noise(5, 40, 40, seed=1)
    out, mask, info = gaaga(images, sources, _gen(1), natural_prob=1.0, blurred_prob=1.0, return_info=True)
    expect = torch.zeros_like(mask)
    for i, rec in enumerate(info):
        assert rec["natural"] is not None and rec["blurred"] is not None  # the paper's rule: both
        for kind in ("natural", "blurred"):
            y0, x0, h, w = rec[kind]["box"]
            expect[i, 0, y0:y0 + h, x0:x0 + w] = True
    assert torch.equal(mask, expect)


def test_gaaga_natural_patch_is_a_crop_of_a_source(sources):
    images = _noise(4, 64, 64, seed=2)
    out, _, info = gaaga(images, sources, _gen(2), natural_prob=1.0, blurred_prob=0.0, return_info=True)
    for i, rec in enumerate(info):
        assert rec["blurred"] is None
        y0, x0, h, w = rec["natural"]["box"]
        cy, cx, ch, cw = rec["natural"]["crop"]
        assert (ch, cw) == (h, w)  # the photos are big enough: pasted at native resolution
        assert torch.equal(out[i, :, y0:y0 + h, x0:x0 + w], sources[rec["natural"]["source"], :, cy:cy + h, cx:cx + w])


def test_gaaga_blurred_patch_is_blurred_resized_crop(sources):
    images = _noise(4, 64, 64, seed=3)
    out, _, info = gaaga(images, sources, _gen(3), natural_prob=0.0, blurred_prob=1.0,
                         resize_range=(1.5, 2.0), blur_sigma_range=(1.0, 1.5), return_info=True)
    for i, rec in enumerate(info):
        assert rec["natural"] is None
        y0, x0, h, w = rec["blurred"]["box"]
        cy, cx, ch, cw = rec["blurred"]["crop"]
        assert ch > h and cw > w  # crop larger than the patch: content shrunk by the resize
        crop = images[rec["blurred"]["donor"], :, cy:cy + ch, cx:cx + cw].unsqueeze(0)
        want = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        want = gaussian_blur(want, rec["blurred"]["sigma"]).squeeze(0)
        pasted = out[i, :, y0:y0 + h, x0:x0 + w]
        torch.testing.assert_close(pasted, want.clamp(-1, 1), atol=1e-5, rtol=0)
        # blurred noise is far smoother than the noise it replaced
        tv = lambda t: (t[:, 1:] - t[:, :-1]).abs().mean()  # noqa: E731
        assert tv(pasted) < 0.3 * tv(images[i, :, y0:y0 + h, x0:x0 + w])


def test_a_crop_larger_than_its_source_is_shrunk_keeping_its_aspect(sources):
    """Each side was clamped to the source before the fit, so a crop clamped on one side only
    was resized to the patch with two different scales (a 45 x 23 patch from a 64 x 46 crop)."""
    images = _noise(4, 64, 64, seed=5)
    _, _, info = gaaga(images, sources, _gen(5), natural_prob=0.0, blurred_prob=1.0, size_range=(0.5, 0.5),
                       aspect_range=(2.0, 2.0), resize_range=(2.0, 2.0), return_info=True)
    _, _, poly = adga(images, sources, _gen(6), size_range=(0.5, 0.5), aspect_range=(2.0, 2.0), scale_range=(2.0, 2.0),
                      return_info=True)
    boxes = [(r["blurred"]["box"], r["blurred"]["crop"], (64, 64)) for r in info] + \
        [(r["box"], r["crop"], tuple(sources.shape[2:]) if r["source"] < len(sources) else (64, 64)) for r in poly]
    for (_, _, h, w), (_, _, ch, cw), (sh, sw) in boxes:
        assert ch <= sh and cw <= sw and (ch == sh or cw == sw)  # asked twice the box: as large as the source allows
        assert abs(math.log((ch / h) / (cw / w))) < 0.06, ((h, w), (ch, cw))  # one scale for both sides


def test_gaaga_patch_size_relative_to_image(sources):
    for side in (32, 128):
        images = _noise(8, side, side, seed=side)
        _, _, info = gaaga(images, sources, _gen(side), natural_prob=1, blurred_prob=1,
                           size_range=(1 / 16, 1 / 4), aspect_range=(1, 1), return_info=True)
        for rec in info:
            for kind in ("natural", "blurred"):
                _, _, h, w = rec[kind]["box"]
                assert h == w and round(side / 16) <= h <= round(side / 4)


def test_gaaga_kind_frequencies():
    images = torch.zeros(400, 3, 16, 16)
    src = _noise(1, 16, 16)
    _, _, info = gaaga(images, src, _gen(4), return_info=True)
    both = sum(r["natural"] is not None and r["blurred"] is not None for r in info) / 400
    nat = sum(r["natural"] is not None and r["blurred"] is None for r in info) / 400
    blr = sum(r["natural"] is None and r["blurred"] is not None for r in info) / 400
    assert both + nat + blr == 1.0
    assert abs(both - 0.25) < 0.07 and abs(nat - 0.375) < 0.07 and abs(blr - 0.375) < 0.07


def test_gaaga_repeatable_with_seed_only(sources):
    images = _noise(3, 32, 48, seed=5)
    torch.manual_seed(123)
    a = gaaga(images, sources, _gen(7))
    torch.manual_seed(456)  # the global RNG plays no part
    b = gaaga(images, sources, _gen(7))
    c = gaaga(images, sources, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_gaaga_errors(sources):
    images = _noise(2, 16, 16)
    with pytest.raises(ValueError, match="sources is empty"):
        gaaga(images, torch.empty(0, 3, 8, 8), _gen(0))
    with pytest.raises(ValueError, match="sources is empty"):
        gaaga(images, None, _gen(0))
    out, mask = gaaga(images, None, _gen(0), natural_prob=0.0)  # no photos needed then
    assert mask.any()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        gaaga(images[:, :1], sources, _gen(0))
    with pytest.raises(ValueError, match="size_range"):
        gaaga(images, sources, _gen(0), size_range=(0.5, 0.1))


# ---------------------------------------------------------------------------------------------- ADGA


def _place(info, b, h, w, key="alpha"):
    """Full-size ``[B, 1, H, W]`` alpha from the per-image boxes."""
    full = torch.zeros(b, 1, h, w)
    for i, rec in enumerate(info):
        y0, x0, bh, bw = rec["box"]
        full[i, 0, y0:y0 + bh, x0:x0 + bw] = rec[key]
    return full


def test_adga_shapes_range_and_mask(sources):
    images = _noise(6, 64, 80, seed=10)
    before = images.clone()
    out, mask, info = adga(images, sources, _gen(10), return_info=True)
    assert out.shape == images.shape and mask.shape == (6, 1, 64, 80) and mask.dtype == torch.bool
    assert torch.equal(images, before)
    assert out.min() >= -1 and out.max() <= 1
    alpha = _place(info, 6, 64, 80)
    assert torch.equal(mask, alpha > 0.5)
    assert mask.flatten(1).any(dim=1).all()
    diff = (out - images).abs()
    changed = (diff > 0).any(dim=1, keepdim=True)
    assert not (changed & (alpha == 0)).any()  # no alpha: bit-identical
    assert changed[mask].float().mean() > 0.95  # labelled anomalous: replaced
    # the soft rim is a partial blend: |out - in| <= alpha * |patch - in| <= 2 alpha
    assert (diff <= 2 * alpha + 1e-6).all()


def test_adga_vertex_counts(sources):
    images = _noise(60, 32, 32, seed=11)
    _, _, info = adga(images, sources, _gen(11), return_info=True)
    counts = [rec["n_vertices"] for rec in info]
    assert set(counts) == {3, 4, 5, 6, 7}
    for rec in info:
        assert rec["vertices"].shape == (rec["n_vertices"], 2)
        y0, x0, bh, bw = rec["box"]
        vx, vy = rec["vertices"][:, 0], rec["vertices"][:, 1]
        assert (vx >= x0).all() and (vx <= x0 + bw).all() and (vy >= y0).all() and (vy <= y0 + bh).all()
    _, _, info = adga(images[:5], sources, _gen(12), vertices=(5, 5), return_info=True)
    assert [rec["n_vertices"] for rec in info] == [5] * 5


def _segments_cross(p1, p2, q1, q2) -> bool:
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return (orient(p1, p2, q1) * orient(p1, p2, q2) < 0) and (orient(q1, q2, p1) * orient(q1, q2, p2) < 0)


def test_adga_polygons_are_simple(sources):
    _, _, info = adga(_noise(30, 48, 48, seed=13), sources, _gen(13), return_info=True)
    for rec in info:
        v = rec["vertices"].tolist()
        n = len(v)
        for i in range(n):
            for j in range(i + 2, n):
                if (j + 1) % n == i:
                    continue  # adjacent through the wrap-around
                assert not _segments_cross(v[i], v[(i + 1) % n], v[j], v[(j + 1) % n])


def test_adga_edge_is_soft(sources):
    images = _noise(4, 96, 96, seed=14)
    _, _, info = adga(images, sources, _gen(14), size_range=(0.3, 0.4), blur_sigma=(1.5, 2.0), return_info=True)
    cores = []
    for rec in info:
        a = rec["alpha"]
        rim = (a > 0) & (a < 1)
        assert rim.sum() > 10  # intermediate alphas exist ...
        hard = polygon_mask(rec["vertices"] - torch.tensor([rec["box"][1], rec["box"][0]]), *a.shape)
        # ... and sit along the polygon's boundary: within ceil(3 sigma) + 1 pixels of an edge pixel
        edge = hard ^ torch.nn.functional.max_pool2d(hard[None, None].float(), 3, 1, 1)[0, 0].bool()
        r = math.ceil(3 * rec["sigma"]) + 1
        near_edge = torch.nn.functional.max_pool2d(edge[None, None].float(), 2 * r + 1, 1, r)[0, 0].bool()
        assert not (rim & ~near_edge).any()
        cores.append(a.max().item())
    assert min(cores) > 0.5 and max(cores) == 1.0  # every polygon is labelled; big ones have an opaque core
    # the batched alpha equals a per-image rasterise + blur
    for rec in info:
        y0, x0, bh, bw = rec["box"]
        hard = polygon_mask(rec["vertices"] - torch.tensor([x0, y0]), bh, bw).float()
        want = gaussian_blur(hard, rec["sigma"], padding_mode="zeros")
        want = torch.where(want > 1 - 1e-6, torch.ones_like(want), want)
        torch.testing.assert_close(rec["alpha"], want, atol=1e-6, rtol=0)
    _, _, info = adga(images, sources, _gen(14), blur_sigma=0.0, return_info=True)
    for rec in info:
        assert set(rec["alpha"].unique().tolist()) <= {0.0, 1.0}  # no blur: hard edge


def test_polygon_rasterisation():
    # axis-aligned rectangle: pixel centres with 1 < x < 5 and 1 < y < 4 -> columns 1..4, rows 1..3
    m = polygon_mask(torch.tensor([[1.0, 1.0], [5.0, 1.0], [5.0, 4.0], [1.0, 4.0]]), 6, 7)
    want = torch.zeros(6, 7, dtype=torch.bool)
    want[1:4, 1:5] = True
    assert torch.equal(m, want)
    # random star polygons: area agrees with the shoelace formula, and PIL's rasteriser (which also
    # sets the outline's pixels) differs only on pixels whose centres lie within sqrt(2) of an edge
    g = _gen(15)
    for n in (3, 5, 7):
        ang = torch.sort(torch.rand(n, generator=g) * 2 * math.pi).values
        rad = 8 + 12 * torch.rand(n, generator=g)
        v = torch.stack([25 + rad * ang.cos(), 25 + rad * ang.sin()], dim=1).double()
        ours = polygon_mask(v, 50, 50)
        img = Image.new("L", (50, 50), 0)
        ImageDraw.Draw(img).polygon([(x - 0.5, y - 0.5) for x, y in v.tolist()], fill=1)
        pil = torch.from_numpy(np.asarray(img) > 0)
        x, y = v[:, 0], v[:, 1]
        area = 0.5 * abs(float((x * y.roll(-1) - x.roll(-1) * y).sum()))
        assert abs(ours.sum().item() - area) < 0.1 * area + 5
        rows, cols = torch.nonzero(ours ^ pil, as_tuple=True)
        p = torch.stack([cols + 0.5, rows + 0.5], dim=1).double().unsqueeze(1)  # [K, 1, 2]
        a, b = v.unsqueeze(0), v.roll(-1, 0).unsqueeze(0)  # edges a -> b, [1, n, 2]
        t = (((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1)).clamp(0, 1)
        dist = (p - (a + t.unsqueeze(-1) * (b - a))).norm(dim=-1).min(dim=1).values
        assert (dist <= 1.5).all()


def test_source_selection_rule():
    colours = torch.tensor([[0.9, -0.9, -0.9], [-0.4, -0.4, -0.4], [0.9, 0.9, 0.9], [-0.9, -0.9, 0.9]])
    cands = colours.view(4, 3, 1, 1).expand(4, 3, 8, 8)
    targets = torch.tensor([[-0.5, -0.5, -0.3], [0.8, -0.8, -0.7], [-0.8, -0.8, 0.7]]).view(3, 3, 1, 1).expand(3, 3, 8, 8)
    t_desc, c_desc = appearance(targets), appearance(cands)
    torch.testing.assert_close(t_desc[:, :3], targets[:, :, 0, 0])  # means ...
    assert torch.equal(t_desc[:, 3:], torch.zeros(3, 3))  # ... and stds
    u = torch.rand(3, generator=_gen(16))
    assert select_sources(t_desc, c_desc, u, k_nearest=1).tolist() == [1, 0, 3]
    # k = 2: uniform among the two nearest (computed by brute force here)
    dist = ((targets[:, :, 0, 0].unsqueeze(1) - colours.unsqueeze(0)) ** 2).sum(-1)
    two = dist.argsort(dim=1)[:, :2]
    assert (dist.sort(dim=1).values[:, 1] < dist.sort(dim=1).values[:, 2] - 0.1).all()  # no ties in the example
    assert select_sources(t_desc, c_desc, torch.full((3,), 0.1), k_nearest=2).tolist() == two[:, 0].tolist()
    assert select_sources(t_desc, c_desc, torch.full((3,), 0.9), k_nearest=2).tolist() == two[:, 1].tolist()
    # exclusion (a target never picks itself)
    excl = torch.zeros(3, 4, dtype=torch.bool)
    excl[0, 1] = True
    assert select_sources(t_desc, c_desc, u, 1, excl)[0].item() == two[0, 1].item()


def test_adga_picks_closest_appearance_source():
    src = torch.tensor([[0.9, -0.9, -0.9], [-0.45, -0.45, -0.45], [0.9, 0.9, 0.9]]).view(3, 3, 1, 1).expand(3, 3, 32, 32)
    images = torch.full((2, 3, 48, 48), -0.5)
    images[1] = torch.tensor([0.2, 0.9, 0.2]).view(3, 1, 1)  # a green target: its closest photo is white
    out, mask, info = adga(images, src, _gen(17), k_nearest=1, include_batch=False, return_info=True)
    assert [rec["source"] for rec in info] == [1, 2]
    torch.testing.assert_close(out[0][mask[0].expand(3, -1, -1)].view(3, -1).mean(1), torch.full((3,), -0.45), atol=0.03, rtol=0)
    # with the batch as candidates, a batch image identical to the target wins over every photo
    twins = torch.full((2, 3, 48, 48), 0.95)
    _, _, info = adga(twins, src, _gen(17), k_nearest=1, include_batch=True, return_info=True)
    assert [rec["source"] for rec in info] == [3 + 1, 3 + 0]  # never itself


def test_adga_match_mean():
    src = torch.full((1, 3, 32, 32), 0.5)
    images = torch.full((2, 3, 40, 40), -0.5)
    out, mask = adga(images, src, _gen(18), include_batch=False, match_mean=1.0)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)  # a flat patch shifted onto a flat target vanishes
    out, mask = adga(images, src, _gen(18), include_batch=False, match_mean=0.5, blur_sigma=0.0)
    torch.testing.assert_close(out[mask.expand(-1, 3, -1, -1)], torch.zeros(int(mask.sum()) * 3), atol=1e-5, rtol=0)


def test_adga_repeatable_with_seed_only(sources):
    images = _noise(3, 40, 40, seed=19)
    torch.manual_seed(1)
    a = adga(images, sources, _gen(20))
    torch.manual_seed(2)
    b = adga(images, sources, _gen(20))
    c = adga(images, sources, _gen(21))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_adga_errors(sources):
    images = _noise(2, 32, 32)
    with pytest.raises(ValueError, match="sources is empty"):
        adga(images, torch.empty(0, 3, 8, 8), _gen(0))
    with pytest.raises(ValueError, match="vertices"):
        adga(images, sources, _gen(0), vertices=(2, 5))
    with pytest.raises(ValueError, match="match_mean"):
        adga(images, sources, _gen(0), match_mean=2.0)
    with pytest.raises(TypeError, match="floating point"):
        adga((images * 100).to(torch.uint8), sources, _gen(0))


def test_adga_places_polygons_up_to_the_right_and_bottom_edges():
    images = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sources = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _out, _mask, info = adga(images, sources, torch.Generator().manual_seed(0), return_info=True)
    assert any(b["box"][1] + b["box"][3] == 32 for b in info)
    assert any(b["box"][0] + b["box"][2] == 32 for b in info)


def test_gaaga_patch_aspect_is_height_over_width(sources):
    """``aspect_range`` sets h / w of the pasted patches: 4 gives boxes four times as tall as wide
    (side s * sqrt(4) by s / sqrt(4)), 1/4 four times as wide as tall."""
    images = _noise(4, 64, 64, seed=5)
    for aspect, hw in ((4.0, (32, 8)), (0.25, (8, 32))):
        _, _, info = gaaga(images, sources, _gen(5), natural_prob=1, blurred_prob=1, size_range=(0.25, 0.25),
                           aspect_range=(aspect, aspect), return_info=True)
        for rec in info:
            for kind in ("natural", "blurred"):
                assert tuple(rec[kind]["box"][2:]) == hw


def test_gaaga_image_without_a_drawn_kind_gets_natural_in_proportion_to_the_probabilities():
    """An image that drew neither kind gets one: natural with probability
    natural_prob / (natural_prob + blurred_prob) (1/2 at 0.3 and 0.3), so natural patches are
    in 0.3 + 0.49 / 2 of the images."""
    images = torch.zeros(1000, 3, 16, 16)
    _, _, info = gaaga(images, _noise(1, 16, 16), _gen(8), natural_prob=0.3, blurred_prob=0.3, return_info=True)
    natural = sum(r["natural"] is not None for r in info) / 1000
    blurred = sum(r["blurred"] is not None for r in info) / 1000
    assert abs(natural - 0.545) < 0.05 and abs(blurred - 0.545) < 0.05


def test_a_source_excluded_for_a_target_is_never_chosen_when_fewer_than_k_remain():
    """With fewer allowed candidates than ``k_nearest`` (each image may not take itself), the
    choice is among the allowed ones only, whatever the random number."""
    target = torch.tensor([[0.0], [1.0]])
    cand = torch.tensor([[0.0], [1.0], [5.0]])  # the two targets themselves and a photo
    exclude = torch.tensor([[True, False, False], [False, True, False]])
    for u in (0.0, 0.5, 0.99):
        pick = select_sources(target, cand, torch.full((2,), u), 3, exclude)
        assert not exclude[torch.arange(2), pick].any()


def test_a_source_photo_is_cropped_at_its_centre(tmp_path):
    """A photo becomes a square by resizing its shorter side and cutting the middle of the longer
    one: a wide photo of red, green and blue thirds gives the green third."""
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20, 0] = arr[:, 20:40, 1] = arr[:, 40:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    src = load_sources(tmp_path, size=20, include_builtin=False)
    assert src.shape == (1, 3, 20, 20)
    mean = src[0].mean(dim=(1, 2))
    assert mean[1] > 0.9 and mean[0] < -0.9 and mean[2] < -0.9
