"""Look at a trained model before changing it: figure grids per class and where its maps are hot.

Two questions come first when a detector fails on real photographs:

1. What does the model reconstruct, and what does the map show? :func:`draw_grid` writes one PNG
   per class (``<class>.png``): rows are that class's highest- and lowest-scoring images, columns
   are input, reconstruction, map (one colour scale per figure, with its colour bar) and the input
   with the ground-truth outline and the top-scoring pixels marked.
2. Where do the top-scoring pixels of defect-free images lie? :func:`location_stats` splits the
   image into the border band, the bands along the patch seams of the tiling grid and the interior,
   and puts the share of top pixels in each next to the share of the area it covers. A region
   holding far more top pixels than its area (e.g. 89 % of top pixels in a band that is 23 % of
   the image) is an artefact that sets the image score.

Regions (all in pixels of the map, side S):

- ``border``: within ``border`` px of the image edge.
- ``seam``: within ``seam`` px of a patch boundary of the tiling grid (patch edges at
  ``k * stride`` and ``k * stride + patch``), the image edge not counted; pixel ``i`` is near a
  boundary ``b`` (between pixels ``b - 1`` and ``b``) when ``b - seam <= i < b + seam``, in rows or
  columns. Border and seam overlap near the edge, so their shares can add up to more than 100 %.
- ``seam_only``: seam pixels outside the border band.
- ``interior``: neither border nor seam. ``border``, ``seam_only`` and ``interior`` partition the
  image.

Top pixels: per map the ``max(1, round(top * S * S))`` largest values (the same count as the image
score of :mod:`defect_fast.detect`), pooled over maps, of the maps the image score takes its top
values from: with the image context's band profile (runs since v6) the map drawn without the
profile's rows (``Detector.predict_batched(score_maps=True)``), so the red dots and the tables show
the pixels behind each score, not a band row the profile lit.

Command line (:func:`add_parser`, :func:`command`; ``python3 -m defect_fast.diagnose`` runs the same)::

    defect-fast diagnose RUN DATA --out DIR [--per-class 4] [--border 16] [--seam 3] [--top 0.001]
                         [--scale figure|row] [--map KIND] [--stride S] [--smooth PX] [--blend none|hann]
                         [--device auto] [--overwrite]

writes ``DIR/<class>.png`` and ``DIR/locations.json`` and prints the tables. ``DIR`` is an output
folder with a manifest (:class:`defect_fast.safety.OutputFolder`): new or empty, or, with
``--overwrite``, one defect-fast wrote (only its own files are replaced).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .safety import MAX_OUTPUT_STEM, atomic_open, atomic_write_text, short_stem, unique_names

__all__ = ["REGIONS", "add_parser", "command", "diagnose", "draw_grid", "figure_name", "figure_names", "format_table", "location_stats",
           "main", "rank_correlation", "rank_significant", "region_masks", "top_pixel_mask", "top_pixel_weights"]

#: Region names in the order they are reported.
REGIONS = ("border", "seam", "seam_only", "interior")


PredictFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def _boundaries(size: int, patch: int, stride: int) -> list[int]:
    """Patch edges of the tiling grid strictly inside (0, size)."""
    starts = range(0, max(1, size - patch + 1), stride)
    edges = {e for s in starts for e in (s, s + patch)}
    return sorted(e for e in edges if 0 < e < size)


def region_masks(size: int, patch: int, stride: int | None = None, border: int = 16, seam: int = 3) -> dict[str, torch.Tensor]:
    """The regions of a square map of side ``size`` (see the module docstring).

    Args:
        size: map side S.
        patch: patch side of the tiling grid.
        stride: step of the grid (default ``patch``).
        border: width of the border band in px (0: empty band).
        seam: half-width of the band around each patch boundary in px (0: empty).

    Returns:
        {"border", "seam", "seam_only", "interior"}: bool [S, S] each.
    """
    stride = patch if stride is None else stride
    if size <= 0 or patch <= 0 or stride <= 0:
        raise ValueError(f"size, patch and stride must be positive, got size={size}, patch={patch}, stride={stride}")
    if border < 0 or seam < 0:
        raise ValueError(f"border and seam must be >= 0, got border={border}, seam={seam}")
    idx = torch.arange(size)
    edge = (idx < border) | (idx >= size - border)
    near = torch.zeros(size, dtype=torch.bool)
    for b in _boundaries(size, patch, stride):
        near |= (idx >= b - seam) & (idx < b + seam)
    border_m = edge[:, None] | edge[None, :]
    seam_m = near[:, None] | near[None, :]
    return {
        "border": border_m,
        "seam": seam_m,
        "seam_only": seam_m & ~border_m,
        "interior": ~(border_m | seam_m),
    }


def top_pixel_weights(maps: torch.Tensor, top: float = 0.001) -> torch.Tensor:
    """maps [N, H, W] -> float [N, H, W]: each map's ``k = max(1, round(top * H * W))`` largest
    pixels weighted 1, and the pixels tied with the k-th sharing what is left of k (each map weighs
    k in all). ``topk`` broke ties by position: a flat map, or a plateau, gave its first rows, the
    border band, every top pixel; counting every tied pixel as a whole one instead made a flat map
    outweigh a thousand others."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
    if not 0 < top <= 1:
        raise ValueError(f"top must be in (0, 1], got {top}")
    n, h, w = maps.shape
    flat = maps.reshape(n, h * w).float()
    k = max(1, int(round(h * w * top)))
    if not n:
        return torch.zeros(n, h, w)
    kth = flat.topk(k, dim=1).values[:, -1:]
    above, tied = flat > kth, flat == kth
    share = (k - above.sum(1, keepdim=True)).float() / tied.sum(1, keepdim=True).clamp_min(1).float()
    return (above.float() + tied.float() * share).reshape(n, h, w)


