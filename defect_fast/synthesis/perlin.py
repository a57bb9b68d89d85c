"""Perlin noise and irregular anomaly masks from it, batched on the images' device.

The masks follow DRAEM (Zavrtanik et al., ICCV 2021; anomalib's ``data/utils/generators/perlin.py``):
gradient noise on a lattice, smoothed with the quintic fade ``6t^5 - 15t^4 + 10t^3``, rotated, and
thresholded. Differences from that code:

* **One call for a whole batch.** Each image has its own lattice (random unit gradients), its own
  number of lattice cells per side (``periods``: ``scale_range`` is drawn log-uniformly per image
  and axis, then rounded; DRAEM draws ``2**randint(0, 6)``, i.e. 1..32 cells per side), its own
  rotation and a random offset. All images are evaluated at once with gathers; nothing loops
  over images in Python.
* **Rotation without borders.** The lattice wraps around (the noise is periodic), so the rotated
  sampling grid never leaves it; DRAEM rotates the finished noise image, which leaves empty corners.
* **Requested coverage.** Instead of a fixed threshold (DRAEM: 0.5, so the masked fraction varies
  from image to image), each image's noise is thresholded at its own ``1 - coverage`` quantile:
  the mask covers ``round(coverage * H * W)`` pixels exactly, barring ties.
* **Soft edges** on request: ``smoothstep((noise - threshold) / width + 1/2)``, an alpha that is
  1/2 on the threshold contour, so ``alpha >= 1/2`` is exactly the hard mask.

Only small tensors are drawn from the ``generator`` (on its own device: per-image parameters and
the ``[B, S, S]`` gradient lattices); every per-pixel tensor is computed on ``device``, so a CPU
generator can drive synthesis on a GPU without moving images.
"""
from __future__ import annotations

import math

import torch

__all__ = ["perlin_noise", "fractal_noise", "perlin_mask", "threshold_at_coverage", "shape_noise"]


