"""ADGA: artificial defect generation (AW-SSIM two-stage AE, Section 3.2, Eq. 1).

    I_AD = Paste(I_T, GB(Resize(crop(I_s))))

For every target image ``I_T`` of the batch:

1. **Source choice.** Candidates are the natural photos (``sources``) and, with ``include_batch``,
   the other images of the batch. Each image is described by its appearance: the mean and the
   standard deviation of each colour channel (a 6-vector, from a strided subsample of at most
   ~32x32 pixels). The source is drawn uniformly among the ``k_nearest`` candidates closest to the
   target in Euclidean distance of these vectors. This is the paper's "source images ... selected
   ... based on the background colour and appearance of the target image" made explicit. With
   ``include_batch`` (the default) the nearest candidates are usually other defect-free images of
   the batch, which match the target's appearance more closely than a natural photo does, so
   the pasted piece is mostly another normal image's surface, misplaced; ``include_batch=False``
   draws from the photos only. On a uniform surface (every image alike, no structure to misplace)
   the pasted piece is the same surface: the image barely changes while its mask labels a defect,
   and a second stage learns little from it; ``include_batch=False`` (in :func:`synthesize`'s
   "paper" variant: ``paper_options={"include_batch": False}``) pastes photos there.
2. **Shape.** A polygon with ``n`` vertices, ``n`` uniform in ``vertices`` (3..7 by default). It
   is star-shaped around the centre of its box, so it never self-intersects: vertex ``i`` sits at
   angle ``2 pi (i + j_i) / n + theta_0`` (jitter ``|j_i| <= 0.35``, so angles strictly increase)
   and at radius ``r_i`` in [0.45, 1] of the box's half-extent.
3. **Crop and resize.** The polygon's extent is ``s * min(H, W)`` with ``s ~ U(size_range)``
   (default 1/16..1/4; aspect log-uniform in ``aspect_range``); its box adds a margin of
   ``ceil(3 sigma)`` on every side for the soft edge. A window of the source with the box's
   aspect, ``z`` times its size (``z`` log-uniform in ``scale_range``), is cut at a random place
   and resized to the box.
4. **Soft edge.** The polygon is rasterised (pixel centres, even-odd rule) to a 0/1 alpha and the
   alpha is Gaussian-blurred with std ``sigma`` (``blur_sigma``, pixels, capped at 1/8 of the
   smaller side of the polygon's box), which softens the transition at the edges. The cap keeps
   an opaque core in polygons that fill their box; a thin one (a sliver of 3 vertices, or radii
   near 0.45) can stay translucent everywhere, and in rare cases (about 0.3 % at 128 px) under
   alpha 0.5, where its label mask (alpha > 0.5) is empty while its pixels changed a little.
5. **Paste.** At a random place: ``out = target + alpha * (patch - target)``; pixels with alpha 0
   are left bit-identical. With ``match_mean = t`` in (0, 1], the patch is first shifted by
   ``t * (mean_target - mean_patch)`` per channel (alpha-weighted means over the box), which keeps
   its texture but moves its brightness/colour toward the surroundings.

The label ``mask`` is ``alpha > 0.5``: where the pasted content dominates the blend. The faint
rim with ``0 < alpha <= 0.5`` is changed but labelled normal; the exact alpha comes back with
``return_info``.

Like :func:`~defect_fast.synthesis.gaaga`, the whole batch is processed at once (polygons padded
to the largest vertex count by repeating their last vertex, boxes laid out on one canvas), and all
randomness comes from one ``torch.rand`` call on the given generator.
"""
from __future__ import annotations

import math
import numbers

import torch

from .gaaga import (_blur_batch, _check_images, _check_range, _check_sources, _fit_crop, _index, _log_uniform,
                    _paste, _round, _sample, _uniform)

__all__ = ["adga", "appearance", "select_sources", "polygon_mask"]

_MAX_VERTICES = 64  # columns reserved per image for vertex jitter/radius draws (cap on `vertices`)