def top_pixel_mask(maps: torch.Tensor, top: float = 0.001) -> torch.Tensor:
    """maps [N, H, W] -> bool [N, H, W]: the pixels :func:`top_pixel_weights` counts (the largest
    ``max(1, round(top * H * W))`` of each map and every pixel tied with the last of them)."""
    return top_pixel_weights(maps, top) > 0


def _shares(top: torch.Tensor, regions: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Weighted top pixels [n, H, W] -> the share of their weight in each region."""
    total = float(top.sum())
    return {r: (float((top * m).sum()) / total if total else math.nan) for r, m in regions.items()}


def location_stats(
    maps: torch.Tensor,
    patch: int,
    stride: int | None = None,
    border: int = 16,
    seam: int = 3,
    top: float = 0.001,
    *,
    labels: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    score_maps: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Where the top-scoring pixels of anomaly maps lie: border band, patch seams, interior.

    Args:
        maps: float [N, S, S] anomaly maps (larger = more anomalous).
        patch, stride: the tiling grid the maps were made on (stride default ``patch``).
        border, seam: region widths in px (see :func:`region_masks`).
        top: fraction of each map's pixels counted as top pixels (see :func:`top_pixel_mask`).
        labels: int [N], 0 = defect-free, 1 = defective; None: all maps are defect-free.
        masks: bool [N, S, S] ground truth for the defective maps (optional).
        classes: class name per map (optional; per-class results for defective maps).
        score_maps: float [N, S, S], the maps the image scores take their top values from when
            they are not ``maps`` (:meth:`Detector.predict_batched`, ``score_maps=True``): the top
            pixels are theirs; ``mean_value`` stays that of ``maps``.

    Returns:
        {"settings": {size, patch, stride, border, seam, top, top_pixels_per_map},
         "area": {region: share of the image area},
         "good": {"images", "top_pixels", "share": {region: share of top pixels},
                  "ratio": {region: share / area}, "mean_value": {region: mean map value}},
         "defective": None or the same keys plus "in_mask" (share of top pixels inside the mask),
                  "mask_area" (share of those images' pixels inside the mask) when masks are given,
         "per_class": {class: {"images", "share", "in_mask", "mask_area"}} for defective classes}.
        Shares over an empty set are nan.
    """
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"maps must be square [N, S, S], got shape {tuple(maps.shape)}")
    stride = patch if stride is None else stride
    n, size = maps.shape[0], maps.shape[1]
    maps = maps.detach().float().cpu()
    lab = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels).reshape(-1).long().cpu()
    if lab.numel() != n:
        raise ValueError(f"{n} maps but {lab.numel()} labels")
    if masks is not None:
        masks = torch.as_tensor(masks).to(torch.bool).cpu()
        if tuple(masks.shape) != tuple(maps.shape):
            raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} must have the same shape")
    if classes is not None and len(classes) != n:
        raise ValueError(f"{n} maps but {len(classes)} class names")
    if score_maps is not None and tuple(score_maps.shape) != tuple(maps.shape):
        raise ValueError(f"score_maps {tuple(score_maps.shape)} and maps {tuple(maps.shape)} must have the same shape")

    regions = region_masks(size, patch, stride, border, seam)
    area = {r: float(m.float().mean()) for r, m in regions.items()}
    tops = top_pixel_weights(maps if score_maps is None else score_maps.detach().float().cpu(), top)

    def group(sel: torch.Tensor, with_values: bool) -> dict[str, Any]:
        t = tops[sel]
        share = _shares(t, regions)
        out: dict[str, Any] = {
            "images": int(sel.sum()),
            "top_pixels": int(round(float(t.sum()))),
            "share": share,
            "ratio": {r: (share[r] / area[r] if area[r] > 0 else math.nan) for r in regions},
        }
        if with_values:
            m = maps[sel]
            out["mean_value"] = {r: (float(m[:, reg].mean()) if m.shape[0] and reg.any() else math.nan) for r, reg in regions.items()}
        if masks is not None:
            g = masks[sel]
            out["in_mask"] = float((t * g).sum()) / float(t.sum()) if float(t.sum()) else math.nan
            out["mask_area"] = float(g.float().mean()) if g.numel() else math.nan
        return out

    good = lab == 0
    result: dict[str, Any] = {
        "settings": {"size": size, "patch": patch, "stride": stride, "border": border, "seam": seam, "top": top,
                     "top_pixels_per_map": max(1, int(round(size * size * top)))},
        "area": area,
        "good": group(good, True),
        "defective": group(~good, True) if bool((~good).any()) else None,
        "per_class": {},
    }
    if classes is not None:
        names = np.asarray(list(classes), dtype=object)
        for cls in sorted({c for c, y in zip(classes, lab.tolist()) if y != 0}):
            sel = torch.from_numpy(names == cls) & ~good
            g = group(sel, False)
            result["per_class"][cls] = {k: g[k] for k in ("images", "share", "in_mask", "mask_area") if k in g}
    return result