def uniform_draws(generator: torch.Generator, *shape: int, device: torch.device,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform [0, 1) drawn in float64 on the generator's device, moved to ``device`` as ``dtype``
    (the draws of every synthesis: the same numbers whatever device the pixels are on).

    Draws made on the host go with ``non_blocking``: a host-to-device copy of host data is staged
    before the call returns, and a blocking one also waits for all queued GPU work. A GPU
    generator's draws brought to the host are waited for: a non-blocking device-to-host copy may
    not have landed when they are read."""
    return torch.rand(*shape, generator=generator, dtype=torch.float64, device=generator.device).to(
        device, dtype, non_blocking=generator.device.type == "cpu")


def _check_scale_range(scale_range, fn: str) -> tuple[float, float]:
    a, b = float(scale_range[0]), float(scale_range[1])
    if not (1.0 <= a <= b):
        raise ValueError(f"{fn}: scale_range must be (low, high) lattice cells per side with 1 <= low <= high, "
                         f"got {scale_range}")
    return a, b


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _lattice_noise(grad: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, ly: torch.Tensor,
                   lx: torch.Tensor) -> torch.Tensor:
    """Periodic gradient noise. ``grad`` ``[B, S*S, 2]`` unit gradients (row-major S x S lattice, only
    the top-left ``sy x sx`` used), ``sy, sx`` ``[B, 1]`` int64 periods, ``ly, lx`` ``[B, P]`` lattice
    coordinates. Returns ``[B, P]`` in about [-1, 1]."""
    s = int(math.isqrt(grad.shape[1]))
    y0f, x0f = ly.floor(), lx.floor()
    fy, fx = ly - y0f, lx - x0f
    # NB: wrapping in floating point (exact for these small integers) is much cheaper than int64 remainder
    py, px = sy.to(ly.dtype), sx.to(lx.dtype)
    r0 = y0f - py * (y0f / py).floor()
    c0 = x0f - px * (x0f / px).floor()
    r1 = torch.where(r0 + 1 >= py, torch.zeros_like(r0), r0 + 1)
    c1 = torch.where(c0 + 1 >= px, torch.zeros_like(c0), c0 + 1)
    rows = ((r0 * s).long(), (r1 * s).long())
    cols = (c0.long(), c1.long())
    gy, gx = grad[..., 0], grad[..., 1]

    def corner(a: int, c: int) -> torch.Tensor:
        idx = rows[a] + cols[c]
        return gy.gather(1, idx) * (fy - a) + gx.gather(1, idx) * (fx - c)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, ty)


def perlin_noise(batch: int, height: int, width: int, generator: torch.Generator, *,
                 scale_range: tuple[float, float] = (1.0, 32.0), octaves: int = 1, persistence: float = 0.5,
                 rotate: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch of Perlin (or, with ``octaves > 1``, fractal Perlin) noise images.

    Args:
        batch, height, width: output size.
        generator: the only source of randomness (small draws on its own device).
        scale_range: lattice cells per image side of the coarsest octave, drawn log-uniformly per
            image and axis and rounded (at least 2); a ``(low, high)`` pair, or a ``[B, 2]`` tensor
            of per-image pairs (2 = one or two smooth bumps across the image; 32 on 256 pixels =
            blobs about 8 pixels wide).
        octaves: octave ``o`` has ``2**o`` times the cells and ``persistence**o`` the amplitude.
        rotate: rotate each image's sampling grid by a uniform random angle.
        device, dtype: of the output (default: the generator's device, float32).

    Returns:
        ``[B, 1, H, W]`` noise, zero-mean, roughly within [-1, 1] (not normalised per image).
    """
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(f"perlin_noise: need batch >= 0 and a positive size, got {batch}x{height}x{width}")
    if octaves < 1:
        raise ValueError(f"perlin_noise: octaves must be >= 1, got {octaves}")
    dev = torch.device(device) if device is not None else generator.device
    if isinstance(scale_range, torch.Tensor) and scale_range.dim() == 2:
        lo_ok = (1 <= scale_range[:, 0]) & (scale_range[:, 0] <= scale_range[:, 1])
        ok = scale_range.shape == (batch, 2) and bool(lo_ok.all())
        if not ok:
            raise ValueError(f"perlin_noise: per-image scale_range must be [{batch}, 2] with 1 <= low <= high")
        lo = scale_range[:, 0:1].to(dev, torch.float64)
        hi = scale_range[:, 1:2].to(dev, torch.float64)
        hi_max = float(hi.max()) if batch else 1.0
    else:
        lo, hi = _check_scale_range(scale_range, "perlin_noise")
        hi_max = hi
        lo = torch.tensor(lo, dtype=torch.float64).to(dev, non_blocking=True)
        hi = torch.tensor(hi, dtype=torch.float64).to(dev, non_blocking=True)
    if batch == 0:
        return torch.zeros(0, 1, height, width, device=dev, dtype=dtype)
    u = uniform_draws(generator, batch, 5, device=dev)
    # NB: at least 2 cells: a wrapping lattice of one cell has one gradient, i.e. parallel bands
    periods = torch.exp(lo.log() + u[:, :2] * (hi.log() - lo.log())).round().clamp(min=2)
    angle = u[:, 2] * (2 * math.pi) if rotate else torch.zeros_like(u[:, 2])
    work = torch.float64 if dtype == torch.float64 else torch.float32
    periods, offset = periods.to(work), u[:, 3:5].to(work)
    # NB: the noise is smooth within a lattice cell; it is evaluated with at least 4 samples per cell of
    # the finest octave (coarser than the pixel grid when cells are large) and resized bilinearly.
    finest = max(round(hi_max), 2) * 2 ** (octaves - 1)
    f = max(1, min(height, width) // (4 * finest))
    gh, gw = -(-height // f), -(-width // f)
    # sample centres in image-side units around the image centre (as F.interpolate places them), rotated
    yy = ((torch.arange(gh, device=dev, dtype=work) + 0.5) / gh - 0.5).view(1, -1, 1)
    xx = ((torch.arange(gw, device=dev, dtype=work) + 0.5) / gw - 0.5).view(1, 1, -1)
    c, s = angle.cos().to(work).view(-1, 1, 1), angle.sin().to(work).view(-1, 1, 1)
    ry = (s * xx + c * yy + 0.5).reshape(batch, -1)
    rx = (c * xx - s * yy + 0.5).reshape(batch, -1)
    acc = torch.zeros(batch, gh * gw, device=dev, dtype=work)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        p = periods * (2 ** o)
        size = int(p.max().item())
        theta = uniform_draws(generator, batch, size * size, device=dev) * (2 * math.pi)
        grad = torch.stack([theta.sin(), theta.cos()], dim=-1).to(work)
        sy, sx = p[:, 0:1].long(), p[:, 1:2].long()
        noise = _lattice_noise(grad, sy, sx, (ry + offset[:, 0:1]) * p[:, 0:1], (rx + offset[:, 1:2]) * p[:, 1:2])
        acc += amp * noise
        total += amp
        amp *= persistence
    acc = acc.view(batch, 1, gh, gw)
    if f > 1:
        acc = torch.nn.functional.interpolate(acc, size=(height, width), mode="bilinear", align_corners=False)
    out = acc.to(dtype)
    if octaves > 1:
        out /= total
    return out


def fractal_noise(batch: int, height: int, width: int, generator: torch.Generator, *, octaves: int = 4,
                  scale_range: tuple[float, float] = (2.0, 8.0), **kw) -> torch.Tensor:
    """Fractal (fBm) Perlin noise ``[B, 1, H, W]``: :func:`perlin_noise` with several octaves."""
    return perlin_noise(batch, height, width, generator, octaves=octaves, scale_range=scale_range, **kw)


def threshold_at_coverage(field: torch.Tensor, coverage: torch.Tensor | float, *,
                          refine: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image threshold at the ``1 - coverage`` quantile.

    Args:
        field: ``[B, 1, H, W]`` real values.
        coverage: ``[B]`` (or a number) fractions in [0, 1].
        refine: correction passes over the full field (see below).
    Returns:
        ``mask`` ``[B, 1, H, W]`` bool with ``mask.mean((1, 2, 3)) ~= coverage`` (to a fraction of a
        percent of the image for smooth fields such as Perlin noise), and the thresholds ``[B]``
        (``+inf`` where coverage rounds to 0 pixels).

    NB: sorting every image's pixels is slow on a CPU (0.9 s for 64 images of 256x256 on one core).
    The quantile is read from a sorted regular subsample of at most ~64x64 values per image, then
    ``refine`` times corrected: the exact count of the current threshold is measured on the full
    field and the threshold moved along the subsample's order by the count's error.
    """
    b = field.shape[0]
    h, w = field.shape[-2:]
    n = h * w
    cov = torch.as_tensor(coverage, dtype=torch.float64, device=field.device).expand(b).clamp(0, 1)
    if b == 0:
        return torch.zeros_like(field, dtype=torch.bool), torch.empty(0, dtype=field.dtype, device=field.device)
    flat = field.reshape(b, n)
    sy, sx = max(1, h // 64), max(1, w // 64)
    sub = field[:, 0, sy // 2::sy, sx // 2::sx].reshape(b, -1).sort(dim=1, descending=True).values
    m = sub.shape[1]
    k = cov * n  # wanted count, real
    rank = (cov * m).round().long().clamp(1, m) - 1  # index into the descending subsample
    thr = sub.gather(1, rank.view(-1, 1)).squeeze(1)
    for _ in range(refine):
        got = (flat >= thr.view(-1, 1)).sum(dim=1).double()
        rank = (rank - ((got - k) * m / n).round().long()).clamp(0, m - 1)
        thr = sub.gather(1, rank.view(-1, 1)).squeeze(1)
    thr = torch.where((k.round() > 0), thr, torch.full_like(thr, math.inf))
    return field >= thr.view(-1, 1, 1, 1), thr


def shape_noise(noise: torch.Tensor, envelope: torch.Tensor, shape: torch.Tensor, side: torch.Tensor,
                where: torch.Tensor | None = None) -> torch.Tensor:
    """Turns noise into the field that is thresholded for each mask shape.

    Args:
        noise, envelope: ``[B, 1, H, W]`` Perlin noise (envelope: a coarse one).
        shape: ``[B]`` int64: 0 blob (``noise``: spots and patches), 1 line (``envelope - 4 |noise|``:
            thin curves along the zero contour of the noise, kept where the envelope is high: cracks),
            2 edge (``noise + 3 ramp``: blobs pulled onto one image side: chipped edges).
        side: ``[B]`` int64 0..3, the image side (top, bottom, left, right) of edge shapes.
        where: optional ``[B, 2]`` (centre, width) along that side, in side units: the ramp is
            weighted by a Gaussian of that centre and width so the chip stays local (default:
            the whole side).
    Returns:
        ``[B, 1, H, W]`` field; larger values are inside the mask.
    """
    b, _, h, w = noise.shape
    dev, dt = noise.device, noise.dtype
    yy = ((torch.arange(h, device=dev, dtype=dt) + 0.5) / h).view(1, 1, -1, 1).expand(b, 1, h, w)
    xx = ((torch.arange(w, device=dev, dtype=dt) + 0.5) / w).view(1, 1, 1, -1).expand(b, 1, h, w)
    sv = side.view(-1, 1, 1, 1)
    dist = torch.where(sv == 0, yy, torch.where(sv == 1, 1 - yy, torch.where(sv == 2, xx, 1 - xx)))
    ramp = (1 - dist / 0.15).clamp(min=0)  # 1 on the side, 0 from 15 % of the image inwards
    if where is not None:
        t = torch.where(sv <= 1, xx, yy)  # position along the side
        centre, width = where[:, 0].view(-1, 1, 1, 1).to(dt), where[:, 1].view(-1, 1, 1, 1).to(dt)
        ramp = ramp * torch.exp(-(((t - centre) / width) ** 2))
    sh = shape.view(-1, 1, 1, 1)
    line = envelope - 4 * noise.abs()
    return torch.where(sh == 0, noise, torch.where(sh == 1, line, noise + 3 * ramp))


def perlin_mask(batch: int, height: int, width: int, generator: torch.Generator,
                coverage: float | tuple[float, float] | torch.Tensor = (0.02, 0.2), *,
                scale_range: tuple[float, float] = (1.0, 32.0), rotate: bool = True, softness: float = 0.0,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                return_alpha: bool = False):
    """Irregular binary masks: Perlin noise thresholded at the quantile that gives the requested coverage.

    Args:
        batch, height, width: output size.
        generator: the only source of randomness.
        coverage: the masked fraction of each image: a number, a ``(low, high)`` range drawn
            log-uniformly per image, or a ``[B]`` tensor.
        scale_range, rotate: as :func:`perlin_noise` (more cells: smaller, more numerous blobs).
        softness: edge width of the alpha in pixels (0: hard edges; see :func:`soft_alpha` for
            faint alpha away from the mask).
        device, dtype: of the alpha (default: the generator's device, float32).
        return_alpha: also return the alpha.

    Returns:
        ``mask`` ``[B, 1, H, W]`` bool with ``mask.mean((1, 2, 3)) ~= coverage``; with
        ``return_alpha`` also ``alpha`` ``[B, 1, H, W]`` in [0, 1] (``alpha >= 0.5`` iff ``mask``;
        equal to ``mask`` when ``softness == 0``).
    """
    dev = torch.device(device) if device is not None else generator.device
    cov = coverage_draw(coverage, batch, generator, dev, "perlin_mask")
    noise = perlin_noise(batch, height, width, generator, scale_range=scale_range, rotate=rotate, device=dev,
                         dtype=dtype)
    mask, thr = threshold_at_coverage(noise, cov)
    if not return_alpha:
        return mask
    return mask, soft_alpha(noise, thr, mask, softness)


def coverage_draw(coverage, batch: int, generator: torch.Generator, device: torch.device, fn: str) -> torch.Tensor:
    """``[B]`` float64 coverages from a number, a (low, high) range (log-uniform) or a ``[B]`` tensor."""
    if isinstance(coverage, torch.Tensor) and coverage.dim() == 1:
        if coverage.shape[0] != batch:
            raise ValueError(f"{fn}: coverage has {coverage.shape[0]} entries for a batch of {batch}")
        cov = coverage.to(device=device, dtype=torch.float64)
    elif isinstance(coverage, (int, float)) or (isinstance(coverage, torch.Tensor) and coverage.dim() == 0):
        cov = torch.full((batch,), float(coverage), dtype=torch.float64, device=device)
    else:
        lo, hi = float(coverage[0]), float(coverage[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{fn}: coverage range must satisfy 0 < low <= high <= 1, got {coverage}")
        u = uniform_draws(generator, batch, device=device)
        cov = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    if not ((cov >= 0) & (cov <= 1)).all():  # NaN too
        raise ValueError(f"{fn}: coverage must lie in [0, 1], got {coverage}")
    return cov


def soft_alpha(field: torch.Tensor, thr: torch.Tensor, mask: torch.Tensor,
               softness: float | torch.Tensor) -> torch.Tensor:
    """Smooth-edged alpha ``[B, 1, H, W]`` around the threshold contour; exactly ``mask`` where softness is 0.

    ``softness``: a number or ``[B]``: the width of the edge (alpha from 0 to 1) in pixels. The
    distance to the contour is estimated as ``(field - threshold) / |grad field|`` (central
    differences), so the width does not depend on the noise's scale. ``alpha >= 0.5`` iff ``mask``.

    NB: the estimate is first-order: where the field comes close to the threshold without crossing
    it (a bump peaking just below it, the ridge of a line field) it reads as near the contour, so
    alpha there rises up to just under 0.5 away from every mask pixel: faint changes the mask does
    not label, more of them the larger ``softness`` is. Training reads only the blended images, for
    which they are more faint anomalies; a caller needing the changed pixels reads ``alpha > 0``.
    """
    b, _, h, w = field.shape
    if b == 0:
        return mask.to(field.dtype)
    soft = torch.as_tensor(softness, dtype=field.dtype, device=field.device).expand(b).view(-1, 1, 1, 1)
    fp = torch.nn.functional.pad(field, (1, 1, 1, 1), mode="replicate")
    gy = (fp[:, :, 2:, 1:-1] - fp[:, :, :-2, 1:-1]) * 0.5
    gx = (fp[:, :, 1:-1, 2:] - fp[:, :, 1:-1, :-2]) * 0.5
    grad = (gy * gy + gx * gx).sqrt().clamp(min=1e-6)
    finite_thr = torch.where(torch.isfinite(thr), thr, torch.full_like(thr, 1e30)).view(-1, 1, 1, 1)
    t = ((field - finite_thr) / (grad * soft.clamp(min=1e-6)) + 0.5).clamp(0, 1)
    smooth = t * t * (3 - 2 * t)
    # NB: the smoothstep is 1/2 on the contour; keep the hard decision there so alpha >= 1/2 iff mask
    smooth = torch.where(mask, smooth.clamp(min=0.5), smooth.clamp(max=0.4999))
    return torch.where(soft > 0, smooth, mask.to(field.dtype))
