"""What is blended into the Perlin-shaped regions: anomaly content, batched on the images' device.

Four kinds (``KINDS``), each producing a full ``[N, C, H, W]`` image of content that
:func:`~defect_fast.synthesis.synthesize` blends into a mask region:

* ``photo`` — a natural photo (``sources``), zoomed, rotated and shifted at random
  (:func:`warp`), as DRAEM's DTD textures / CMA-AE's ImageNet crops;
* ``texture`` — generated in code (:func:`texture_content`): fractal Perlin noise, stripes,
  blotches or a flat/graded colour field, at a random level and contrast;
* ``cutpaste`` — another normal image of the same batch, rotated, rescaled and shifted
  (:func:`warp`): a structural anomaly made of in-domain texture (DRAEM, CutPaste);
* ``intensity`` — the image itself brightened/darkened, blurred or with its local contrast
  changed (:func:`intensity_content`): low-contrast defects such as magnetic tile's "uneven".

Small random draws come from the ``generator`` on its own device; the pixel work runs on the
images' device; a Python loop runs over sub-kinds (at most four), never over images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gaaga import _blur_batch
from .perlin import fractal_noise, perlin_noise, uniform_draws

__all__ = ["KINDS", "TEXTURES", "INTENSITY_EFFECTS", "warp", "texture_content", "intensity_content", "donors"]

KINDS = ("photo", "texture", "cutpaste", "intensity")
TEXTURES = ("fractal", "stripes", "blotches", "field")
INTENSITY_EFFECTS = ("shift", "blur", "contrast")


def _rand(generator: torch.Generator, *shape: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return uniform_draws(generator, *shape, device=device, dtype=dtype)


def _coords(n: int, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in image-side units in [0, 1], ``[1, 1, H, 1]`` and ``[1, 1, 1, W]``."""
    yy = ((torch.arange(h, device=device, dtype=dtype) + 0.5) / h).view(1, 1, h, 1)
    xx = ((torch.arange(w, device=device, dtype=dtype) + 0.5) / w).view(1, 1, 1, w)
    return yy, xx