#: Fewest pairs a rank correlation is given for: over 2 it is +1 or -1 whatever they hold.
MIN_RANK_PAIRS = 3
#: Up to this many pairs, :func:`rank_significant` tests exactly, over every order of the ranks (9! =
#: 362,880); above, by Student's t approximation of Spearman's rho.
EXACT_RANK_PAIRS = 9
#: The two-sided level at which a correlation is said to be significant.
RANK_ALPHA = 0.01
#: The text saying which test :func:`rank_significant` is, for the lines that use it.
RANK_TEST = f"by an exact permutation test up to {EXACT_RANK_PAIRS} images, Student's t approximation above"


@functools.lru_cache(maxsize=None)
def _orders(n: int) -> np.ndarray:
    """Every order of range(n), [n!, n] (9! = 362,880 rows, 26 MB at n = 9)."""
    import itertools

    return np.array(list(itertools.permutations(range(n))), dtype=np.int64)


def rank_significant(rho: float, n: int, pairs: tuple[Any, Any] | None = None) -> bool:
    """Whether a rank correlation ``rho`` over ``n`` pairs differs from 0 at p <= 0.01 (two-sided):
    exactly, over every order of the ranks, up to :data:`EXACT_RANK_PAIRS` pairs (of n untied
    ranks; of the ranks of ``pairs``, the two [n] sequences rho was measured on, when given: tied
    values, identical blank frames or two lighting levels, reach rho values the untied orders
    rarely do; rho = 1 over 7 untied has p = 0.0004, over 5 p = 0.017: never significant); above,
    by Student's t approximation (t = rho sqrt((n - 2) / (1 - rho^2)), n - 2 degrees of freedom;
    at 10 pairs it takes exact p values up to about 0.013 for significant). The normal
    approximation it replaces could call no set of 7 or fewer significant."""
    if not math.isfinite(rho) or n < MIN_RANK_PAIRS:
        return False
    r = min(abs(rho), 1.0)
    if n <= EXACT_RANK_PAIRS:
        from scipy.stats import rankdata

        # the ranks of the pairs given, ties at their average; else n untied ranks
        rx, ry = ((rankdata(np.asarray(v, dtype=np.float64).reshape(-1)) for v in pairs) if pairs is not None
                  else (np.arange(n, dtype=np.float64),) * 2)
        if rx.size != n or ry.size != n:
            raise ValueError(f"pairs of {rx.size} and {ry.size} values for n = {n}")
        dx, dy = rx - rx.mean(), ry - ry.mean()
        rhos = np.abs(dy[_orders(n)] @ dx) / (np.linalg.norm(dx) * np.linalg.norm(dy))  # y's ranks in every order
        return bool((rhos >= r - 1e-12).mean() <= RANK_ALPHA)  # the share of orders at least as far from 0
    from scipy.stats import t as student_t

    if r >= 1.0:
        return True
    return bool(2 * student_t.sf(r * math.sqrt((n - 2) / (1 - r * r)), n - 2) <= RANK_ALPHA)


def rank_correlation(a, b) -> float:
    """Spearman rank correlation of two [N] sequences (tied values take their average rank); nan
    if N < 2 or either is constant."""
    from scipy.stats import rankdata

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"{x.size} values against {y.size}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    # (ranked by position, ties of identical frames, blank ones, agreed with each other perfectly:
    # 10 black frames beside 5 parts gave -0.40 where the scores follow the brightness at -0.98)
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _hwc(images: torch.Tensor) -> np.ndarray:
    """[3, S, S] uint8, or float in [-1, 1] -> [S, S, 3] uint8."""
    if images.dtype != torch.uint8:
        from .data.dataset import from_model_range

        images = from_model_range(images.float())
    img = images.cpu().numpy()
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return np.transpose(img, (1, 2, 0))