def appearance(images: torch.Tensor) -> torch.Tensor:
    """Appearance descriptor ``[N, 6]``: per-channel mean then per-channel std of ``[N, 3, H, W]``.

    Computed on a strided subsample of at most about 32x32 pixels (step ``ceil(min(H, W) / 32)``).
    """
    step = max(1, -(-min(images.shape[-2:]) // 32))
    sub = images[:, :, ::step, ::step].reshape(images.shape[0], images.shape[1], -1).double()
    mean = sub.mean(dim=2)
    std = ((sub * sub).mean(dim=2) - mean * mean).clamp(min=0).sqrt()
    return torch.cat([mean, std], dim=1).to(images.dtype)


def select_sources(target_desc: torch.Tensor, candidate_desc: torch.Tensor, u: torch.Tensor, k_nearest: int,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the chosen candidate for each target: uniform among its ``k_nearest`` nearest.

    Args:
        target_desc: ``[B, D]`` descriptors of the targets.
        candidate_desc: ``[C, D]`` descriptors of the candidates.
        u: ``[B]`` uniform numbers in [0, 1) (the random choice).
        k_nearest: how many nearest candidates to choose among (clamped to those available).
        exclude: optional ``[B, C]`` bool, True where a candidate may not serve a target (itself).
    Returns:
        ``[B]`` int64 candidate indices.
    """
    dist = torch.cdist(target_desc.double(), candidate_desc.double())
    if exclude is not None:
        dist = dist.masked_fill(exclude, math.inf)
    available = torch.isfinite(dist).sum(dim=1).clamp(min=1)
    k = min(max(1, int(k_nearest)), candidate_desc.shape[0])
    order = dist.topk(k, dim=1, largest=False).indices  # [B, k], nearest first
    kk = available.clamp(max=k)
    pick = (u.double() * kk).long().clamp(max=kk - 1)
    return order.gather(1, pick.view(-1, 1)).squeeze(1)


def polygon_mask(vertices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rasterises polygons: True where the pixel centre is inside (even-odd rule).

    ``vertices``: ``[n, 2]`` or ``[N, n, 2]`` (x, y) in pixel units (pixel ``(r, c)`` has its
    centre at ``x = c + 0.5, y = r + 0.5``); repeated vertices are allowed (zero-length edges
    count for nothing). Returns ``[height, width]`` or ``[N, height, width]`` bool. Per row, the x
    positions where the edges cross the row's centre line are sorted; a pixel is inside when an
    odd number of them lie to its right.
    """
    single = vertices.dim() == 2
    v = vertices.double().unsqueeze(0) if single else vertices.double()
    vx, vy = v[..., 0].unsqueeze(1), v[..., 1].unsqueeze(1)  # [N, 1, n]
    wx, wy = vx.roll(-1, dims=2), vy.roll(-1, dims=2)  # edge i goes from vertex i to vertex i + 1
    py = (torch.arange(height, dtype=torch.float64) + 0.5).view(1, -1, 1)
    straddles = (vy > py) != (wy > py)  # [N, h, n]: edge i crosses row r's centre line
    dy = torch.where(wy == vy, torch.ones_like(wy), wy - vy)
    x_cross = vx + (py - vy) * (wx - vx) / dy
    x_cross = torch.where(straddles, x_cross, torch.full_like(x_cross, -math.inf)).sort(dim=2).values
    px = (torch.arange(width, dtype=torch.float64) + 0.5).expand(v.shape[0], height, width).contiguous()
    at_or_left = torch.searchsorted(x_cross, px, right=True)  # crossings with x <= pixel centre
    inside = ((x_cross.shape[2] - at_or_left) % 2) == 1
    return inside[0] if single else inside


def _polygons(n: torch.Tensor, u_theta: torch.Tensor, u_jit: torch.Tensor, u_rad: torch.Tensor, cx: torch.Tensor,
              cy: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """``[N, V, 2]`` (x, y) star-shaped polygons around (cx, cy) with half-extents (rx, ry); polygon i
    has ``n[i]`` vertices, the rest of its V rows repeat its last vertex."""
    v = u_jit.shape[1]
    i = torch.arange(v, dtype=torch.float64).view(1, -1)
    nf = n.double().view(-1, 1)
    ang = 2 * math.pi * u_theta.view(-1, 1) + 2 * math.pi * (i + 0.7 * (u_jit - 0.5)) / nf
    r = 0.45 + 0.55 * u_rad
    pts = torch.stack([cx.view(-1, 1) + r * rx.view(-1, 1) * ang.cos(),
                       cy.view(-1, 1) + r * ry.view(-1, 1) * ang.sin()], dim=2)
    last = torch.minimum(torch.arange(v).view(1, -1), (n - 1).view(-1, 1))
    return pts.gather(1, last.unsqueeze(2).expand(-1, -1, 2))


def adga(images: torch.Tensor, sources: torch.Tensor | None, generator: torch.Generator, *,
         vertices: tuple[int, int] = (3, 7),
         size_range: tuple[float, float] = (1 / 16, 1 / 4),
         aspect_range: tuple[float, float] = (0.5, 2.0),
         scale_range: tuple[float, float] = (0.5, 2.0),
         blur_sigma: float | tuple[float, float] = (1.0, 2.0),
         k_nearest: int = 3,
         include_batch: bool = True,
         match_mean: float = 0.0,
         source_desc: torch.Tensor | None = None,
         return_info: bool = False):
    """Pastes one soft-edged random polygon, cut from an appearance-matched source, into each image.

    Args:
        images: normal target images ``[B, 3, H, W]`` in [-1, 1] (not modified).
        sources: natural photos ``[M, 3, h, w]`` in [-1, 1], M >= 1 (e.g. :func:`load_sources`).
        generator: the only source of randomness.
        vertices: inclusive range of the polygon's vertex count.
        size_range: polygon extent as a fraction of ``min(H, W)``, uniform.
        aspect_range: polygon height / width, log-uniform.
        scale_range: source window size / pasted box size, log-uniform.
        blur_sigma: std (pixels) of the Gaussian that softens the alpha; a number or a (low, high)
            range drawn uniformly.
        k_nearest: the source is drawn among this many nearest candidates in appearance.
        include_batch: the other images of the batch are candidates as well as the photos.
        match_mean: in [0, 1]; how far to shift the patch's mean colour toward the target's.
        source_desc: optional precomputed ``appearance(sources)`` ``[M, 6]`` (saves work when the
            pool is large).
        return_info: also return one dict per image.

    Returns:
        ``out`` ``[B, 3, H, W]`` in [-1, 1] and ``mask`` ``[B, 1, H, W]`` bool (``alpha > 0.5``);
        with ``return_info`` also a list of B dicts: ``n_vertices``, ``vertices`` (``[n, 2]``
        float64 (x, y) in image pixel units, pixel centres at +0.5), ``box`` (y0, x0, h, w),
        ``alpha`` (``[h, w]`` blended alpha over the box), ``source`` (candidate index: < M a
        photo, ``M + j`` batch image j), ``crop`` (y0, x0, h, w) in the source, ``sigma``.
    """
    _check_images(images, "adga")
    sources = _check_sources(sources, images, "adga")
    vmin, vmax = int(vertices[0]), int(vertices[1])
    if not (3 <= vmin <= vmax <= _MAX_VERTICES):
        raise ValueError(f"adga: vertices must be a (low, high) pair with 3 <= low <= high <= {_MAX_VERTICES}, got {vertices}")
    size_range = _check_range("adga: size_range", size_range, 1e-6, 1.0)
    aspect_range = _check_range("adga: aspect_range", aspect_range, 1e-6)
    scale_range = _check_range("adga: scale_range", scale_range, 1e-6)
    sigma_range = _check_range("adga: blur_sigma", blur_sigma, 0.0)
    if isinstance(k_nearest, bool) or not isinstance(k_nearest, numbers.Integral) or k_nearest < 1:
        raise ValueError(f"adga: k_nearest must be an integer >= 1, got {k_nearest!r}")
    if not 0.0 <= match_mean <= 1.0:
        raise ValueError(f"adga: match_mean must lie in [0, 1], got {match_mean}")
    b, _, h, w = images.shape
    m = sources.shape[0]
    out = images.clone(memory_format=torch.contiguous_format)
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=images.device)
    if b == 0:
        return (out, mask, []) if return_info else (out, mask)
    u = torch.rand(b, 11 + 2 * vmax, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    u_pick, u_n, u_size, u_aspect, u_sigma, u_zoom, u_cy, u_cx, u_y, u_x, u_theta = u[:, :11].unbind(1)
    u_jit, u_rad = u[:, 11:11 + vmax], u[:, 11 + vmax:]

    # 1. source choice
    target_desc = appearance(images).cpu()
    if source_desc is None:
        source_desc = appearance(sources)
    cand_desc = source_desc.cpu().to(target_desc.dtype)
    exclude = torch.zeros(b, m, dtype=torch.bool)
    if include_batch:
        cand_desc = torch.cat([cand_desc, target_desc])
        exclude = torch.cat([exclude, torch.eye(b, dtype=torch.bool)], dim=1)
    chosen = select_sources(target_desc, cand_desc, u_pick, k_nearest, exclude)
    is_photo = chosen < m

    # 2. polygon extents, blur, boxes (margin ceil(3 sigma) around the polygon for the soft edge)
    n_vert = vmin + _index(u_n, vmax - vmin + 1)
    extent = _uniform(u_size, size_range) * min(h, w)
    a = _log_uniform(u_aspect, aspect_range).sqrt()
    ph, pw = _round(extent * a, 2, 1 << 30), _round(extent / a, 2, 1 << 30)
    sigma = torch.minimum(_uniform(u_sigma, sigma_range), torch.minimum(ph, pw).double() / 8)
    margin = torch.where(sigma > 0, (3 * sigma).ceil(), torch.zeros_like(sigma)).long()
    ph = torch.maximum(torch.minimum(ph, h - 2 * margin), torch.tensor(2))
    pw = torch.maximum(torch.minimum(pw, w - 2 * margin), torch.tensor(2))
    bh, bw = torch.clamp(ph + 2 * margin, max=h), torch.clamp(pw + 2 * margin, max=w)
    canvas = (int(bh.max()), int(bw.max()))
    verts = _polygons(n_vert, u_theta, u_jit, u_rad, bw / 2, bh / 2, (bw - 2 * margin) / 2, (bh - 2 * margin) / 2)

    # 3. soft alpha: rasterise, blur, snap the core to exactly 1
    alpha = polygon_mask(verts, *canvas).to(device=images.device, dtype=images.dtype, non_blocking=True).unsqueeze(1)
    alpha = _blur_batch(alpha, sigma, bh, bw, replicate=False)
    # NB: the kernels sum to 1 only up to rounding
    alpha = torch.where(alpha > 1 - 1e-6, torch.ones_like(alpha), alpha.clamp(min=0))
    i = torch.arange(canvas[0]).view(1, 1, -1, 1)
    j = torch.arange(canvas[1]).view(1, 1, 1, -1)
    alpha = alpha * ((i < bh.view(-1, 1, 1, 1)) & (j < bw.view(-1, 1, 1, 1))).to(alpha.device, alpha.dtype, non_blocking=True)

    # 4. source windows resized to the boxes
    src_h = torch.where(is_photo, sources.shape[2], h)
    src_w = torch.where(is_photo, sources.shape[3], w)
    z = _log_uniform(u_zoom, scale_range)
    # the window as asked, then shrunk keeping its aspect to fit the source (clamping each side
    # first left _fit_crop nothing to do and stretched a window clamped on one side only)
    ch, cw = _fit_crop(_round(bh * z, 1, 1 << 30), _round(bw * z, 1, 1 << 30), src_h, src_w)
    cy, cx = _index(u_cy, src_h - ch + 1), _index(u_cx, src_w - cw + 1)
    patch = torch.empty(b, 3, *canvas, dtype=images.dtype, device=images.device)
    for pick, pool, offset in ((is_photo, sources, 0), (~is_photo, images, m)):
        sel = pick.nonzero().view(-1)
        if sel.numel():
            patch[sel.to(images.device, non_blocking=True)] = _sample(pool, chosen[sel] - offset, cy[sel], cx[sel], ch[sel], cw[sel],
                                                   bh[sel], bw[sel], canvas)

    # 5. blend at random places
    y0, x0 = _index(u_y, h - bh + 1), _index(u_x, w - bw + 1)
    target = _sample(images, torch.arange(b), y0, x0, bh, bw, bh, bw, canvas)  # exact copies of the boxes
    if match_mean > 0:
        wsum = alpha.sum(dim=(2, 3)).clamp(min=1e-12)
        shift = ((target - patch) * alpha).sum(dim=(2, 3)) / wsum
        patch = patch + match_mean * shift.view(b, 3, 1, 1)
    patch = patch.clamp_(-1, 1)
    blended = target + alpha * (patch - target)
    _paste(out, mask, torch.arange(b), y0, x0, bh, bw, blended, (alpha[:, 0] > 0.5).cpu())

    if not return_info:
        return out, mask
    info = []
    for k in range(b):
        nv = int(n_vert[k])
        v = verts[k, :nv].clone()
        v[:, 0] += int(x0[k])
        v[:, 1] += int(y0[k])
        info.append({"n_vertices": nv, "vertices": v, "box": (int(y0[k]), int(x0[k]), int(bh[k]), int(bw[k])),
                     "alpha": alpha[k, 0, :int(bh[k]), :int(bw[k])], "source": int(chosen[k]),
                     "crop": (int(cy[k]), int(cx[k]), int(ch[k]), int(cw[k])), "sigma": float(sigma[k])})
    return out, mask, info