def donors(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[B]`` int64: for each image another image of the batch, uniformly (itself only when B == 1)."""
    if batch <= 1:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    u = _rand(generator, batch, device=device, dtype=torch.float64)
    step = 1 + (u * (batch - 1)).floor().long().clamp(max=batch - 2)
    return (torch.arange(batch, device=device) + step) % batch


def warp(pool: torch.Tensor, index: torch.Tensor, size: tuple[int, int], generator: torch.Generator, *,
         zoom_range: tuple[float, float] = (0.5, 1.0), max_rotation: float = math.pi,
         shift: float = 1.0) -> torch.Tensor:
    """Randomly zoomed, rotated and shifted views of ``pool[index]``.

    Args:
        pool: ``[M, C, h, w]`` images.
        index: ``[N]`` int64 indices into ``pool``.
        size: ``(H, W)`` of the output.
        zoom_range: side of the sampled window relative to the pool image's, log-uniform
            (< 1 zooms in).
        max_rotation: rotation uniform in ``[-max_rotation, max_rotation]`` radians.
        shift: translation uniform in ``[-shift, shift]`` half-sides (``grid_sample`` units).
    Returns:
        ``[N, C, H, W]`` bilinear samples (``align_corners=False``, reflection outside the image).
    """
    n = index.shape[0]
    dev, dt = pool.device, pool.dtype
    if n == 0:
        return pool.new_zeros(0, pool.shape[1], *size)
    u = _rand(generator, n, 4, device=dev, dtype=torch.float64)
    lo, hi = zoom_range
    s = torch.exp(math.log(lo) + u[:, 0] * (math.log(hi) - math.log(lo)))
    a = (2 * u[:, 1] - 1) * max_rotation
    t = (2 * u[:, 2:4] - 1) * shift
    theta = torch.stack([torch.stack([s * a.cos(), -s * a.sin(), t[:, 0]], 1),
                         torch.stack([s * a.sin(), s * a.cos(), t[:, 1]], 1)], 1).to(dt)
    grid = F.affine_grid(theta, [n, pool.shape[1], *size], align_corners=False)
    return F.grid_sample(pool.index_select(0, index.to(dev, non_blocking=index.device.type == "cpu")), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def texture_content(n: int, channels: int, size: tuple[int, int], generator: torch.Generator, *,
                    device: torch.device, dtype: torch.dtype, gray: bool = True,
                    return_type: bool = False):
    """Textures generated in code: ``[N, C, H, W]`` in [-1, 1].

    Each image draws a pattern type (``TEXTURES``, uniformly): ``fractal`` (4-octave Perlin noise),
    ``stripes`` (a sinusoid of 3..30 cycles per image at a random angle, bent by a little noise),
    ``blotches`` (saturated Perlin noise: patches with sharp borders), ``field`` (a flat level with
    a linear gradient). The pattern ``p`` (about [-1, 1]) becomes ``level + amplitude * p`` with
    ``level ~ U(-1, 1)`` (per channel unless ``gray``) and ``amplitude ~ U(0.05, 0.6)``.
    With ``return_type`` also the ``[N]`` pattern types (indices into ``TEXTURES``).
    """
    h, w = size
    kind = (_rand(generator, n, device=device, dtype=torch.float64) * len(TEXTURES)).floor().long().clamp(max=3)
    u = _rand(generator, n, 4, device=device, dtype=dtype)
    level = _rand(generator, n, channels, device=device, dtype=dtype) * 2 - 1
    if gray:
        level = level[:, :1].expand(n, channels)
    pattern = torch.zeros(n, 1, h, w, device=device, dtype=dtype)
    yy, xx = _coords(n, h, w, device, dtype)
    phi = (u[:, 0] * math.pi).view(-1, 1, 1, 1)
    along = xx * phi.cos() + yy * phi.sin()  # [N, 1, H, W]
    for t in range(len(TEXTURES)):
        sel = (kind == t).nonzero().view(-1)
        m = sel.numel()
        if m == 0:
            continue
        if TEXTURES[t] == "fractal":
            p = fractal_noise(m, h, w, generator, scale_range=(2.0, 16.0), device=device, dtype=dtype)
            p = p / p.reshape(m, -1).std(dim=1).clamp(min=1e-6).view(-1, 1, 1, 1) / 2.5
        elif TEXTURES[t] == "stripes":
            cycles = torch.exp(math.log(3.0) + u[sel, 1] * math.log(10.0)).view(-1, 1, 1, 1)
            bend = perlin_noise(m, h, w, generator, scale_range=(1.0, 4.0), device=device, dtype=dtype)
            p = torch.sin(2 * math.pi * (cycles * along[sel] + u[sel, 2].view(-1, 1, 1, 1)) + 3 * bend)
        elif TEXTURES[t] == "blotches":
            p = perlin_noise(m, h, w, generator, scale_range=(3.0, 16.0), device=device, dtype=dtype)
            p = torch.tanh(p / p.reshape(m, -1).std(dim=1).clamp(min=1e-6).view(-1, 1, 1, 1) * 2)
        else:
            p = (2 * along[sel] - 1) * u[sel, 1].view(-1, 1, 1, 1)
        pattern[sel] = p.clamp(-1, 1)
    amplitude = (0.05 + 0.55 * u[:, 3]).view(-1, 1, 1, 1)
    out = (level.view(n, channels, 1, 1) + amplitude * pattern).clamp(-1, 1)
    return (out, kind) if return_type else out


def intensity_content(x: torch.Tensor, generator: torch.Generator, *, shift_range: tuple[float, float] = (0.1, 0.5),
                      blur_range: tuple[float, float] = (2.0, 6.0), return_type: bool = False):
    """Low-contrast changes of the images themselves: ``[N, C, H, W]`` in [-1, 1].

    Each image draws an effect (``INTENSITY_EFFECTS``, uniformly): ``shift`` adds ``+-U(shift_range)``
    (brighter or darker, even odds), ``blur`` applies a Gaussian of std ``U(blur_range)`` pixels,
    ``contrast`` scales the deviation from the local mean (Gaussian std 8 px) by ``U(0.2, 0.6)``
    or ``U(1.5, 2.5)``. With ``return_type`` also the ``[N]`` effects.
    """
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    kind = (_rand(generator, n, device=dev, dtype=torch.float64) * len(INTENSITY_EFFECTS)).floor().long().clamp(max=2)
    u = _rand(generator, n, 3, device=dev, dtype=torch.float64)
    out = torch.empty_like(x)
    for t, name in enumerate(INTENSITY_EFFECTS):
        sel = (kind == t).nonzero().view(-1)
        m = sel.numel()
        if m == 0:
            continue
        xs = x[sel]
        hs, ws = torch.full((m,), h), torch.full((m,), w)
        if name == "shift":
            mag = shift_range[0] + u[sel, 0] * (shift_range[1] - shift_range[0])
            sign = torch.where(u[sel, 1] < 0.5, -1.0, 1.0).to(mag)
            out[sel] = xs + (sign * mag).to(dt).view(-1, 1, 1, 1)
        elif name == "blur":
            sigma = (blur_range[0] + u[sel, 0] * (blur_range[1] - blur_range[0])).cpu()
            out[sel] = _blur_batch(xs, sigma, hs, ws, replicate=True)
        else:
            mean = _blur_batch(xs, torch.full((m,), 8.0, dtype=torch.float64), hs, ws, replicate=True)
            k = torch.where(u[sel, 1] < 0.5, 0.2 + 0.4 * u[sel, 0], 1.5 + u[sel, 0]).to(dt).view(-1, 1, 1, 1)
            out[sel] = mean + k * (xs - mean)
    out = out.clamp_(-1, 1)
    return (out, kind) if return_type else out