def _pick_rows(scores: np.ndarray, members: np.ndarray, per_class: int) -> list[int]:
    """Indices of the highest- then lowest-scoring ``per_class`` members, highest score first."""
    order = members[np.argsort(-scores[members], kind="stable")]
    if order.size <= per_class:
        return order.tolist()
    hi = (per_class + 1) // 2
    lo = per_class - hi
    return order[:hi].tolist() + (order[order.size - lo:].tolist() if lo else [])


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep or "class"


def figure_name(cls: str) -> str:
    """File name of a class's figure grid (``<class>.png``, unsafe characters replaced; a stem
    over :data:`~defect_fast.safety.MAX_OUTPUT_STEM` bytes cut, with a digest of the whole name so
    that two long names stay apart: :func:`~defect_fast.safety.short_stem`, as ``predict`` names
    its maps; with a ``_k`` suffix, ``.png`` and the temporary's ``.NAME.png.XXXXXXXX.tmp`` it
    stays under the 255 bytes of a file name: a 228-character class folder failed at its figure's
    temporary file, after all the inference)."""
    return f"{short_stem(_safe_name(cls), MAX_OUTPUT_STEM)}.png"


def figure_names(classes) -> dict[str, str]:
    """Each class's figure file, one per class: :func:`figure_name`, and ``_2``, ``_3``... when
    two classes would share one ("oil spot" and "oil_spot", names that differ in case or only in an
    undecodable byte; the second figure replaced the first); a class whose name is the file's
    keeps it (:func:`~defect_fast.safety.unique_names`: "oil spot" took ``oil_spot.png``)."""
    ordered = sorted(set(classes), key=lambda c: (c != "good", c))
    bases = [figure_name(c)[:-4] for c in ordered]
    return {c: f"{name}.png" for c, name in zip(ordered, unique_names(bases, own=[b == c for b, c in zip(bases, ordered)]))}


