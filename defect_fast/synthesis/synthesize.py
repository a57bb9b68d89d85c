"""One entry point for the synthetic training stages: :func:`synthesize` with a :class:`SynthesisConfig`.

Two variants, for both methods (``method``: ``"gaaga"`` for CMA-AE, ``"adga"`` for the AW-SSIM AE):

``variant="paper"``
    The papers' generators: :func:`~defect_fast.synthesis.gaaga` (rectangular natural and
    blurred patches, hard edges) or :func:`~defect_fast.synthesis.adga` (soft-edged polygons from
    appearance-matched sources), called with ``paper_options`` as keyword arguments, with their
    own defaults where those are silent. NB: GAAGA's defaults are not the paper's rule of both
    patches in every image: each image draws its patch kinds (both in 25 % of images), and
    patches are 1/16 to 1/4 of the image side, not the paper's 256 on 512;
    ``paper_options={"natural_prob": 1.0, "blurred_prob": 1.0}`` pastes both. With
    the default ``clean_fraction`` (None -> 0) the output is bit-identical to calling them directly
    with the same generator.

``variant="perlin"``
    Per image, independently:

    1. *clean or not*: with probability ``clean_fraction`` (default 0.4) the image is returned
       unchanged with an empty mask, so the network also learns the identity on normal input
       (DRAEM leaves half its images clean; the papers none). A model that only ever sees damaged
       input learns to alter every input a little, which raises the map on normal surfaces.
    2. *content kind* (``source_mix``, order ``KINDS`` = photo, texture, cutpaste, intensity;
       default 0.15, 0.25, 0.3, 0.3): see :mod:`~defect_fast.synthesis.anomalies`. Without
       ``sources`` the photo share is spread over the others. Cut-paste of other normal images
       and intensity changes get the largest shares because they stay inside the domain's
       appearance (defects on magnetic tiles are darker/brighter or differently textured tile,
       not foreign objects); photos and generated textures keep variety so the model does not
       learn one specific artefact.
    3. *mask shape* (``shape_mix``, order ``SHAPES`` = blob, line, edge; default 0.5, 0.25, 0.25):
       a Perlin field thresholded at the ``1 - coverage`` quantile
       (:func:`~defect_fast.synthesis.perlin.threshold_at_coverage`). ``blob``: the noise itself
       (spots and patches, "blowhole"); ``line``: thin curves along the noise's zero contour kept
       where a coarse envelope is high ("crack"); ``edge``: blobs pulled onto a stretch (10..40 %
       wide) of one image side ("break"/"fray": chipped tile edges). Coverage is log-uniform in
       ``coverage`` (blob and edge; default 0.5 %..15 % of the image) or ``line_coverage``
       (0.2 %..1 %); lattice cells
       per side log-uniform in ``scale_range`` (default 2..32; lines ``line_scale_range``, 2..8, so
       that they run as long, smooth curves instead of zigzag fragments).
       Line masks are filled, with probability ``dark_lines`` (0.7), with the image darkened by
       0.3..0.8 (cracks are dark on these tiles) and edge masks, with probability ``dark_edges``
       (0.5), with a near-black level (a chipped edge shows the dark background); otherwise with
       the content drawn in step 2, which on a 1-2 px line is mostly invisible.
       Intensity content always uses a blob of coarse noise (``intensity_scale_range`` 2..5
       cells) with coverage in ``intensity_coverage`` (default 5 %..40 %) and a wide soft edge
       (``intensity_softness``, 12 px): large, low-contrast, smooth-edged regions like "uneven".
    4. *blend* with a random opacity ``beta ~ U(opacity)`` (default 0.2..1.0; DRAEM: 0.2..1):
       ``out = x + beta * alpha * (content - x)`` with ``alpha`` the (soft) mask. ``gaaga`` keeps
       the paper's hard edges (``softness`` 0 unless set); ``adga`` softens them
       (``softness`` 3 px from alpha 0 to 1, about a Gaussian of std 1.2 px: ADGA blurs its
       polygon alpha with std 1..2 px), and keeps ADGA's rule for choosing a photo: uniformly among the ``k_nearest`` (3) photos closest
       in appearance to the target (:func:`~defect_fast.synthesis.adga.select_sources`;
       the other batch images are the ``cutpaste`` kind here). The label ``mask`` is
       ``alpha >= 0.5`` on anomalous images, whatever the opacity (the training target is the
       clean image, so a faint anomaly is still something to repair).

Content is converted to the images' grey level (channel mean) when the images are grey
(``grayscale=None`` detects equal channels; True/False force it): colour photos on a grey tile
would be a trivially easy cue.

Randomness: only the ``generator``; equal seeds give equal outputs on one device.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .adga import adga, appearance, select_sources
from .anomalies import KINDS, donors, intensity_content, texture_content, warp
from .gaaga import gaaga
from .perlin import perlin_noise, shape_noise, soft_alpha, threshold_at_coverage, uniform_draws

__all__ = ["SynthesisConfig", "synthesize", "METHODS", "VARIANTS", "KINDS", "SHAPES"]

METHODS = ("gaaga", "adga")
VARIANTS = ("paper", "perlin")
SHAPES = ("blob", "line", "edge")


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _pair(name: str, v, lo: float, hi: float | None) -> tuple[float, float]:
    try:
        if len(v) != 2 or not (_real(v[0]) and _real(v[1])):
            raise TypeError
        a, b = float(v[0]), float(v[1])
    except (TypeError, IndexError, KeyError, ValueError):
        raise ValueError(f"SynthesisConfig.{name} must be a (low, high) pair of numbers, got {v!r}") from None
    if not (lo <= a <= b and (hi is None or b <= hi) and math.isfinite(b)):
        upper = "" if hi is None else f" <= {hi}"
        raise ValueError(f"SynthesisConfig.{name} must satisfy {lo} <= low <= high{upper}, both finite, got {v!r}")
    return a, b


def _number(name: str, v, lo: float, hi: float | None = None) -> float:
    """``v`` as a finite float in [lo, hi] (hi None: no upper end), else a ValueError naming the field."""
    if not _real(v):
        raise ValueError(f"SynthesisConfig.{name} must be a number, got {v!r}")
    x = float(v)
    if not (lo <= x and (hi is None or x <= hi) and math.isfinite(x)):
        where = f"lie in [{lo}, {hi}]" if hi is not None else f"be a finite number >= {lo}"
        raise ValueError(f"SynthesisConfig.{name} must {where}, got {v!r}")
    return x


def _mix(name: str, v, n: int) -> tuple[float, ...]:
    try:
        if isinstance(v, (str, bytes)) or not all(_real(x) for x in v):
            raise TypeError
        p = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"SynthesisConfig.{name} must be {n} non-negative weights, got {v!r}") from None
    if len(p) != n or any(x < 0 or not math.isfinite(x) for x in p) or sum(p) <= 0:
        raise ValueError(f"SynthesisConfig.{name} must be {n} non-negative weights, not all 0, got {v!r}")
    return p


@dataclass(frozen=True)
class SynthesisConfig:
    """Options of :func:`synthesize` (see the module docstring for the reasoning behind the defaults).

    Attributes:
        variant: "paper" (the papers' GAAGA/ADGA, unchanged) or "perlin".
        clean_fraction: probability that an image is left clean; None: 0 for "paper", 0.4 for "perlin".
        coverage: (low, high) masked fraction of blob and edge masks, log-uniform.
        line_coverage: (low, high) masked fraction of line masks, log-uniform.
        intensity_coverage: (low, high) masked fraction of intensity anomalies, log-uniform.
        opacity: (low, high) blending opacity beta, uniform.
        source_mix: weights of the content kinds, order ``KINDS`` (photo, texture, cutpaste, intensity).
        shape_mix: weights of the mask shapes, order ``SHAPES`` (blob, line, edge).
        scale_range: Perlin lattice cells per image side for blob/line/edge masks.
        line_scale_range: the same for line masks (fewer cells: longer, smoother curves).
        intensity_scale_range: the same for intensity anomalies.
        softness: mask edge width in pixels (alpha 0 to 1); None: 0 for "gaaga", 3 for "adga"
            (soft edges can also leave faint changes outside the mask: see
            :func:`~defect_fast.synthesis.perlin.soft_alpha`).
        intensity_softness: edge width of intensity anomalies, pixels.
        dark_lines: probability that a line mask is filled with a darkened copy of the image (a crack).
        dark_edges: probability that an edge mask is filled with a dark level (a chipped edge).
        k_nearest: "adga": a photo is drawn among this many closest in appearance.
        grayscale: convert content to grey; None: when the images' channels are all equal.
        paper_options: keyword arguments for :func:`gaaga` / :func:`adga` in the "paper" variant.
    """
    variant: str = "perlin"
    clean_fraction: float | None = None
    coverage: tuple[float, float] = (0.005, 0.15)
    line_coverage: tuple[float, float] = (0.002, 0.01)
    intensity_coverage: tuple[float, float] = (0.05, 0.4)
    opacity: tuple[float, float] = (0.2, 1.0)
    source_mix: tuple[float, float, float, float] = (0.15, 0.25, 0.3, 0.3)
    shape_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    scale_range: tuple[float, float] = (2.0, 32.0)
    line_scale_range: tuple[float, float] = (2.0, 8.0)
    intensity_scale_range: tuple[float, float] = (2.0, 5.0)
    softness: float | None = None
    intensity_softness: float = 12.0
    dark_lines: float = 0.7
    dark_edges: float = 0.5
    k_nearest: int = 3
    grayscale: bool | None = None
    paper_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"SynthesisConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.clean_fraction is not None:
            _number("clean_fraction", self.clean_fraction, 0.0, 1.0)
        for name in ("coverage", "line_coverage", "intensity_coverage"):
            _pair(name, getattr(self, name), 1e-6, 1.0)
        if _pair("opacity", self.opacity, 0.0, 1.0)[1] <= 0:  # nothing would be pasted under a mask saying defect
            raise ValueError(f"SynthesisConfig.opacity must have high > 0, got {self.opacity!r}")
        _pair("scale_range", self.scale_range, 1.0, None)
        _pair("line_scale_range", self.line_scale_range, 1.0, None)
        _pair("intensity_scale_range", self.intensity_scale_range, 1.0, None)
        _mix("source_mix", self.source_mix, len(KINDS))
        _mix("shape_mix", self.shape_mix, len(SHAPES))
        if self.softness is not None:
            _number("softness", self.softness, 0.0)
        _number("intensity_softness", self.intensity_softness, 0.0)
        for name in ("dark_lines", "dark_edges"):
            _number(name, getattr(self, name), 0.0, 1.0)
        if isinstance(self.k_nearest, bool) or not isinstance(self.k_nearest, numbers.Integral) or self.k_nearest < 1:
            raise ValueError(f"SynthesisConfig.k_nearest must be an integer >= 1, got {self.k_nearest!r}")
        if self.grayscale is not None and not isinstance(self.grayscale, bool):
            raise ValueError(f"SynthesisConfig.grayscale must be True, False or None, got {self.grayscale!r}")
        if not isinstance(self.paper_options, dict):
            raise ValueError(f"SynthesisConfig.paper_options must be a dict, got {type(self.paper_options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists); :meth:`from_dict` reverses it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthesisConfig":
        """Builds a config from :meth:`to_dict`'s output; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SynthesisConfig: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _uniform(generator, n, device):
    return uniform_draws(generator, n, device=device)


def _categorical(u: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """``[N]`` int64 categories from uniforms ``u`` and (unnormalised) ``weights``."""
    cum = torch.tensor(weights, dtype=torch.float64).to(u.device, non_blocking=True).cumsum(0)
    cum = cum / cum[-1]
    return torch.searchsorted(cum, u.contiguous(), right=True).clamp(max=len(weights) - 1)


def _log_uniform(generator, rng, n, device):
    lo, hi = rng
    return torch.exp(math.log(lo) + _uniform(generator, n, device) * (math.log(hi) - math.log(lo)))


def synthesize(clean: torch.Tensor, sources: torch.Tensor | None, generator: torch.Generator,
               method: str = "gaaga", config: SynthesisConfig | None = None, *, return_info: bool = False,
               **overrides):
    """Synthetic anomalies for the second training stage of either method.

    Args:
        clean: normal images ``[B, C, H, W]`` in [-1, 1], floating point (C = 3 for "paper").
        sources: natural photos ``[M, C, h, w]`` in [-1, 1] (:func:`load_sources`); required by
            "paper"; optional for "perlin" (no photo content without them).
        generator: the only source of randomness.
        method: "gaaga" (CMA-AE) or "adga" (AW-SSIM AE).
        config: a :class:`SynthesisConfig` (default: ``SynthesisConfig()``, the "perlin" variant).
        return_info: also return a dict describing what was done (see below).
        **overrides: fields replacing those of ``config`` (e.g. ``variant="paper"``).

    Returns:
        ``images`` ``[B, C, H, W]`` (dtype/device of ``clean``, in [-1, 1]; clean images bit-identical
        to the input) and ``mask`` ``[B, 1, H, W]`` bool (True where an anomaly was placed). With
        ``return_info``: a dict with ``clean`` ``[B]`` bool (left clean); for "perlin" also
        ``kind`` ``[B]`` (index into ``KINDS``, -1 for clean), ``shape`` ``[B]`` (index into
        ``SHAPES``; intensity: 0), ``beta`` ``[B]`` (opacity, 0 for clean), ``coverage`` ``[B]``
        (requested), ``donor`` ``[B]`` (batch index of cut-paste content, else -1), ``source``
        ``[B]`` (photo index, else -1), ``dark`` ``[B]`` bool (content replaced by a dark crack /
        chipped-edge fill, see ``dark_lines``/``dark_edges``), ``alpha`` ``[B, 1, H, W]`` and ``content``
        ``[B, C, H, W]``: ``images == clean + beta * alpha * (content - clean)``. For "paper":
        ``paper_info`` (the per-image list of :func:`gaaga`/:func:`adga`, drawn before the clean
        draw: an image left clean keeps the entry of the anomaly it no longer shows).
    """
    cfg = config if config is not None else SynthesisConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if method not in METHODS:
        raise ValueError(f"synthesize: method must be one of {METHODS}, got {method!r}")
    if not isinstance(clean, torch.Tensor) or clean.dim() != 4 or not clean.is_floating_point():
        desc = f"{tuple(clean.shape)} {clean.dtype}" if isinstance(clean, torch.Tensor) else type(clean).__name__
        raise ValueError(f"synthesize: clean must be a floating-point [B, C, H, W] tensor, got {desc}")
    if cfg.variant == "paper":
        return _paper(clean, sources, generator, method, cfg, return_info)
    return _perlin(clean, sources, generator, method, cfg, return_info)


def _clean_draw(generator, b: int, fraction: float, device) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros(b, dtype=torch.bool, device=device)
    return _uniform(generator, b, device) < fraction


def _paper(clean, sources, generator, method, cfg, return_info):
    fn = gaaga if method == "gaaga" else adga
    res = fn(clean, sources, generator, return_info=return_info, **cfg.paper_options)
    out, mask = res[0], res[1]
    fraction = 0.0 if cfg.clean_fraction is None else float(cfg.clean_fraction)
    keep = _clean_draw(generator, clean.shape[0], fraction, clean.device)
    if fraction > 0:
        k = keep.view(-1, 1, 1, 1)
        out = torch.where(k, clean, out)
        mask = mask & ~k
    if not return_info:
        return out, mask
    return out, mask, {"clean": keep, "paper_info": res[2]}


def _perlin(clean, sources, generator, method, cfg, return_info):
    b, c, h, w = clean.shape
    dev = clean.device
    work_dtype = torch.float32 if clean.dtype in (torch.float16, torch.bfloat16) else clean.dtype
    x = clean.to(work_dtype)
    has_photos = sources is not None and isinstance(sources, torch.Tensor) and sources.numel() > 0
    if has_photos:
        if sources.dim() != 4 or sources.shape[1] != c:
            raise ValueError(f"synthesize: sources must be a [M, {c}, h, w] tensor, got {tuple(sources.shape)}")
        sources = sources.to(dev, work_dtype)
    fraction = 0.4 if cfg.clean_fraction is None else float(cfg.clean_fraction)
    softness = (0.0 if method == "gaaga" else 3.0) if cfg.softness is None else float(cfg.softness)
    gray = cfg.grayscale
    if gray is None:
        gray = c > 1 and all(torch.equal(x[:, i], x[:, 0]) for i in range(1, c)) if b else True

    # 1. per-image choices (small draws)
    keep = _clean_draw(generator, b, fraction, dev)
    mix = cfg.source_mix if has_photos else (0.0,) + tuple(cfg.source_mix[1:])
    if sum(mix) <= 0:
        raise ValueError("synthesize: source_mix gives all its weight to photos but no sources were given")
    kind = _categorical(_uniform(generator, b, dev), mix)
    shape = _categorical(_uniform(generator, b, dev), cfg.shape_mix)
    inten = kind == KINDS.index("intensity")
    shape = torch.where(inten, torch.zeros_like(shape), shape)
    side = (_uniform(generator, b, dev) * 4).floor().long().clamp(max=3)
    beta = cfg.opacity[0] + _uniform(generator, b, dev) * (cfg.opacity[1] - cfg.opacity[0])
    cov = torch.where(inten, _log_uniform(generator, cfg.intensity_coverage, b, dev),
                      torch.where(shape == 1, _log_uniform(generator, cfg.line_coverage, b, dev),
                                  _log_uniform(generator, cfg.coverage, b, dev)))

    # 2. masks: Perlin fields shaped per image, thresholded at the coverage quantile
    rng = lambda r: torch.tensor(r, dtype=torch.float64).to(dev, non_blocking=True)  # noqa: E731
    scales = torch.where(inten.view(-1, 1), rng(cfg.intensity_scale_range),
                         torch.where((shape == 1).view(-1, 1), rng(cfg.line_scale_range), rng(cfg.scale_range)))
    # NB: the fields are smooth at the scale of a pixel (>= 8 px per lattice cell by default), so they are
    # shaped at half resolution from 128 px up and resized bilinearly; the threshold is applied at full size.
    top = max(cfg.scale_range[1], cfg.line_scale_range[1], cfg.intensity_scale_range[1])
    f = 2 if min(h, w) >= 128 and min(h, w) / top >= 8 else 1
    lh, lw = -(-h // f), -(-w // f)
    noise = perlin_noise(b, lh, lw, generator, scale_range=scales, device=dev, dtype=work_dtype)
    envelope = perlin_noise(b, lh, lw, generator, scale_range=(2.0, 3.0), device=dev, dtype=work_dtype)
    along = torch.stack([_uniform(generator, b, dev), 0.1 + 0.3 * _uniform(generator, b, dev)], dim=1)
    fieldv = shape_noise(noise, envelope, shape, side, along)
    if f > 1:
        fieldv = torch.nn.functional.interpolate(fieldv, size=(h, w), mode="bilinear", align_corners=False)
    mask, thr = threshold_at_coverage(fieldv, cov)
    soft = torch.where(inten, torch.full_like(beta, cfg.intensity_softness), torch.full_like(beta, softness))
    alpha = mask.to(work_dtype)
    sel = ((soft > 0) & ~keep).nonzero().view(-1)  # NB: soft edges only where needed (per-pixel work)
    if sel.numel():
        alpha[sel] = soft_alpha(fieldv[sel], thr[sel], mask[sel], soft[sel].to(work_dtype))

    # 3. content per kind (one pass per kind, over the images of that kind only)
    content = x.clone()
    donor = torch.full((b,), -1, dtype=torch.int64, device=dev)
    source = torch.full((b,), -1, dtype=torch.int64, device=dev)
    for k, name in enumerate(KINDS):
        sel = ((kind == k) & ~keep).nonzero().view(-1)
        n = sel.numel()
        if n == 0:
            continue
        if name == "photo":
            u = _uniform(generator, n, dev)
            if method == "adga":
                src = select_sources(appearance(x[sel]).cpu(), appearance(sources).cpu(), u.cpu(),
                                     int(cfg.k_nearest)).to(dev, non_blocking=True)
            else:
                src = (u * sources.shape[0]).floor().long().clamp(max=sources.shape[0] - 1)
            source[sel] = src
            content[sel] = warp(sources, src, (h, w), generator, zoom_range=(0.25, 1.0))
        elif name == "texture":
            content[sel] = texture_content(n, c, (h, w), generator, device=dev, dtype=work_dtype, gray=gray)
        elif name == "cutpaste":
            d = donors(b, generator, dev)[sel]
            donor[sel] = d
            content[sel] = warp(x, d, (h, w), generator, zoom_range=(0.7, 1.4))
        else:
            content[sel] = intensity_content(x[sel], generator)
    # dark cracks and chipped edges: on magnetic tiles these show the shadow / the dark background
    u_dark, u_level = _uniform(generator, b, dev), _uniform(generator, b, dev).to(work_dtype).view(-1, 1, 1, 1)
    dark = ~keep & (((shape == 1) & (u_dark < cfg.dark_lines)) | ((shape == 2) & (u_dark < cfg.dark_edges)))
    sel = dark.nonzero().view(-1)
    if sel.numel():
        xs, lv = x[sel], u_level[sel]
        crack = xs - (0.3 + 0.5 * lv)
        chip = (-1.0 + 0.3 * lv) + 0.05 * (xs - xs.mean(dim=(1, 2, 3), keepdim=True))
        content[sel] = torch.where((shape[sel] == 1).view(-1, 1, 1, 1), crack, chip)
    if gray and c > 1:
        content = content.mean(dim=1, keepdim=True).expand(b, c, h, w)
    content = content.clamp(-1, 1)

    # 4. blend
    weight = (beta.to(work_dtype).view(-1, 1, 1, 1) * alpha) * (~keep).view(-1, 1, 1, 1).to(work_dtype)
    # NB: where weight is 0 (outside the mask, clean images) x + 0 * (content - x) is x bit for bit
    out = (x + weight * (content - x)).to(clean.dtype).contiguous()
    mask = mask & ~keep.view(-1, 1, 1, 1)
    if not return_info:
        return out, mask
    none = torch.full_like(kind, -1)
    info = {"clean": keep, "kind": torch.where(keep, none, kind), "shape": shape, "dark": dark,
            "beta": torch.where(keep, torch.zeros_like(beta), beta), "coverage": cov, "donor": donor,
            "source": source, "alpha": alpha * (~keep).view(-1, 1, 1, 1).to(alpha.dtype), "content": content}
    return out, mask, info
