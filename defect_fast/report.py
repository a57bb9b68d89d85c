"""One self-contained HTML page an engineer can open: metrics, curves, score histogram, gallery.

Everything is inlined (images as base64 PNG, CSS in the page, no script, no network), so the
file can be mailed or archived on its own. Sections (element ids):

    summary     model, threshold and where it came from, counts
    metrics     (ground truth only) pixel/image AUROC, AUPRO, pixel F1-max overall and per class;
                the F1-optimal image threshold; false-alarm and miss rates at the threshold in use,
                and at each one ``--far`` could set from the run's held-back scores
    curves      (ground truth only) image-level ROC and precision-recall curves, the operating point
                of the threshold marked
    histogram   image scores, good vs defective (or all images without ground truth), threshold line
    gallery     images sorted by score (highest first): input, reconstruction, map, overlay and the
                mask when one exists; false alarms and misses marked; the maps' colour scale, with
                the pixel threshold marked on it

Plots use matplotlib's Agg canvas directly (pyplot's global backend is left alone).

:func:`write_report` takes predictions already made; :func:`report_from_data` reads a folder (an
MVTec-style root with ``test/`` and ``ground_truth/``, or a plain folder of images), runs a
predict function on it and writes the page.

Command line (:func:`add_parser`, :func:`command`)::

    defect-fast report RUN DATA --out report.html [--threshold T | --far RATE] [--max-gallery 60] [--title TEXT]
                       [--batch-size N] [--device auto] [--overwrite]

The threshold is the model file's (:func:`defect_fast.calibration.stored_thresholds`) unless
``--threshold`` gives one or ``--far`` asks for another false-alarm rate; an existing file is
replaced only with ``--overwrite``, never when it is one of the inputs.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .calibration import ModelInfo, f1_optimal_threshold, operating_points, rates_at, threshold_text
from .safety import OutputRefused, atomic_write_bytes

__all__ = ["SECTIONS", "add_parser", "command", "report_from_data", "write_report"]

#: Element ids of the page's sections, in order (metrics and curves only with ground truth).
SECTIONS = ("summary", "metrics", "curves", "histogram", "gallery")

_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.plots img{max-width:48%;margin-right:1%}
.card{display:inline-block;vertical-align:top;margin:6px;padding:6px;border:3px solid #ddd;border-radius:4px}
.card.fail{border-color:#e69500}.card.fa{border-color:#d62728;background:#fde8e8}
.card.miss{border-color:#7b3fbf;background:#efe6fb}
.card img{width:var(--thumb);height:var(--thumb);image-rendering:pixelated;margin:1px}
.cap{font-size:12px;max-width:calc(5 * var(--thumb) + 10px);word-break:break-all}
.tag{font-weight:bold;padding:0 4px;color:#fff;border-radius:3px}.tag.fa{background:#d62728}
.tag.miss{background:#7b3fbf}.tag.fail{background:#e69500}.tag.pass{background:#2ca02c}.tag.blank{background:#888}
.note{color:#555;font-size:13px}
.note img.legend{width:256px;height:12px;margin:2px 8px 2px 0;border:1px solid #999;vertical-align:middle}
"""


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_png_uri(save: Callable[[Any], None]) -> str:
    """Run a visualize.save_* writer into memory (PIL picks the format from the name)."""
    buf = io.BytesIO()
    buf.name = "x.png"
    save(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _score_text(score: float, threshold: float | None) -> str:
    """A score to 5 significant digits, or to as few more as keep it on its side of ``threshold``
    (a "pass" card read "score 0.053589" under a threshold of 0.05358887)."""
    for digits in range(5, 18):
        text = f"{score:.{digits}g}"
        if threshold is None or (float(text) > threshold) == (score > threshold):
            return text
    return repr(float(score))


def _thumb(img: Image.Image, width: int, height: int) -> Image.Image:
    return img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)


#: Widest and narrowest gallery tile, in thumbnail heights: a 20:1 strip is squeezed to 4:1, so its
#: tiles stay legible (a 20:1 tile of a 160-px thumbnail would be 3,200 px wide).
_ASPECT_LIMITS = (0.25, 4.0)


def _tile_width(size: tuple[int, int] | None, thumb: int) -> int:
    """Width of a gallery tile ``thumb`` px high that shows a photo of ``size`` (width, height)
    at its own proportions (within :data:`_ASPECT_LIMITS`); square without a size."""
    if not size or size[0] <= 0 or size[1] <= 0:
        return thumb
    lo, hi = _ASPECT_LIMITS
    return max(1, round(thumb * min(max(size[0] / size[1], lo), hi)))