def _shown(text: str) -> str:
    """A name as a figure can draw it: one that is not UTF-8 (surrogate escapes) escaped, and its
    dollar signs, which matplotlib reads as the bounds of mathematics (``x_$^$.png`` failed the
    figure after all the inference; ``price$5$.png`` lost them)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("$", r"\$")


def _short(text: str, most: int = 28) -> str:
    """``text`` shortened in the middle to at most ``most`` characters (both ends kept: a file's
    name and its extension)."""
    if len(text) <= most:
        return text
    head = (most - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (most - 1 - head):]


def draw_grid(
    images: torch.Tensor,
    recon: torch.Tensor | Callable[[list[int]], torch.Tensor],
    maps: torch.Tensor,
    scores: torch.Tensor,
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    masks: torch.Tensor | None = None,
    per_class: int = 4,
    top: float = 0.001,
    patch: int | None = None,
    stride: int | None = None,
    scale: str = "figure",
    score_maps: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write one PNG figure grid per class, ``out_dir/<class>.png``.

    Rows: the class's ``ceil(per_class / 2)`` highest- and ``floor(per_class / 2)`` lowest-scoring
    images (all of them when the class has fewer), highest first; the row title gives the image's
    index, its file name (``names``) and its score. Columns: input; reconstruction; map
    (colour-mapped on one scale shared by the figure's rows, from 0 (or the lowest shown value, where a standardised map goes below
    0) to the largest shown value, colour bar beside it); input with the ground-truth outline
    (yellow) and the map's top ``top`` pixels (red dots), with the patch grid drawn faintly when
    ``patch`` is given. ``scale="row"`` gives each row its own colour scale (from 0, or the map's
    lowest value below it, to its maximum, both printed beside it) instead, for maps whose ranges
    differ by orders of magnitude.

    Args:
        images: uint8 [N, 3, S, S].
        recon: [N, 3, S, S] in [-1, 1] (uint8 also accepted), or a function of a list of k image
            indices returning their [k, 3, S, S] (only the drawn rows are reconstructed).
        maps: float [N, S, S].
        scores: float [N] image scores.
        classes: class name per image.
        out_dir: created if missing.
        masks: bool [N, S, S] ground truth (optional).
        per_class: rows per figure (>= 1).
        scale: "figure" (one colour scale and bar per figure) or "row" (one per row).
        score_maps: float [N, S, S], the maps the scores take their top values from when they are
            not ``maps`` (see :func:`location_stats`): the red dots are their top pixels.
        names: a name per image (e.g. its file name), shown in its row's title, shortened in the
            middle beyond 28 characters (None: the index alone).

    Returns:
        {class: path of its PNG}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = images.shape[0]
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if scale not in ("figure", "row"):
        raise ValueError(f"scale must be 'figure' or 'row', got {scale!r}")
    for name, t in (("recon", recon), ("maps", maps), ("scores", scores), ("score_maps", score_maps)):
        if t is not None and not callable(t) and t.shape[0] != n:
            raise ValueError(f"{n} images but {t.shape[0]} {name}")
    if len(classes) != n:
        raise ValueError(f"{n} images but {len(classes)} class names")
    if names is not None and len(names) != n:
        raise ValueError(f"{n} images but {len(names)} names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sc = scores.detach().float().cpu().numpy().reshape(-1)
    class_of = np.asarray(list(classes), dtype=object)
    tops = top_pixel_mask((maps if score_maps is None else score_maps).detach().float().cpu(), top)
    size = maps.shape[-1]
    grid = _boundaries(size, patch, stride or patch) if patch else []
    written: dict[str, Path] = {}
    files = figure_names(classes)
    for cls in files:
        rows = _pick_rows(sc, np.flatnonzero(class_of == cls), per_class)
        shown = maps[rows].detach().float().cpu()
        rec = recon(rows) if callable(recon) else recon[rows]
        vmax = float(shown.max()) if shown.numel() else 1.0
        vmin = min(0.0, float(shown.min()))
        vmax = vmax if vmax > vmin else vmin + 1.0
        fig = Figure(figsize=(4 * 2.4 + 0.9, len(rows) * 2.45 + 0.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(rows), 4, squeeze=False)
        im = None
        for r, i in enumerate(rows):
            ax_in, ax_rec, ax_map, ax_ov = axes[r]
            inp = _hwc(images[i])
            ax_in.imshow(inp)
            ax_rec.imshow(_hwc(rec[r]))
            m = maps[i].detach().float().cpu()
            lo, hi = (vmin, vmax) if scale == "figure" else (min(0.0, float(m.min())), float(m.max()))
            hi = hi if hi > lo else lo + 1.0  # a map of one value: drawn (and labelled) on a scale of 1
            im = ax_map.imshow(m.numpy(), cmap="inferno", vmin=lo, vmax=hi)
            ax_ov.imshow(inp)
            for b in grid:
                ax_ov.axhline(b - 0.5, color="cyan", lw=0.4, alpha=0.5)
                ax_ov.axvline(b - 0.5, color="cyan", lw=0.4, alpha=0.5)
            if masks is not None and bool(masks[i].any()):
                ax_ov.contour(masks[i].cpu().numpy().astype(np.float32), levels=[0.5], colors="yellow", linewidths=1.0)
            ys, xs = np.nonzero(tops[i].numpy())
            ax_ov.scatter(xs, ys, s=4, c="red", marker="s", linewidths=0)
            title = f"#{i}  " if names is None else f"#{i} {_shown(_short(str(names[i])))}\n"
            ax_in.set_ylabel(f"{title}score {sc[i]:.4g}", fontsize=8)
            ax_map.set_ylabel(f"max {float(maps[i].max()):.3g}" if scale == "figure" else f"scale {lo:.3g}..{hi:.3g}",
                              fontsize=8)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        for ax, title in zip(axes[0], ("input", "reconstruction", (f"map (scale {vmin:.3g}..{vmax:.3g})" if scale == "figure" else "map (own scale per row)"),
                                       f"mask (yellow), top {top * 100:g} % px (red)")):
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"{_shown(cls)}: {len(rows)} of {int((class_of == cls).sum())} images (highest and lowest scores)", fontsize=10)
        if im is not None and scale == "figure":
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(1.0, 0.9 / max(1, len(rows)) + 0.3), label="map value")
        path = out / files[cls]
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=90)
        written[cls] = path
    return written


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f} %"


def format_table(stats: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> str:
    """Plain-text tables of :func:`location_stats` (and of :func:`defect_fast.metrics.evaluate`)."""
    s = stats["settings"]
    labels = {"border": f"border band {s['border']} px", "seam": f"patch seams +-{s['seam']} px",
              "seam_only": "  seams outside border", "interior": "interior"}
    lines = [f"patch {s['patch']}, stride {s['stride']}, map {s['size']}x{s['size']}; "
             f"top {s['top'] * 100:g} % = {s['top_pixels_per_map']} px per map"]
    groups = [("good", stats["good"])] + ([("defective", stats["defective"])] if stats.get("defective") else [])
    head = f"{'region':<24} {'area':>8}" + "".join(f" {g + ' top px':>16} {'ratio':>6}" for g, _ in groups)
    lines += [head, "-" * len(head)]
    for r in REGIONS:
        row = f"{labels[r]:<24} {_pct(stats['area'][r]):>8}"
        for _, g in groups:
            ratio = g["ratio"][r]
            row += f" {_pct(g['share'][r]):>16} {('n/a' if math.isnan(ratio) else f'{ratio:.2f}x'):>6}"
        lines.append(row)
    lines.append(f"({stats['good']['images']} defect-free maps" +
                 (f", {stats['defective']['images']} defective" if stats.get("defective") else "") +
                 "; border and seam overlap, so their shares can sum past 100 %)")
    d = stats.get("defective")
    if d and "in_mask" in d:
        lines.append(f"defective images: {_pct(d['in_mask']).strip()} of top pixels inside the mask "
                     f"(the mask covers {_pct(d['mask_area']).strip()} of their area)")
    rho = stats["good"].get("score_vs_brightness")
    if rho is not None:
        n = stats["good"]["images"]
        if n < MIN_RANK_PAIRS:
            said = f"n/a ({n} image{'' if n == 1 else 's'}; it needs {MIN_RANK_PAIRS})"
        elif math.isnan(rho):
            said = f"n/a ({n} images; the scores or the brightness are all the same)"
        else:
            significant = stats["good"].get("score_vs_brightness_significant")
            said = (f"{rho:+.2f} ({n} images; {'' if significant else 'not '}significant at p <= 0.01 "
                    f"{RANK_TEST})")
        lines.append(f"defect-free images: rank correlation of image score with mean brightness {said}")
    if stats.get("per_class"):
        lines.append("")
        lines.append(f"{'class':<12} {'images':>6} {'in mask':>8} {'mask area':>9} {'border':>8} {'seam':>8} {'interior':>8}")
        for cls, c in stats["per_class"].items():
            lines.append(f"{cls:<12} {c['images']:>6} {_pct(c.get('in_mask')):>8} {_pct(c.get('mask_area')):>9} "
                         f"{_pct(c['share']['border']):>8} {_pct(c['share']['seam']):>8} {_pct(c['share']['interior']):>8}")
    if metrics:
        lines.append("")
        lines.append(f"{'class':<12} {'pixel AUROC':>11} {'image AUROC':>11} {'AUPRO':>7}")
        rows = [("all", metrics)] + list(metrics.get("per_class", {}).items())
        for cls, m in rows:
            f = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
            lines.append(f"{cls:<12} {f(m['pixel_auroc']):>11} {f(m['image_auroc']):>11} {f(m['aupro']):>7}")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# Whole diagnosis
# --------------------------------------------------------------------------------------------


def diagnose(
    predict_fn: PredictFn,
    test_set,
    out_dir: str | os.PathLike,
    *,
    patch: int,
    stride: int | None = None,
    per_class: int = 4,
    border: int = 16,
    seam: int = 3,
    top: float = 0.001,
    scale: str = "figure",
    log: Callable[[str], None] | None = print,
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict a test set, draw the per-class grids, write ``locations.json`` and print the tables.

    Args:
        predict_fn: uint8 images [n, 3, S, S] -> {"maps": [n, S, S], "scores": [n]} and optionally
            "recon": [n, 3, S, S] in [-1, 1] and "score_maps": [n, S, S], the maps the scores take
            their top values from, whose top pixels are then marked and counted (e.g.
            ``Detector.predict_batched(..., score_maps=True)``).
        test_set: a :class:`defect_fast.data.TestSet` (images, masks, labels, classes).
        out_dir: folder for ``<class>.png`` and ``locations.json`` (created if missing).
        patch, stride: the predictor's tiling grid (stride default ``patch``).
        per_class, border, seam, top, scale: see :func:`draw_grid` and :func:`location_stats`.
        log: where the tables go (None: nowhere).
        reconstruct: uint8 [k, 3, S, S] -> [k, 3, S, S] in [-1, 1] (e.g. ``Detector.reconstruct``),
            run on the drawn rows only; needed when ``predict_fn`` returns no "recon".
        inference: how ``predict_fn`` makes its maps (e.g. {"map", "smooth_sigma", "blend"}), added
            to ``locations.json``'s "settings" so that a file says which maps it describes.

    Returns:
        {"locations": :func:`location_stats` result (plus ``good.score_vs_brightness``, the rank
        correlation of defect-free image scores with their mean brightness, nan under
        :data:`MIN_RANK_PAIRS` images, and ``good.score_vs_brightness_significant``, whether it
        differs from 0 at p <= 0.01, None without it), "metrics": :func:`defect_fast.metrics.evaluate`
        result or None (no defective image with a mask), "figures": {class: path}, "table": str}.
    """
    from . import metrics as M
    from .evaluate import check_finite

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_fn(test_set.images)
    maps, scores = pred["maps"].float().cpu(), pred["scores"].float().cpu()
    score_maps = pred["score_maps"].float().cpu() if "score_maps" in pred else None
    # before any statistic: a NaN map was an internal error, a NaN score a rank correlation of NaN
    names = [str(p) for p in test_set.paths]
    check_finite({"maps": maps, "scores": scores}, names, None, None, "test images")
    if score_maps is not None:  # apart: the two concatenated were a copy of every map
        check_finite({"maps": score_maps}, names, None, None, "test images")
    if "recon" in pred:
        recon = pred["recon"].cpu()
    elif reconstruct is not None:
        recon = lambda rows: reconstruct(test_set.images[rows]).cpu()  # noqa: E731
    else:
        raise ValueError("diagnose: the predictor returns no reconstructions and no reconstruct function was given")
    if tuple(maps.shape) != tuple(test_set.masks.shape):
        raise ValueError(f"predictor returned maps {tuple(maps.shape)} for images {tuple(test_set.images.shape)}")
    labels, masks = test_set.labels, test_set.masks
    has_masks = bool(masks[labels != 0].any()) if bool((labels != 0).any()) else False
    stats = location_stats(maps, patch, stride, border, seam, top, labels=labels,
                           masks=masks if has_masks else None, classes=test_set.classes, score_maps=score_maps)
    stats["settings"].update(inference or {})
    good = labels == 0
    # per chunk: a float copy of every image at once was 4x the images (3 GB for 1000 at 512 px)
    brightness = torch.cat([c.float().mean(dim=(1, 2, 3)) for c in test_set.images.split(64)])
    # over 2 images it is +1 or -1 whatever they hold: none given
    n_good = int(good.sum())
    rho = rank_correlation(scores[good], brightness[good]) if n_good >= MIN_RANK_PAIRS else math.nan
    stats["good"]["score_vs_brightness"] = rho
    stats["good"]["score_vs_brightness_significant"] = (rank_significant(rho, n_good, (scores[good], brightness[good]))
                                                        if math.isfinite(rho) else None)
    # pixel metrics need defective images with masks only (image AUROC is nan without good images, as in evaluate);
    # without masks, the image-level ones from the folder labels, as evaluate gives them
    if has_masks:
        metrics = M.evaluate(maps, masks, scores, labels, test_set.classes)
    elif bool((labels != 0).any()) and bool((labels == 0).any()):
        from .evaluate import image_level_metrics

        metrics = image_level_metrics(scores, labels, list(test_set.classes))
        if getattr(test_set, "has_masks", False):
            metrics["pixel_metrics"] = "none: the masks of the defective images hold no defect pixel"
    else:
        metrics = None
    figures = draw_grid(test_set.images, recon, maps, scores, test_set.classes, out, masks=masks if has_masks else None,
                        per_class=per_class, top=top, patch=patch, stride=stride, scale=scale, score_maps=score_maps,
                        names=[Path(p).name for p in test_set.paths])
    table = format_table(stats, metrics)
    doc = {"locations": stats, "metrics": metrics, "figures": {c: p.name for c, p in figures.items()},
           "images": [str(p) for p in test_set.paths], "scores": scores.tolist()}
    atomic_write_text(out / "locations.json", json.dumps(_jsonable(doc), indent=1) + "\n")
    result = {"locations": stats, "metrics": metrics, "figures": figures, "table": table}
    if log is not None:
        _log_result(result, out, log)
    return result


