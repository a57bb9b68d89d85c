"""GAAGA: general artificial anomaly generation (CMA-AE, Section III-B, Eq. 1).

    I_an = paste(I_p, crop(I_n), blur(resize(crop(I_p))))

Two kinds of rectangular patch are pasted, with hard edges, at random places of a normal image:

* a *natural* patch: a random crop of a natural photo ``I_n`` (``sources``), pasted at its own
  resolution like the paper's 256x256 ImageNet crops (resized only when the photo is smaller than
  the patch);
* a *blurred* patch: a random crop of a normal image (any image of the batch, the target
  included, at an independent random place), resized to the patch size by a random factor (so the
  network has to repair the patch rather than deblur it) and then Gaussian-blurred, a
  "degenerate anomaly".

The paper pastes both into every image. Here each image draws its patch kinds independently:
natural with probability ``natural_prob``, blurred with probability ``blurred_prob``; an image
that drew neither gets exactly one, natural with probability
``natural_prob / (natural_prob + blurred_prob)``. Every output image is thus anomalous; with the
defaults (0.5, 0.5): both 25%, natural only 37.5%, blurred only 37.5%. ``natural_prob =
blurred_prob = 1`` is the paper's rule. Where both are pasted the natural patch goes on top.
:data:`PAPER_RULE` holds the options that give the paper's rule as a whole: both kinds in every
image, squares of half the image side (256 on the paper's 512); CMA-AE trains with it under
``synthesis="paper-exact"``.

Patch sizes are relative to the image, since images here are 128..512 pixels on a side while the
paper pastes 256 on 512: the side ``s * min(H, W)`` with ``s ~ U(size_range)`` (default 1/16..1/4,
so 8..32 pixels on 128, 32..128 on 512), and an aspect ratio ``h / w`` log-uniform in
``aspect_range``.

Resizing is bilinear with PyTorch's ``align_corners=False`` convention (no antialiasing: the crop
is at most ``1 / resize_range[0]`` times larger than the patch, and the blur that follows removes
the aliasing). The whole batch is processed at once: patches are laid out on a ``[N, 3, Ph, Pw]``
canvas of the largest patch size, sampled with gathers, blurred with per-image banded matrices and
written back with one indexed copy, so the cost does not grow with a Python loop over images.

All randomness comes from the ``generator`` argument (one ``torch.rand`` call), so equal seeds give
equal outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["PAPER_RULE", "gaaga", "gaussian_blur"]

#: :func:`gaaga`'s options for the paper's rule (Section III-B: a 256x256 crop of a natural photo and
#: a crop of a normal image resized to 256x256 and blurred, both pasted into the normal 512x512
#: image): both kinds in every image, squares of half the image's smaller side.
PAPER_RULE = {"natural_prob": 1.0, "blurred_prob": 1.0, "size_range": (0.5, 0.5), "aspect_range": (1.0, 1.0)}


# ----------------------------------------------------------------------------------------------
# Helpers shared with adga.py. Geometry lives in CPU float64/int64 tensors of length N.


def _check_images(images: torch.Tensor, fn: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{fn}: images must be a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"{fn}: images must be floating point in [-1, 1], got {images.dtype}")


def _check_sources(sources: torch.Tensor | None, images: torch.Tensor, fn: str) -> torch.Tensor:
    """Validates ``[M, 3, h, w]`` sources (M >= 1) and moves them to the images' device and dtype."""
    if sources is None or (isinstance(sources, torch.Tensor) and sources.numel() == 0):
        raise ValueError(f"{fn}: no natural source photos given (sources is empty); "
                         "load some with defect_fast.synthesis.load_sources()")
    if not isinstance(sources, torch.Tensor) or sources.dim() != 4 or sources.shape[1] != 3:
        shape = tuple(sources.shape) if isinstance(sources, torch.Tensor) else type(sources).__name__
        raise ValueError(f"{fn}: sources must be a [M, 3, h, w] tensor, got {shape}")
    return sources.to(device=images.device, dtype=images.dtype)


def _check_range(name: str, rng: Sequence[float] | float, lo: float, hi: float | None = None) -> tuple[float, float]:
    a, b = (float(rng), float(rng)) if isinstance(rng, (int, float)) else (float(rng[0]), float(rng[1]))
    if not (lo <= a <= b and (hi is None or b <= hi)):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be a (low, high) pair with low <= high within {bound}, got {rng}")
    return a, b