def _fig_uri(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


#: Scores all positive and spanning more than this factor are binned on a log scale.
_LOG_SPAN = 20.0


def _histogram_bins(scores: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, bool]:
    """(bin edges, whether they are log-spaced) of the score histogram. Equal bins from the lowest
    to the highest score put every good image in the first bin where defects score 25 times
    higher, the threshold drawn on it: where the scores are positive and span more than
    :data:`_LOG_SPAN`, the bins are equal in log(score) instead, unless ``threshold`` is 0 or
    below, which a log axis cannot show."""
    n = min(40, max(5, scores.size // 3))
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 0.0)
    if lo > 0 and hi / lo > _LOG_SPAN and (threshold is None or threshold > 0):
        return np.geomspace(lo, hi, n + 1), True
    return np.histogram_bin_edges(scores, bins=n), False


def _histogram(scores: np.ndarray, labels: np.ndarray | None, threshold: float | None) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(111)
    bins, log = _histogram_bins(scores, threshold)
    if log:
        ax.set_xscale("log")
    if labels is None:
        ax.hist(scores, bins=bins, color="#4c72b0", alpha=0.8, label=f"images ({scores.size})")
    else:
        ax.hist(scores[labels == 0], bins=bins, color="#2ca02c", alpha=0.6, label=f"good ({int((labels == 0).sum())})")
        ax.hist(scores[labels == 1], bins=bins, color="#d62728", alpha=0.6, label=f"defective ({int((labels == 1).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("image score (log scale)" if log else "image score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _fig_uri(fig)


def _class_table(metrics: Mapping[str, Any]) -> str:
    """The metrics table: every class, then each defect class (evaluate's keys)."""
    keys = ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")
    shown = {"aupro": "aupro (FPR &le; 0.3)"}  # the integration limit, which the name leaves out
    # a class's row is measured on its images and the good ones, as evaluate's per-class metrics are
    head = ("<tr><th>class</th>" + "".join(f"<th>{shown.get(k, k)}</th>" for k in keys)
            + "<th>images (with the good ones)</th></tr>")
    trs = [("every class", metrics)] + sorted(metrics.get("per_class", {}).items())
    return "<table>" + head + "".join(
        f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
        + f"<td>{m.get('num_images')}</td></tr>" for c, m in trs) + "</table>"


def _operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false-alarm rate, recall, precision) of flagging score > ``threshold``; with nothing
    flagged, precision 1, where the precision-recall curve ends (scikit-learn's convention; 0
    drew the point at the origin, off the curve)."""
    flagged = scores > threshold
    tp = int((flagged & (labels == 1)).sum())
    return (int((flagged & (labels == 0)).sum()) / max(1, int((labels == 0).sum())), tp / max(1, int(labels.sum())),
            tp / int(flagged.sum()) if flagged.any() else 1.0)


def _curves(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> tuple[str, str]:
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    prec, rec, _ = precision_recall_curve(labels, scores)
    op = None if threshold is None else _operating_point(scores, labels, threshold)
    out = []
    for kind in ("roc", "pr"):
        fig = Figure(figsize=(4.6, 4.0))
        ax = fig.add_subplot(111)
        if kind == "roc":
            ax.plot(fpr, tpr, color="#4c72b0", label=f"ROC (AUC {auc(fpr, tpr):.3f})")
            ax.plot([0, 1], [0, 1], color="#999", linestyle=":")
            ax.set_xlabel("false-alarm rate (good images flagged)")
            ax.set_ylabel("detection rate (defective images flagged)")
            if op:
                ax.plot([op[0]], [op[1]], "ko", label="at the threshold")
        else:
            ax.plot(rec, prec, color="#dd8452", label="precision-recall")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            if op:
                ax.plot([op[1]], [op[2]], "ko", label="at the threshold")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="lower right" if kind == "roc" else "lower left")
        out.append(_fig_uri(fig))
    return out[0], out[1]


def _gallery_selection(order: np.ndarray, false_alarms: np.ndarray, misses: np.ndarray,
                       max_gallery: int) -> np.ndarray:
    """Indices shown (``order``: highest score first): every false alarm and miss first, when there
    are more than fit half of each kind, the surest errors (the highest-scoring false alarms, the
    lowest-scoring misses; one kind's room left to the other), then evenly spaced over the score order."""
    if order.size <= max_gallery:
        return order
    fa, miss = order[false_alarms[order]], order[misses[order]][::-1]
    n_fa = min(fa.size, max(max_gallery // 2, max_gallery - miss.size))
    keep = set(fa[:n_fa].tolist()) | set(miss[:max_gallery - n_fa].tolist())
    rest = [i for i in order.tolist() if i not in keep]
    room = max_gallery - len(keep)
    if room > 0 and rest:
        picks = np.linspace(0, len(rest) - 1, num=min(room, len(rest))).round().astype(int)
        keep.update(rest[j] for j in picks)
    return np.array([i for i in order.tolist() if i in keep])


#: Size of the map colour scale's strips on the page, in pixels (width, height).
_LEGEND_SIZE = (256, 12)


def _legend(scale: float, pixel_threshold: float | None, maps_top: float | None) -> str:
    """The gallery's colour scale: strips of the map (grey) and of the overlay's tint as it lies
    over a mid-grey photo, from 0 to ``scale`` (> 0), the value drawn white and at full tint, with
    the pixel threshold marked by a tick (a black and a white column, seen on any colour) where it
    lies on them; ``maps_top``: the highest value of the set's maps, given where no positive scale
    is stored (``scale`` is then that value, or 1 where it is not positive)."""
    from .visualize import tint as overlay_tint

    w, h = _LEGEND_SIZE
    u = np.broadcast_to(np.linspace(0.0, 1.0, w, dtype=np.float32), (h, w))
    grey = np.repeat((u * 255).astype(np.uint8)[..., None], 3, axis=-1)
    tint = overlay_tint(np.full((h, w, 3), 128, np.uint8), u)  # as save_overlay tints a photo
    tick = None
    if pixel_threshold is not None and 0 < pixel_threshold <= scale:
        tick = min(w - 2, round(pixel_threshold / scale * (w - 1)))
        for a in (grey, tint):
            a[:, tick], a[:, tick + 1] = 0, 255
    strips = "".join(f'<img class="legend" alt="{alt}" title="{alt}" src="{_png_uri(Image.fromarray(np.ascontiguousarray(a)))}">'
                     for alt, a in (("map colour scale", grey), ("overlay tint scale", tint)))
    if maps_top is None:
        top = f"{scale:.4g} and above at the right"
    elif maps_top > 0:
        top = f"{scale:.4g} at the right (the highest value of every image's map: no positive scale is stored)"
    else:
        top = f"{scale:.4g} at the right (no positive scale is stored and no map exceeds 0: every map is black)"
    if tick is not None:
        marked = f"; the tick is the pixel threshold, {pixel_threshold:.4g}"
    elif pixel_threshold is not None and pixel_threshold > scale:
        marked = f"; the pixel threshold, {pixel_threshold:.4g}, lies above the scale's top"
    else:
        marked = ""
    return (f'<p class="note">{strips}<br>Map (grey) and overlay tint (over a mid-grey photo): '
            f"0 at the left to {top}{marked}. Every map of the page is drawn on this scale.</p>")


def _at_tile_size(m: torch.Tensor, img: torch.Tensor, thumb: int, tw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A map [S, S] and its image uint8 [3, S, S] brought down to the tile (``thumb`` high, ``tw``
    wide) when the model's square is larger: the map by its maximum over each block (a thin defect
    stays visible), the image by PIL's antialiased resize. A page of 512-px runs embedded every map
    and overlay at 512 x 512 to show them at 160 px (60 cards: about 39 MB)."""
    s = m.shape[-1]
    if s <= thumb:
        return m, img
    h, w = thumb, min(s, max(tw, thumb))
    small = torch.nn.functional.adaptive_max_pool2d(m[None, None].float(), (h, w))[0, 0]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    return small, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def write_report(
    out: str | os.PathLike,
    *,
    names: Sequence[str],
    images: torch.Tensor,
    maps: torch.Tensor,
    scores: torch.Tensor,
    recon: torch.Tensor | Callable[[list[int]], torch.Tensor] | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    masks: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    meta: ModelInfo | None = None,
    threshold: float | None = None,
    title: str = "defect_fast inspection report",
    source: str = "",
    max_gallery: int = 60,
    thumb: int = 160,
    sizes: Sequence[tuple[int, int] | None] | None = None,
    replace: bool = True,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the self-contained HTML report.

    Args:
        out: the .html file to write (its folder is created).
        names: N image names (paths) for captions.
        images: uint8 [N, 3, S, S] inputs.
        maps: float [N, S, S] anomaly maps; scores: float [N] image scores.
        recon: [N, 3, S, S] reconstructions in [-1, 1], or a function of the shown images' indices
            (a list of k) returning their [k, 3, S, S] (e.g. ``Detector.reconstruct``; only the
            gallery is reconstructed); None: not shown.
        labels: [N], 1 = defective, 0 = good (None: no ground truth: no metrics, no curves).
        masks: bool [N, S, S] ground truth (None: no pixel metrics and no mask column).
        classes: N class names for per-class metrics and captions.
        meta: model name, version, thresholds, map scale.
        threshold: image threshold (default ``meta.image_threshold``; None: no verdicts).
        title, source: page title; what was inspected (e.g. the data folder).
        max_gallery: most images in the gallery (all false alarms and misses come first).
        thumb: height of the gallery thumbnails in pixels.
        sizes: N photos' own (width, height): each gallery tile shows its photo at those
            proportions (``thumb`` high), not squashed into the model's square; None: square tiles.
        replace: False refuses (OutputRefused) a file at ``out`` when the page is written, also one
            that appeared while the images were predicted (the command line without --overwrite).
        notes: lines for the summary's "notes" row (e.g. images the run has seen).

    Returns:
        {"path", "n_images", "n_shown", "sections": ids written, "metrics": the numbers in the
        metrics section ({} without ground truth)}.
    """
    from .data.dataset import from_model_range
    from .data.io import blank_images
    from .visualize import save_map, save_overlay

    n = len(names)
    # float64, as predict, watch and evaluate compare a score with the threshold: a float32 array
    # would round the threshold to float32 (NumPy 2) and judge an image near it otherwise
    s = (scores.detach().double().cpu().numpy().reshape(-1) if isinstance(scores, torch.Tensor)
         else np.asarray(scores, np.float64).reshape(-1))
    if images.shape[0] != n or maps.shape[0] != n or s.size != n:
        raise ValueError(f"report: {n} names but {images.shape[0]} images, {maps.shape[0]} maps, {s.size} scores")
    if sizes is not None and len(sizes) != n:
        raise ValueError(f"report: {n} images but {len(sizes)} sizes")
    y = None if labels is None else np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1).astype(int)
    if y is not None and y.size != n:
        raise ValueError(f"report: {n} images but {y.size} labels")
    thr = threshold if threshold is not None else (meta.image_threshold if meta is not None else None)
    maps = maps.detach().float().cpu()
    flagged = s > thr if thr is not None else np.zeros(n, dtype=bool)
    # a blank frame flagged or passed against its label stays among the gallery's false alarms and
    # misses, as the metrics and curves count its score; its card says it is not judged
    fa = flagged & (y == 0) if y is not None else np.zeros(n, dtype=bool)
    blank = blank_images(images.cpu()).tolist()
    miss = ~flagged & (y == 1) if y is not None and thr is not None else np.zeros(n, dtype=bool)

    parts: list[str] = []
    sections: list[str] = []

    def section(sid: str, heading: str, body: str) -> None:
        sections.append(sid)
        parts.append(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{body}\n</section>')

    # summary
    rows = [("images", n), ("source", source or "-")]
    if meta is not None:
        rows += [("model", f"{meta.name} ({meta.version})"), ("image size", meta.image_size)]
        if meta.extra.get("threshold_source"):
            rows.append(("threshold from", meta.extra["threshold_source"]))
        if meta.extra.get("threshold_image"):
            rows.append(("threshold is the score of", meta.extra["threshold_image"]))
        if meta.extra.get("calibrated_on") and meta.extra.get("threshold_source") != "given on the command line":
            rows.append(("defect-free images the thresholds rest on", meta.extra["calibrated_on"]))
    # as text that reads back as the same number: at 4 decimals 0.006108 showed as 0.0061 beside a
    # passing score of 0.006109, a pixel threshold of 4.2e-5 as 0.0000
    rows.append(("image threshold", threshold_text(thr)))
    if thr is not None:  # a blank frame is neither: nothing on it to judge (watch sets it aside)
        judged = ~np.asarray(blank, dtype=bool)
        rows += [("flagged (score > threshold)", int((flagged & judged).sum())), ("passed", int((~flagged & judged).sum()))]
        if not judged.all():
            rows.append(("blank frames, not judged (one colour throughout: a camera fault)", int((~judged).sum())))
    if meta is not None and meta.pixel_threshold is not None:
        rows.append(("pixel threshold", threshold_text(meta.pixel_threshold)))
    rows.append(("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    # what the data could not give, said (evaluate says it too; the page left it out silently)
    has_bad = y is not None and bool((y == 1).any())
    has_good = y is not None and bool((y == 0).any())
    missing = []
    if y is None:
        missing.append("metrics and curves: a plain folder of images has no labels")
    else:
        if has_bad and masks is None:
            missing.append("pixel metrics: the test set has no ground_truth/ folder (image-level results only)")
        if not has_bad:
            missing.append("pixel metrics: they need defective images, the test set has defect-free ones only")
        if not (has_bad and has_good):
            missing.append(f"image AUROC and curves: they need defect-free and defective images, the test set has "
                           f"{'defective' if has_bad else 'defect-free'} ones only")
    if missing:
        rows.append(("not on this page", "; ".join(missing)))
    if notes:
        rows.append(("notes", "; ".join(notes)))
    section("summary", "Summary", "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>"
                                                         for k, v in rows) + "</table>")

    # metrics and curves: pixel metrics need defective images with masks, image-level ones both
    # kinds of image; the rates at the threshold need either
    metrics: dict[str, Any] = {}
    if has_bad or has_good:
        body = []
        if masks is not None and has_bad:
            from .metrics import MetricWarning, evaluate

            with warnings.catch_warnings(record=True) as caught:  # why a cell reads n/a: on the page too
                warnings.simplefilter("always", MetricWarning)
                metrics = evaluate(maps, masks, torch.as_tensor(s), torch.as_tensor(y), list(classes) if classes else None)
            undefined = []
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                if issubclass(w.category, MetricWarning):
                    undefined.append(str(w.message).removesuffix("; returning nan"))
            body.append(_class_table(metrics))
            if undefined:
                body.append('<p class="note">n/a: ' + "; ".join(html.escape(u) for u in dict.fromkeys(undefined)) + "</p>")
        elif has_bad and has_good and classes is not None:  # image AUROC overall and per class, as evaluate gives it
            from .evaluate import image_level_metrics

            metrics = image_level_metrics(torch.as_tensor(s), torch.as_tensor(y), list(classes))
            body.append(_class_table(metrics))  # (the pixel columns n/a: "not on this page" says why)
        elif has_bad and has_good:
            from .metrics import image_auroc

            metrics = {"image_auroc": image_auroc(s, y)}
            body.append(f"<table><tr><th>image AUROC</th><td>{_fmt(metrics['image_auroc'])}</td></tr></table>")
        rows = []
        if has_bad and has_good:
            best = f1_optimal_threshold(s, y)
            metrics["f1_optimal"] = best
            rows = [("F1-optimal image threshold", threshold_text(best["threshold"])), ("F1 there", best["f1"]),
                    ("precision / recall there", f"{best['precision']:.4f} / {best['recall']:.4f}")]
        if thr is not None:
            r = rates_at(s, y, thr)
            metrics["at_threshold"] = r
            stored = meta is not None and threshold is None  # the rate asked was asked of the stored threshold
            asked = meta.extra.get("far") if stored else None
            # what the threshold's own images lead to expect, beside what was asked (evaluate says both): a
            # few held-back images give a threshold whose rate is well above the one asked, which is no failure
            expected = meta.extra.get("far_expected") if stored else None
            scored = (meta.extra.get("threshold_images") if stored else None) or "calibration"
            rows.append(("threshold in use", threshold_text(thr)))
            if has_good:
                rows.append(("false-alarm rate at it", f"{_fmt(r['false_alarm_rate'])} ({r['false_alarms']} of {r['n_good']} good)"
                             + (f"; asked {asked:g}" if isinstance(asked, (int, float)) else "")
                             + (f", expected {_fmt(expected)} from {meta.extra.get('n_calibration_images')} {scored} images"
                                if isinstance(expected, (int, float)) else "")))
            if has_bad:
                rows.append(("miss rate at it", f"{_fmt(r['miss_rate'])} ({r['misses']} of {r['n_defective']} defective)"))
        if rows:
            body.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows) + "</table>")
        points = operating_points(s, y, meta.extra.get("held_back")) if meta is not None else []
        if len(points) > 1:
            metrics["operating_points"] = points
            body.append(f"<p>Thresholds <code>--far</code> can set (the k-th highest "
                        f"{html.escape(meta.extra.get('threshold_images') or 'held-back')} score) and their rates "
                        "here:</p><table><tr><th>--far</th><th>k</th><th>threshold</th><th>false alarms</th>"
                        "<th>misses</th></tr>" + "".join(
                            f"<tr><td>{p['far']:.4g}</td><td>{p['rank']}</td><td>{threshold_text(p['threshold'])}</td>"
                            f"<td>{p['false_alarms']} of {p['n_good']}</td><td>{p['misses']} of {p['n_defective']}</td></tr>"
                            for p in points) + "</table>")
        if body:
            section("metrics", "Metrics", "\n".join(body))
        if has_bad and has_good:
            roc, pr = _curves(s, y, thr)
            section("curves", "ROC and precision-recall (image level)",
                    f'<div class="plots"><img alt="ROC curve" src="{roc}"><img alt="precision-recall curve" src="{pr}"></div>')

    section("histogram", "Score histogram", f'<img alt="score histogram" src="{_histogram(s, y, thr)}">')

    # gallery
    order = np.argsort(-s, kind="stable")
    shown = _gallery_selection(order, fa, miss, max_gallery)
    scale = meta.scale() if meta is not None else 0.0
    maps_top = None if scale > 0 else float(maps.max())  # none stored, or none usable (negative, NaN)
    if maps_top is not None:
        # maps with no positive value are drawn black, on a scale of 1 (each map's own maximum would
        # draw the legend's scale on none of them)
        scale = maps_top if maps_top > 0 else 1.0
    if callable(recon):
        rec_u8 = from_model_range(recon(shown.tolist()).detach().float().cpu()) if len(shown) else None
        pos = {i: k for k, i in enumerate(shown.tolist())}
    else:
        rec_u8 = from_model_range(recon.detach().float().cpu()) if recon is not None else None
        pos = {i: i for i in range(n)}
    cards = []
    for i in shown.tolist():
        img = images[i].cpu()
        tw = _tile_width(sizes[i] if sizes is not None else None, thumb)
        tiles = [("input", _png_uri(_thumb(Image.fromarray(img.permute(1, 2, 0).numpy()), tw, thumb)))]
        if rec_u8 is not None:
            tiles.append(("reconstruction", _png_uri(_thumb(Image.fromarray(rec_u8[pos[i]].permute(1, 2, 0).numpy()), tw, thumb))))
        small, shown_img = _at_tile_size(maps[i], img, thumb, tw)
        # PIL's default zlib level: the page's size matters more than the time to write it
        tiles.append(("map", _file_png_uri(lambda f: save_map(small, f, scale, compress_level=6))))
        tiles.append(("overlay", _file_png_uri(lambda f: save_overlay(shown_img, small, f, scale, compress_level=6))))
        if masks is not None and bool(masks[i].any()):
            tiles.append(("mask", _png_uri(_thumb(Image.fromarray(masks[i].cpu().numpy().astype(np.uint8) * 255), tw, thumb))))
        css, tag = ("blank", "not judged") if blank[i] and thr is not None else \
            ("fa", "false alarm") if fa[i] else ("miss", "miss") if miss[i] else \
            ("fail", "fail") if flagged[i] else ("pass", "pass") if thr is not None else ("", "")
        cls = f" ({html.escape(classes[i])})" if classes else ""
        if blank[i]:  # nothing on it to judge: a camera fault (predict marks it, watch sets it aside)
            cls += " · blank frame, one colour throughout"
        tag_html = f'<span class="tag {css}">{tag}</span> ' if tag else ""
        wide = f' style="width:{tw}px"' if tw != thumb else ""  # the map and overlay PNGs are the model's square
        cap_width = f' style="max-width:{5 * (tw + 2)}px"' if tw != thumb else ""
        cap = (f'<div class="cap"{cap_width}>{tag_html}score {_score_text(s[i], thr)}{cls}<br>'
               f'{html.escape(str(names[i]))}</div>')
        imgs = "".join(f'<img alt="{k}" title="{k}"{wide} src="{u}">' for k, u in tiles)
        cards.append(f'<div class="card {css}">{imgs}{cap}</div>')
    cols = "input, reconstruction, map, overlay" if rec_u8 is not None else "input, map, overlay"
    n_err, n_err_shown = int((fa | miss).sum()), int((fa | miss)[shown].sum()) if len(shown) else 0
    if len(shown) >= n:
        sampled = ""
    elif y is None or thr is None:  # no false alarms or misses to show first: none are known
        sampled = " The rest are evenly sampled."
    elif n_err_shown == n_err:
        sampled = " All false alarms and misses are shown, the rest evenly sampled."
    else:
        sampled = (f" {n_err_shown} of the {n_err} false alarms and misses are shown (the highest-scoring false "
                   "alarms and the lowest-scoring misses, about half each when both are many; raise --max-gallery "
                   "to see all).")
    colours = ("" if thr is None else " Orange: flagged." if y is None else
               " Red: false alarm (good, flagged); purple: miss (defective, passed); orange: flagged.")
    if thr is not None and any(blank[i] for i in shown):
        colours += " Grey tag: a blank frame, not judged (watch sets such frames aside)" + (
            "." if y is None else " (the metrics, and the false alarms and misses here, count its score).")
    note = (f'<p class="note">{len(shown)} of {n} images, highest score first; each: {cols}'
            f'{", mask" if masks is not None else ""}.{colours}{sampled}</p>')
    legend = _legend(scale, meta.pixel_threshold if meta is not None else None, maps_top) if len(shown) else ""
    section("gallery", "Gallery", note + legend + "\n" + "\n".join(cards))

    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>:root{{--thumb:{int(thumb)}px}}{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out = Path(out)
    appeared = OutputRefused(f"--out {out}: a file appeared there while the report was made; not replacing it "
                             "(give --overwrite to replace it)")
    if not replace and (out.exists() or out.is_symlink()):
        raise appeared
    try:  # a name that is not UTF-8 (a camera's Latin-1 file name) escaped, not an error after all the work
        atomic_write_bytes(out, page.encode("utf-8", "backslashreplace"), replace=replace, unlisted=True)
    except FileExistsError:  # during the write
        raise appeared from None
    except OutputRefused as exc:  # reserved by another command meanwhile: named as the option
        raise OutputRefused(f"--out {exc}") from None
    return {"path": str(out), "n_images": n, "n_shown": int(len(shown)), "sections": sections, "metrics": metrics}


def report_from_data(
    predict_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    meta: ModelInfo,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    batch_size: int = 8,
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None,
    check_images: Callable[[torch.Tensor, list[str]], Sequence[str]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Read ``data``, predict, and :func:`write_report`.

    Args:
        predict_fn: uint8 [N, 3, S, S] -> {"maps": [N, S, S], "scores": [N], "recon": [N, 3, S, S]}.
        meta: :class:`~defect_fast.calibration.ModelInfo` (S = ``meta.image_size``).
        data: an MVTec-style root (``test/<class>/`` with ``ground_truth/``: full report) or a folder
            of images (no ground truth: summary, histogram and gallery).
        out: the .html file.
        threshold: overrides ``meta.image_threshold``.
        batch_size: images per predict call.
        reconstruct: uint8 [k, 3, S, S] -> [k, 3, S, S] in [-1, 1], run on the gallery's images
            only (used when ``predict_fn`` returns no "recon").
        check_images: (the images as read, their names) -> notes for the page's summary (e.g.
            the images the run has seen), before they are predicted.
        **kwargs: passed to :func:`write_report` (title, max_gallery, thumb).

    Raises:
        DataError: unreadable data (every bad file listed), as the data readers do.
    """
    from .data import list_images, load_test_set, read_images
    from .data.io import BlankFramesWarning, DataError, DataWarning, blank_images, outside_proportions, warn_data
    from .evaluate import check_finite

    data = Path(data)
    labels = masks = classes = None
    # what the readers say of the data (a test set without good/, files skipped, empty masks) changes
    # what the figures count: on stderr, and on the page, which outlives it (blank frames: below)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            if (data / "test").is_dir():
                test = load_test_set(data, meta.image_size, require_masks=False)  # without ground_truth/: image-level only
                images, names, sizes = test.images, [str(p) for p in test.paths], test.sizes
                labels, masks, classes = test.labels, (test.masks if test.has_masks else None), test.classes
            else:
                paths = list_images(data)
                if not paths:
                    raise DataError(f"{data}: no images (and no MVTec-style test/ folder)")
                sizes = []
                images, names = read_images(paths, meta.image_size, where=data, sizes=sizes), [str(p) for p in paths]
    finally:  # (said again once recording has ended: said within, each was recorded again)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught
             if issubclass(w.category, DataWarning) and not issubclass(w.category, BlankFramesWarning)]
    notes += list(check_images(images, names)) if check_images is not None else []
    stretched = outside_proportions(sizes, names, meta.extra.get("trained_proportions"), data)
    if stretched:  # on stderr, and on the page, which outlives it
        warn_data(stretched, stacklevel=2)
        notes.append(stretched)
    blank = [n for n, b in zip(names, blank_images(images).tolist()) if b]
    if blank:  # said on stderr by the reader too; the page outlives it
        notes.append(f"{len(blank)} of the {len(names)} images are blank frames, of one colour throughout (a failed "
                     f"exposure, a covered lens?): {', '.join(blank[:3])}{', ...' if len(blank) > 3 else ''}")
    parts = [predict_fn(chunk) for chunk in images.split(batch_size)]
    res = {k: torch.cat([p[k].detach().float().cpu() for p in parts]) for k in ("maps", "scores")}
    check_finite(res, names, meta.extra.get("run"), None, "images")  # a NaN score would be drawn as a pass
    recon = torch.cat([p["recon"].detach().float().cpu() for p in parts]) if all("recon" in p for p in parts) else None
    del parts  # one copy of the maps while the page is made (1000 maps at 512 px: 1 GB)
    if recon is None and reconstruct is not None:
        recon = lambda rows: torch.cat([reconstruct(c) for c in images[rows].split(batch_size)])  # noqa: E731
    return write_report(out, names=names, images=images, maps=res["maps"], scores=res["scores"], recon=recon,
                        labels=labels, masks=masks, classes=classes, meta=meta, threshold=threshold,
                        source=str(data), sizes=sizes, notes=notes, **kwargs)  # sizes are the files' own: not an option


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Register ``defect-fast report`` on the CLI's sub-parsers (``command`` as its function)."""
    from .safety import add_threshold_options, device_arg, input_path, output_path, positive_int

    r = subparsers.add_parser(
        "report", help="one self-contained HTML page: metrics, curves, score histogram, gallery",
        description="Predict DATA and write one HTML file with everything inlined (no network): the metrics table, "
                    "ROC and precision-recall curves and the score histogram with the threshold (with ground truth), "
                    "and a gallery sorted by score with false alarms and misses marked. A plain folder of images "
                    "gives the histogram and the gallery.")
    r.add_argument("run", type=input_path, help="run folder (or model.pt)")
    r.add_argument("data", type=input_path, help="MVTec-style root with test/<class>/ (and ground_truth/<class>/ with a mask for every defective "
                        "image for the pixel metrics; without ground_truth/, image-level results only), or a plain folder of images")
    r.add_argument("--out", required=True, type=output_path, help="the .html file to write")
    add_threshold_options(r, "is flagged")
    r.add_argument("--max-gallery", type=positive_int, default=60,
                   help="most images in the gallery (default 60; every false alarm and miss comes first)")
    r.add_argument("--title", default="defect_fast inspection report", help="page title (default: %(default)s)")
    r.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default 8; on a CPU at most what one model chunk of patches holds)")
    r.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    r.set_defaults(func=command)


def command(args) -> int:
    """``defect-fast report``: load the run, predict DATA, write the page (refusals come before any work)."""
    from .data.io import DataError
    from .detect import Detector
    from .evaluate import seen_test_images
    from .runs import load_model_file, model_file
    from .safety import far_errors, safe_output_file

    if args.out == "-":  # as evaluate --json - would take it: a page is a file, it has no standard-output form
        raise OutputRefused("--out -: report writes one HTML file, not to standard output; give a file name")
    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"{data}: {'not a folder' if data.exists() else 'no such folder'} (expected a folder of "
                        "images, or a dataset with test/<class>/)")
    out = safe_output_file(args.out, args.overwrite, inputs=[args.run, data], what="--out")
    import matplotlib  # noqa: F401  (the page's curves: a missing one is said before the maps are computed)
    path = model_file(args.run)
    state, sha = load_model_file(path)  # read once: the Detector, the check of seen images and the version
    det = Detector.from_state(state, args.device, where=args.run)
    det.loaded_from(path, sha)
    with far_errors(args.run, args.far):
        info = ModelInfo.from_detector(det, args.run, threshold=args.threshold, far=args.far)

    def seen(images: torch.Tensor, names: list[str]) -> list[str]:
        """The images the run has seen, said on stderr and on the page (evaluate's check)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen_test_images(state, images, names, args.run, thresholds_used=args.threshold is None, what="images")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return [str(w.message) for w in caught]

    res = report_from_data(lambda x: det.predict_batched(x, images_per_batch=args.batch_size), info, data, out,
                           threshold=args.threshold, batch_size=args.batch_size, reconstruct=det.reconstruct,
                           check_images=seen, max_gallery=args.max_gallery, title=args.title, replace=args.overwrite)
    thr = info.image_threshold
    print(f"wrote {res['path']}: {res['n_images']} images, {res['n_shown']} in the gallery, sections "
          f"{', '.join(res['sections'])}; threshold {'none' if thr is None else f'{thr:.6g}'} "
          f"({info.extra.get('threshold_source')})")
    return 0