def _log_result(result: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    """The tables of a :func:`diagnose` result and where its files are."""
    log(result["table"])
    metrics = result["metrics"]
    if metrics and metrics.get("pixel_metrics"):  # why the table's pixel metrics are n/a, as evaluate says it
        log(f"pixel metrics: {metrics['pixel_metrics']}")
    log(f"figures and locations.json in {out}")


def add_parser(subparsers) -> None:
    """Register ``defect-fast diagnose`` on the CLI's sub-parsers (``command`` as its function)."""
    from .cli import add_inference_options
    from .safety import device_arg, input_path, nonneg_int, output_path

    p = subparsers.add_parser(
        "diagnose", help="figure grid per class and where the top-scoring pixels of defect-free images lie",
        description="Figure grid per class (input, reconstruction, map, mask) and where the top-scoring pixels of "
                    "defect-free images lie (border band, patch seams, interior); writes DIR/<class>.png and "
                    "DIR/locations.json and prints the tables.")
    p.add_argument("run", type=input_path, help="run folder holding model.pt, or a model file")
    p.add_argument("data", type=input_path, help="MVTec-style dataset root (test/<class>/, ground_truth/<class>/)")
    p.add_argument("--out", required=True, type=output_path, help="output folder for <class>.png and locations.json (new or empty)")
    p.add_argument("--per-class", type=_per_class, default=4, help="rows per class figure: highest and lowest scores "
                   f"(default 4, at most {MAX_PER_CLASS})")
    p.add_argument("--border", type=nonneg_int, default=16, help="border band width in px (default 16)")
    p.add_argument("--seam", type=nonneg_int, default=3, help="half-width of the band around patch seams in px (default 3)")
    p.add_argument("--top", type=_top_fraction, default=0.001,
                   help="fraction of each map's pixels counted as top pixels, in (0, 1] (default 0.001)")
    p.add_argument("--scale", choices=("figure", "row"), default="figure",
                   help="map colour scale: one per figure (default) or one per row")
    add_inference_options(p)
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="replace the files an earlier diagnose wrote in --out")
    p.set_defaults(func=command)