def _uniform(u: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    return rng[0] + u * (rng[1] - rng[0])


def _log_uniform(u: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    return torch.exp(math.log(rng[0]) + u * (math.log(rng[1]) - math.log(rng[0])))


def _index(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """floor(u * n) clamped to [0, n - 1], int64, for u in [0, 1)."""
    n = torch.as_tensor(n, dtype=torch.int64)
    return torch.minimum((u * n).floor().long(), n - 1).clamp(min=0)


def _round(x: torch.Tensor, lo: torch.Tensor | int, hi: torch.Tensor | int) -> torch.Tensor:
    """round(x) as int64, clamped to [lo, hi] (hi wins when lo > hi)."""
    r = torch.maximum(x.round().long(), torch.as_tensor(lo, dtype=torch.int64))
    return torch.minimum(r, torch.as_tensor(hi, dtype=torch.int64))


def _patch_shape(u_size, u_aspect, side: int, size_range, aspect_range, max_h, max_w):
    """(h, w) int64: side ``s * side``, aspect ``h / w`` log-uniform, clamped to [1, max]."""
    s = _uniform(u_size, size_range) * side
    a = _log_uniform(u_aspect, aspect_range).sqrt()
    return _round(s * a, 1, max_h), _round(s / a, 1, max_w)


def _fit_crop(h: torch.Tensor, w: torch.Tensor, max_h, max_w):
    """Shrinks (h, w) keeping its aspect until it fits in (max_h, max_w); int64."""
    max_h = torch.as_tensor(max_h, dtype=torch.float64)
    max_w = torch.as_tensor(max_w, dtype=torch.float64)
    f = torch.minimum(torch.minimum(max_h / h, max_w / w), torch.ones((), dtype=torch.float64))
    return _round(h * f, 1, max_h.long()), _round(w * f, 1, max_w.long())


def _sample(pool: torch.Tensor, idx: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, ch: torch.Tensor,
            cw: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Crops ``pool[idx[n], :, cy:cy+ch, cx:cx+cw]`` resized to ``(ph, pw)``, for all n at once.

    Bilinear, ``align_corners=False`` (as ``F.interpolate(..., antialias=False)``); a crop of
    the patch's own size is copied exactly. Returns ``[N, C, Ph, Pw]`` (``canvas``); entries
    beyond ``(ph[n], pw[n])`` repeat the crop's last row/column.
    """
    num = idx.numel()
    _, c, h, w = pool.shape
    dev = pool.device
    nph, npw = canvas

    def axis(c0, size_c, size_p, n):
        pos = torch.arange(n, dtype=torch.float64).view(1, -1)
        src = ((pos + 0.5) * (size_c.double() / size_p.double()).view(-1, 1) - 0.5).clamp(min=0)
        lo = src.floor()
        frac = src - lo
        lo = torch.minimum(lo.long(), (size_c - 1).view(-1, 1))
        hi = torch.minimum(lo + 1, (size_c - 1).view(-1, 1))
        return lo + c0.view(-1, 1), hi + c0.view(-1, 1), frac.to(dev, pool.dtype, non_blocking=True)

    y0, y1, fy = axis(cy, ch, ph, nph)
    x0, x1, fx = axis(cx, cw, pw, npw)
    # NB: whole rows are copied first (contiguous, cheap), then the columns gathered from them
    rows = pool.reshape(-1, w)
    plane = (idx.view(-1, 1, 1) * c + torch.arange(c).view(1, -1, 1)) * h  # [N, C, 1] first row of each plane

    def take_rows(ys):
        return rows.index_select(0, (plane + ys.view(num, 1, nph)).view(-1).to(dev, non_blocking=True)).view(num, c, nph, w)

    def take_cols(r, xs):
        return r.gather(3, xs.to(dev, non_blocking=True).view(num, 1, 1, npw).expand(num, c, nph, npw))

    exact = torch.equal(ch, ph) and torch.equal(cw, pw)
    r = take_rows(y0) if exact else torch.lerp(take_rows(y0), take_rows(y1), fy.view(num, 1, nph, 1))
    if exact:  # plain copies, bit-exact
        return take_cols(r, x0)
    return torch.lerp(take_cols(r, x0), take_cols(r, x1), fx.view(num, 1, 1, npw))


def _gaussian_kernels(sigma: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[N, 2R+1]`` normalised Gaussians, radius ``max(1, ceil(3 sigma_n))`` each (R: the largest);
    ``sigma_n <= 0`` gives the identity kernel."""
    radius = torch.where(sigma > 0, (3 * sigma).ceil(), torch.zeros_like(sigma)).clamp(min=1)
    r_max = int(radius.max().item())
    t = torch.arange(-r_max, r_max + 1, dtype=torch.float64).view(1, -1)
    s = sigma.double().view(-1, 1)
    k = torch.exp(-0.5 * (t / s.clamp(min=1e-12)) ** 2) * (t.abs() <= radius.view(-1, 1))
    k = torch.where(s > 0, k, (t == 0).double().expand_as(k))
    # NB: host data sent with non_blocking: staged before the call returns, and no wait for the GPU
    return (k / k.sum(dim=1, keepdim=True)).to(device=device, dtype=dtype, non_blocking=True)


def _blur_matrices(n: int, k: torch.Tensor, sizes: torch.Tensor, replicate: bool) -> torch.Tensor:
    """``[N, n, n]``: ``A[i] @ v`` is the 1-D convolution of ``v[:sizes[i]]`` with ``k[i]``.

    ``replicate``: the signal is extended by its edge values (``sizes`` marks each signal's end);
    else by zeros beyond the canvas (callers guarantee zeros between ``sizes`` and ``n``).
    """
    num, taps = k.shape
    r = (taps - 1) // 2
    dev = k.device
    rows = torch.arange(n, device=dev).view(1, -1, 1)
    cols = (rows + torch.arange(-r, r + 1, device=dev).view(1, 1, -1)).expand(num, n, taps)
    weights = k.view(num, 1, taps).expand(num, n, taps)
    if replicate:
        cols = torch.minimum(cols.clamp(min=0), (sizes.to(dev, non_blocking=True) - 1).view(-1, 1, 1))
    else:
        weights = weights * ((cols >= 0) & (cols < n))
        cols = cols.clamp(0, n - 1)
    a = torch.zeros(num, n, n, dtype=k.dtype, device=dev)
    return a.scatter_add_(2, cols.contiguous(), weights.contiguous())


def _blur_batch(x: torch.Tensor, sigma: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor, *,
                replicate: bool) -> torch.Tensor:
    """Per-image Gaussian blur of ``x`` ``[N, C, Ph, Pw]`` whose image n occupies ``[:hs[n], :ws[n]]``."""
    k = _gaussian_kernels(sigma, x.dtype, x.device)
    a_h = _blur_matrices(x.shape[-2], k, hs, replicate).unsqueeze(1)
    a_w = _blur_matrices(x.shape[-1], k, ws, replicate).unsqueeze(1)
    return a_h @ x @ a_w.transpose(-1, -2)


def gaussian_blur(x: torch.Tensor, sigma: float, *, padding_mode: str = "replicate") -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[..., H, W]`` with std ``sigma`` pixels (radius ceil(3 sigma)).

    ``padding_mode``: "replicate" (edges extended) or "zeros". ``sigma <= 0`` returns ``x``.
    Computed as ``A_h @ x @ A_w^T`` with banded matrices (cheaper on CPU than a grouped
    convolution for the small, ever-changing shapes met here).
    """
    if padding_mode not in ("replicate", "zeros"):
        raise ValueError(f"gaussian_blur: padding_mode must be 'replicate' or 'zeros', got {padding_mode!r}")
    if sigma <= 0:
        return x
    k = _gaussian_kernels(torch.tensor([float(sigma)]), x.dtype, x.device)
    h, w = x.shape[-2:]
    rep = padding_mode == "replicate"
    return _blur_matrices(h, k, torch.tensor([h]), rep)[0] @ x @ _blur_matrices(w, k, torch.tensor([w]), rep)[0].T


def _paste(out: torch.Tensor, mask: torch.Tensor, sel: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor,
           ph: torch.Tensor, pw: torch.Tensor, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Writes ``values[n, :, :ph[n], :pw[n]]`` into ``out[sel[n], :, y0[n]:, x0[n]:]`` for all n at once
    and sets ``mask`` there (only where ``where`` ``[N, Ph, Pw]`` is True, when given).

    ``out`` ``[B, C, H, W]`` and ``mask`` ``[B, 1, H, W]`` must be contiguous; ``sel`` has no repeats.
    """
    _, c, h, w = out.shape
    dev = out.device
    nph, npw = values.shape[-2:]
    i = torch.arange(nph).view(1, -1, 1)
    j = torch.arange(npw).view(1, 1, -1)
    valid = (i < ph.view(-1, 1, 1)) & (j < pw.view(-1, 1, 1))  # [N, Ph, Pw]
    pix = (y0.view(-1, 1, 1) + i) * w + x0.view(-1, 1, 1) + j  # offset inside one plane
    plane = (sel.view(-1, 1, 1) * c) * (h * w)
    flat = (plane + pix)[valid].to(dev, non_blocking=True)  # channel 0 of each valid pixel
    chan = torch.arange(c, device=dev).view(-1, 1) * (h * w)
    vals = values.permute(1, 0, 2, 3)[:, valid.to(dev, non_blocking=True)]  # [C, K]
    out.view(-1)[(flat.view(1, -1) + chan).view(-1)] = vals.reshape(-1)
    keep = valid if where is None else valid & where.cpu()
    mask.view(-1)[(sel.view(-1, 1, 1) * (h * w) + pix)[keep].to(dev, non_blocking=True)] = True


# ----------------------------------------------------------------------------------------------

# Columns of the per-image uniform draws (one torch.rand call for the whole batch).
_KIND_NAT, _KIND_BLR, _KIND_FALLBACK = 0, 1, 2
_BLR = slice(3, 12)   # size, aspect, zoom, donor, crop y, crop x, paste y, paste x, sigma
_NAT = slice(12, 19)  # size, aspect, source, crop y, crop x, paste y, paste x
_N_DRAWS = 19


def gaaga(images: torch.Tensor, sources: torch.Tensor | None, generator: torch.Generator, *,
          natural_prob: float = 0.5, blurred_prob: float = 0.5,
          size_range: tuple[float, float] = (1 / 16, 1 / 4),
          aspect_range: tuple[float, float] = (0.5, 2.0),
          resize_range: tuple[float, float] = (0.5, 2.0),
          blur_sigma_range: tuple[float, float] = (1.0, 3.0),
          return_info: bool = False):
    """Pastes a natural-photo patch and/or a blurred, resized normal patch into each image.

    Args:
        images: normal images ``[B, 3, H, W]`` in [-1, 1] (not modified).
        sources: natural photos ``[M, 3, h, w]`` in [-1, 1] (e.g. :func:`load_sources`); may be
            None or empty only when ``natural_prob == 0``.
        generator: the only source of randomness.
        natural_prob, blurred_prob: per-image probabilities of each patch kind (module docstring);
            at least one must be positive.
        size_range: patch side as a fraction of ``min(H, W)``, drawn uniformly.
        aspect_range: patch ``h / w``, drawn log-uniformly (``(1, 1)``: squares as in the paper).
        resize_range: for blurred patches, (crop side) / (patch side), log-uniform: the crop of the
            normal image is scaled by its inverse when resized to the patch.
        blur_sigma_range: Gaussian std of the blurred patch in pixels, drawn uniformly.
        return_info: also return one dict per image describing what was pasted.

    Returns:
        ``out`` ``[B, 3, H, W]`` in [-1, 1] (same dtype/device as ``images``, contiguous) and
        ``mask`` ``[B, 1, H, W]`` bool, True exactly where pixels were replaced (the union of the
        pasted rectangles); with ``return_info`` also a list of B dicts with keys ``"natural"`` and
        ``"blurred"``, each None or a dict with ``box`` (y0, x0, h, w) in the image, ``crop``
        (y0, x0, h, w) in its origin, and ``source`` (index into ``sources``) or ``donor`` (index
        into ``images``) and ``sigma``.
    """
    _check_images(images, "gaaga")
    if not (0 <= natural_prob <= 1 and 0 <= blurred_prob <= 1 and natural_prob + blurred_prob > 0):
        raise ValueError(f"gaaga: natural_prob and blurred_prob must lie in [0, 1], not both 0; "
                         f"got {natural_prob}, {blurred_prob}")
    size_range = _check_range("gaaga: size_range", size_range, 1e-6, 1.0)
    aspect_range = _check_range("gaaga: aspect_range", aspect_range, 1e-6)
    resize_range = _check_range("gaaga: resize_range", resize_range, 1e-6)
    blur_sigma_range = _check_range("gaaga: blur_sigma_range", blur_sigma_range, 0.0)
    if natural_prob > 0:
        sources = _check_sources(sources, images, "gaaga")
    b, _, h, w = images.shape
    out = images.clone(memory_format=torch.contiguous_format)
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=images.device)
    if b == 0:
        return (out, mask, []) if return_info else (out, mask)
    u = torch.rand(b, _N_DRAWS, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    side = min(h, w)

    # 1. which patch kinds each image gets
    nat = u[:, _KIND_NAT] < natural_prob
    blr = u[:, _KIND_BLR] < blurred_prob
    neither = ~(nat | blr)
    fallback_nat = u[:, _KIND_FALLBACK] * (natural_prob + blurred_prob) < natural_prob
    nat |= neither & fallback_nat
    blr |= neither & ~fallback_nat
    info: list[dict] = [{"natural": None, "blurred": None} for _ in range(b)] if return_info else []

    # 2. blurred, resized crops of normal images (pasted first: a natural patch goes on top)
    sel = blr.nonzero().view(-1)
    if sel.numel():
        u_size, u_aspect, u_zoom, u_donor, u_cy, u_cx, u_y, u_x, u_sigma = u[sel, _BLR].unbind(1)
        ph, pw = _patch_shape(u_size, u_aspect, side, size_range, aspect_range, h, w)
        z = _log_uniform(u_zoom, resize_range)
        ch, cw = _fit_crop(_round(ph * z, 1, 1 << 30), _round(pw * z, 1, 1 << 30), h, w)  # shrunk keeping its aspect
        donor = _index(u_donor, b)
        cy, cx = _index(u_cy, h - ch + 1), _index(u_cx, w - cw + 1)
        y0, x0 = _index(u_y, h - ph + 1), _index(u_x, w - pw + 1)
        sigma = _uniform(u_sigma, blur_sigma_range)
        canvas = (int(ph.max()), int(pw.max()))
        patch = _sample(images, donor, cy, cx, ch, cw, ph, pw, canvas)
        patch = _blur_batch(patch, sigma, ph, pw, replicate=True).clamp_(-1, 1)
        _paste(out, mask, sel, y0, x0, ph, pw, patch)
        if return_info:
            for i, *rec in zip(*(t.tolist() for t in (sel, y0, x0, ph, pw, cy, cx, ch, cw, donor, sigma))):
                info[i]["blurred"] = {"box": tuple(rec[0:4]), "crop": tuple(rec[4:8]), "donor": rec[8], "sigma": rec[9]}

    # 3. crops of natural photos, at their own resolution where the photo is large enough
    sel = nat.nonzero().view(-1)
    if sel.numel():
        u_size, u_aspect, u_src, u_cy, u_cx, u_y, u_x = u[sel, _NAT].unbind(1)
        ph, pw = _patch_shape(u_size, u_aspect, side, size_range, aspect_range, h, w)
        src = _index(u_src, sources.shape[0])
        sh, sw = sources.shape[-2:]
        ch, cw = _fit_crop(ph, pw, sh, sw)
        cy, cx = _index(u_cy, sh - ch + 1), _index(u_cx, sw - cw + 1)
        y0, x0 = _index(u_y, h - ph + 1), _index(u_x, w - pw + 1)
        canvas = (int(ph.max()), int(pw.max()))
        patch = _sample(sources, src, cy, cx, ch, cw, ph, pw, canvas).clamp_(-1, 1)
        _paste(out, mask, sel, y0, x0, ph, pw, patch)
        if return_info:
            for i, *rec in zip(*(t.tolist() for t in (sel, y0, x0, ph, pw, cy, cx, ch, cw, src))):
                info[i]["natural"] = {"box": tuple(rec[0:4]), "crop": tuple(rec[4:8]), "source": rec[8]}
    return (out, mask, info) if return_info else (out, mask)