#: Most rows of a class figure: a figure's layout time grows with the square of its rows (14 s at
#: 80 rows, 61 s at 160, over 300 s at 300), and it is drawn after all the inference.
MAX_PER_CLASS = 50


def _per_class(text: str) -> int:
    """argparse type: a whole number from 1 to :data:`MAX_PER_CLASS`."""
    from .safety import positive_int

    v = positive_int(text)
    if v > MAX_PER_CLASS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PER_CLASS} (rows of one figure), got {text!r}")
    return v


def _top_fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return v


def command(args) -> int:
    """``defect-fast diagnose``: load the run and the test split, then :func:`diagnose` into ``--out``."""
    from .data import DataError, load_test_set
    from .detect import Detector
    from .safety import OutputFolder

    run, data = Path(args.run), Path(args.data)
    if not run.exists():
        raise DataError(f"{run}: no such run folder or model file")
    OutputFolder.check(args.out, overwrite=args.overwrite, inputs=[run, data], command="diagnose")  # refuse before any work
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise DataError(f"diagnose needs matplotlib for its figures ({exc}); pip install matplotlib") from None
    from .runs import load_model_file

    state, _sha = load_model_file(run)  # read once: the Detector and the check of the images the run has seen
    det = Detector.from_state(state, args.device, args.map, args.stride, args.smooth, where=run, blend=args.blend)
    bands = region_masks(det.image_size, det.patch, det.stride, args.border, args.seam)
    for flag, width, band in (("--border", args.border, "border"), ("--seam", args.seam, "seam")):
        if bool(bands[band].all()):  # a band over the whole map says nothing of where top pixels lie
            from .safety import UsageError

            raise UsageError(f"{flag} {width}: a band that wide covers the whole {det.image_size} x {det.image_size} map "
                             f"of {run} (patches of {det.patch} at stride {det.stride}); give a narrower one")
    test_set = load_test_set(data, det.image_size, require_masks=False)  # where the top pixels lie needs no masks
    from .evaluate import seen_test_images

    # its AUROC table is optimistic on images the run trained on: said, as evaluate and report say it
    seen_test_images(state, test_set.images, test_set.paths, run, thresholds_used=False)
    det.check_proportions(test_set.sizes, test_set.paths, data / "test")  # stretched otherwise: said, as evaluate does
    names = sorted(figure_names(test_set.classes).values()) + ["locations.json"]
    # every figure and the statistics made in a temporary folder first: an error or a stop on the way
    # leaves an earlier diagnosis in --out as it was (--overwrite cleared it before the work began)
    with tempfile.TemporaryDirectory(prefix="defect_fast-diagnose-") as staged:
        # (the maps the scores come from only where they are other maps: else a copy of every map)
        res = diagnose(lambda x: det.predict_batched(x, score_maps=det.scores_from_other_maps), test_set, staged, patch=det.patch,
                       stride=det.stride, per_class=args.per_class, border=args.border, seam=args.seam, top=args.top,
                       scale=args.scale, log=None, reconstruct=det.reconstruct,
                       inference={"map": det.map_kind, "smooth_sigma": det.smooth_sigma, "blend": det.blend})
        made = sorted(p.name for p in Path(staged).iterdir())
        if sorted(names) != made:  # what the folder records is what was written
            raise RuntimeError(f"diagnose wrote {made}, expected {sorted(names)}")
        # a user's file at one of the names: refused before an earlier diagnosis is cleared
        folder = OutputFolder.create(Path(args.out).absolute(), overwrite=args.overwrite, inputs=[run, data], lock=True,
                                     command="diagnose", names=names)
        with folder.writing():  # an error or Ctrl-C removes what this diagnosis began (and a folder it made)
            folder.reserve(names)
            for name in names:
                folder.write_bytes(name, (Path(staged) / name).read_bytes())
    _log_result(res, folder.path, print)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m defect_fast.diagnose RUN DATA --out DIR [options]``: the ``defect-fast diagnose`` command;
    returns the exit status (2 = bad input or arguments)."""
    from .cli import main as cli_main
    from .safety import run_main

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_main(lambda a: cli_main(["diagnose", *a]), args)
    except SystemExit as exc:  # argparse's own exit on a bad option
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
