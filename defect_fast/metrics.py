"""Detection metrics: pixel AUROC, image AUROC, AUPRO (up to FPR 0.3), pixel F1-max.

All curve metrics are exact: every distinct score is a threshold and a run of tied scores is one
step of the curve (as in ``sklearn.metrics.roc_auc_score`` / ``precision_recall_curve``), so no
threshold subsampling is needed. Scores are compared exactly as given: float32, float16, bfloat16
and small integers by their float32 values, float64 and wide integers (which float32 would round
into ties) by their ranks.

How it stays fast on hundreds of 512x512 maps: every pixel becomes one int64 key, its score's
order-preserving float32 bits (descending) in the high half and a small code in the low half
(its ground-truth region, or its image for defect-free pixels). One in-place sort of these keys
gives all the curves: a single streaming pass over the sorted keys accumulates the ROC area, the
best F1 and the PRO area for the whole set and for every per-class subset at once (subsets are
filtered through a table indexed by the code). Temporary memory is about 12.5 bytes per pixel at
its peak: the keys (8) and the int32 region labels while they are built (4), and the streaming
step's blocks (about 930 MiB for 300 maps of 512x512; ``benchmarks/memory.py metrics``).

Degenerate inputs: a metric that needs both classes returns ``nan`` and warns with
:class:`MetricWarning` when one is absent (e.g. masks without any defect pixel), so an evaluation
is not lost to an exception at its end. NaN or infinite scores raise ``ValueError``.

AUPRO follows the MVTec AD evaluation (Bergmann et al., IJCV 2021): ground-truth regions are the
8-connected components of each mask; PRO(t) is the mean over all regions (of all images) of the
fraction of the region's pixels scoring >= t; FPR(t) is the fraction of all defect-free pixels
scoring >= t; the curve from (0, 0) is integrated by the trapezoid rule up to FPR = 0.3
(interpolating at 0.3) and divided by 0.3, so a perfect map scores 1.0 and a random one about 0.15.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "MetricWarning",
    "aupro",
    "connected_components",
    "evaluate",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
]

_BLOCK = 1 << 18  # keys per step of the streaming pass (4 M: 1.2 x the time and 70 MiB more for 300 maps of 512 px)
_LOW = (1 << 32) - 1


class MetricWarning(RuntimeWarning):
    """A metric is undefined for the given data and was returned as nan."""


def _nan(metric: str, why: str) -> float:
    warnings.warn(f"{metric} is undefined: {why}; returning nan", MetricWarning, stacklevel=3)
    return math.nan


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu()


#: Score dtypes whose every value float32 holds exactly (compared as float32 values)
_EXACT_IN_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8, torch.int16)


def _scores_np(x, what: str) -> np.ndarray:
    """Scores in an order-keeping numpy array; rejects NaN/inf. float32 (sharing memory when
    possible) for the dtypes float32 holds exactly; for the others (float64, int32, int64) their
    dense ranks as int32 (0 = lowest; equal values, -0.0 and 0.0 too, share one): a cast to float32
    would round distinct values into ties (scores of 1e6 + 0.01 i) or past its range (1e300)."""
    t = _as_tensor(x)
    # in slices: torch.isfinite of all maps at once took 7 bytes a pixel, more than the maps
    if t.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(_BLOCK)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if t.dtype in _EXACT_IN_FLOAT32:
        return t.to(torch.float32).numpy()
    a = t.numpy()
    if a.size >= 1 << 31:
        raise ValueError(f"{what}: {a.size} {t.dtype} values are more than can be ranked; pass them as float32")
    _, ranks = np.unique(a, return_inverse=True)
    return ranks.reshape(a.shape).astype(np.int32)


def _masks_t(x) -> torch.Tensor:
    """Ground-truth masks as a bool tensor, checked: a mask of other values than 0 and 1 (a soft,
    resized one) is refused, not read as "any non-zero value is a defect"."""
    t = _as_tensor(x)
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            odd = t[(t != 0) & (t != 1)].reshape(-1)[0].item()
            raise ValueError(f"masks must be bool or 0/1, got a value {odd:g}: binarise a soft or resized mask "
                             "first (e.g. mask > 0.5)")
        t = t.to(torch.bool)
    return t


def _labels_np(x) -> np.ndarray:
    """Image labels as an int64 numpy array [N]: 0 (good) or 1 (defective), checked before any cast
    (a label of 0.5 or 2 is refused, not rounded or read as defective)."""
    try:  # any dtype: bfloat16 (no numpy twin), object arrays of numbers, another byte order
        a = (x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor)
             else np.asarray(x, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("labels must be 0 (good) or 1 (defective)") from None
    if not np.isin(a, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    return a.astype(np.int64)


def _shape(x, what: str = "anomaly maps") -> tuple[int, ...]:
    if hasattr(x, "shape"):
        return tuple(x.shape)
    try:
        return np.shape(x)
    except ValueError:  # numpy refuses a ragged list with its own words
        raise ValueError(f"{what} must be [N, H, W]: got a list of differently sized arrays "
                         "(resize them to one size first)") from None


def _check_same_shape(maps, masks) -> None:
    ms, gs = _shape(maps), _shape(masks, "masks")
    if ms != gs:
        raise ValueError(f"anomaly maps {ms} and masks {gs} must have the same shape [N, H, W]")
    if len(ms) not in (2, 3):
        raise ValueError(f"anomaly maps must be [N, H, W] (or one [H, W]), got shape {ms}")


# --------------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------------


def connected_components(masks, connectivity: int = 8, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, int]:
    """Label the connected foreground regions of binary masks.

    Args:
        masks: bool [H, W] or [N, H, W] (tensor or array); components never cross images.
        connectivity: 8 (default; diagonal neighbours connect) or 4.
        dtype: of the labels: int64 (default) or int32 (half the memory, for fewer than 2**31 pixels).

    Returns:
        (labels of ``dtype`` and the same shape: 0 = background, 1..K = component; numbering runs over
        the whole batch in raster order of each component's first pixel, i.e. the same numbering
        as ``scipy.ndimage.label`` gives a single image), K).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m = _masks_t(masks)
    shape = m.shape
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim != 3:
        raise ValueError(f"masks must be [H, W] or [N, H, W], got shape {tuple(shape)}")
    n, h, w = m.shape
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    if dtype == torch.int32 and n * h * w >= 1 << 31:
        raise ValueError(f"int32 labels cannot number {n * h * w} pixels; use int64")
    labels = torch.zeros(n * h * w, dtype=dtype)
    nonempty = m.reshape(n, h * w).any(dim=1).nonzero().squeeze(1)
    total = 0
    chunk = max(1, (1 << 23) // max(1, h * (w + 2)))  # bound temporaries to ~8 M pixels
    for idx in nonempty.split(chunk):
        img, row, start, length, comp, k = _label_runs(m[idx], connectivity)
        # paint every run with its component number (runs are disjoint, so plain assignment)
        first = (idx.index_select(0, img) * h + row) * w + start
        pos = torch.repeat_interleave(first - torch.cumsum(length, 0) + length, length) + torch.arange(int(length.sum()))
        labels[pos] = torch.repeat_interleave(comp + (total + 1), length).to(dtype)
        total += k
    return labels.reshape(shape), total


def _label_runs(m: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, ...]:
    """Connected components of the foreground runs of a [n, H, W] chunk.

    Returns (image, row, start, length, component (0-based, raster order), number of components)
    per horizontal run of foreground pixels.

    NB: runs of adjacent rows of one image are joined when they overlap (or touch diagonally,
    for 8-connectivity); the run graph is solved by a vectorised union-find (hook each root to
    the smallest root across its edges with a scatter-min, then full pointer jumping, until no
    edge joins two roots). Parents always point to smaller indices, so no cycles form.
    """
    n, h, w = m.shape
    # 1. Runs: starts and (exclusive) ends per row, in raster order.
    padded = torch.zeros((n * h, w + 2), dtype=torch.int8)
    padded[:, 1:-1] = m.reshape(n * h, w)
    step = padded[:, 1:] - padded[:, :-1]  # [n*h, w+1]: +1 at a run start, -1 at its end
    del padded
    starts = (step == 1).nonzero()
    e = (step == -1).nonzero()[:, 1]
    del step
    row, s = starts[:, 0], starts[:, 1]
    # 2. Edges to the runs of the row above (same image only); keys order runs globally.
    width = w + 2
    start_key, end_key = row * width + s, row * width + e
    reach = 0 if connectivity == 8 else 1  # 8-connectivity also joins diagonal touches
    above = (row - 1) * width
    lo = torch.searchsorted(end_key, above + s, right=bool(reach))  # first run above with e >= s (8) / e > s (4)
    hi = torch.searchsorted(start_key, above + e, right=not reach)  # past the last with s <= e (8) / s < e (4)
    count = torch.where(row % h == 0, 0, (hi - lo).clamp(min=0))
    runs = torch.arange(row.numel())
    u = torch.repeat_interleave(runs, count)
    first = torch.cumsum(count, 0) - count
    v = torch.repeat_interleave(lo - first, count) + torch.arange(u.numel())
    # 3. Union-find over runs.
    parent = runs.clone()
    while u.numel():
        pu, pv = parent.index_select(0, u), parent.index_select(0, v)
        if torch.equal(pu, pv):
            break
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), reduce="amin")
        while True:  # pointer jumping to the roots
            grand = parent.index_select(0, parent)
            if torch.equal(grand, parent):
                break
            parent = grand
    roots, comp = torch.unique(parent, return_inverse=True)  # sorted roots = raster order
    return torch.div(row, h, rounding_mode="floor"), row % h, s, e - s, comp, int(roots.numel())


# --------------------------------------------------------------------------------------------
# Sorted keys and the streaming pass
# --------------------------------------------------------------------------------------------


def _pack(scores: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:
    """out = (descending order key of the scores) << 32 | codes, element-wise (1-D); scores are
    float32 values or int32 ranks (see :func:`_scores_np`)."""
    if scores.dtype == np.int32:  # ranks: already in ascending order
        asc = scores
    else:
        s = scores.astype(np.float32) + np.float32(0.0)  # copy; -0.0 becomes +0.0
        bits = s.view(np.int32)
        asc = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)  # float order as int32 order
    np.left_shift(np.invert(asc).astype(np.int64), 32, out=out)  # invert: descending
    np.bitwise_or(out, codes.astype(np.int64), out=out)


@dataclass
class _Subset:
    """What one evaluated subset needs, as tables indexed by code."""

    keep: np.ndarray | None  # bool [codes] (None: everything)
    positive: np.ndarray  # bool [codes]
    pro_weight: np.ndarray | None  # float64 [codes]: 1 / (area * regions) for its regions
    n_pos: int
    n_neg: int


class _Curves:
    """Streaming accumulator of ROC area, best F1 and PRO area for one subset."""

    def __init__(self, sub: _Subset, max_fpr: float):
        self.sub, self.max_fpr = sub, max_fpr
        self.tp = self.fp = 0
        self.pro = 0.0
        self.roc2 = 0  # twice the ROC area in count units (exact integer)
        self.f1 = 0.0
        self.pro_area = 0.0
        self.pro_done = sub.pro_weight is None or sub.n_neg == 0

    def update(self, hi: np.ndarray, code: np.ndarray) -> None:
        """Consume one block of sorted keys (split as score part / code; never splits a tie)."""
        sub = self.sub
        if sub.keep is not None:
            m = sub.keep[code]
            hi, code = hi[m], code[m]
        if hi.size == 0:
            return
        ends = np.flatnonzero(hi[1:] != hi[:-1])
        ends = np.append(ends, hi.size - 1)
        tp = self.tp + np.cumsum(sub.positive[code], dtype=np.int64)[ends]
        fp = self.fp + (ends + 1) - (tp - self.tp)
        tp_prev = np.concatenate(([self.tp], tp[:-1]))
        fp_prev = np.concatenate(([self.fp], fp[:-1]))
        self.roc2 += int(np.sum((fp - fp_prev) * (tp + tp_prev)))
        self.f1 = max(self.f1, float(np.max(2.0 * tp / (tp + fp + sub.n_pos))))
        if not self.pro_done:
            pro = np.minimum(self.pro + np.cumsum(sub.pro_weight[code])[ends], 1.0)
            fpr = fp / sub.n_neg
            x = np.concatenate(([self.fp / sub.n_neg], fpr))
            y = np.concatenate(([min(self.pro, 1.0)], pro))
            over = np.flatnonzero(x > self.max_fpr)
            if over.size:  # the curve crosses max_fpr in this block: interpolate and finish
                j = int(over[0])
                y_cut = y[j - 1] + (y[j] - y[j - 1]) * (self.max_fpr - x[j - 1]) / (x[j] - x[j - 1])
                x = np.append(x[:j], self.max_fpr)
                y = np.append(y[:j], y_cut)
                self.pro_done = True
            self.pro_area += float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]))) / 2
            self.pro = float(pro[-1])
        self.tp, self.fp = int(tp[-1]), int(fp[-1])

    def auroc(self) -> float:
        return self.roc2 / (2.0 * self.sub.n_pos * self.sub.n_neg)

    def aupro(self) -> float:
        return self.pro_area / self.max_fpr


def _stream(keys: np.ndarray, subsets: Sequence[_Subset], max_fpr: float) -> list[_Curves]:
    """Sort ``keys`` in place and run every subset's accumulator over them."""
    keys.sort()
    accs = [_Curves(s, max_fpr) for s in subsets]
    n, a = keys.size, 0
    while a < n:
        b = min(a + _BLOCK, n)
        if b < n:  # extend the block to the end of its tie run
            last = int(keys[b - 1] >> 32)
            b = n if last >= (1 << 31) - 1 else int(np.searchsorted(keys, (last + 1) << 32, side="left"))
        block = keys[a:b]
        hi, code = block >> 32, block & _LOW
        for acc in accs:
            acc.update(hi, code)
        a = b
    return accs


def _binary_metrics(scores: np.ndarray, positive: np.ndarray, need_both: bool = True) -> _Curves | str:
    """Curves of flat scores against flat bool labels, or the reason they are undefined."""
    positive = np.asarray(positive, dtype=bool).reshape(-1)  # no copy of a bool array
    n_pos = int(positive.sum())
    if n_pos == 0:
        return "the labels hold no positive"
    if need_both and n_pos == positive.size:
        return "the labels hold no negative"
    keys = np.empty(positive.size, dtype=np.int64)
    flat, codes = scores.reshape(-1), positive.view(np.uint8)
    for a in range(0, keys.size, _BLOCK):  # in slices: _pack's temporaries stay a block's size
        _pack(flat[a:a + _BLOCK], codes[a:a + _BLOCK], keys[a:a + _BLOCK])
    sub = _Subset(None, np.array([False, True]), None, n_pos, positive.size - n_pos)
    return _stream(keys, [sub], 1.0)[0]


def pixel_auroc(maps, masks) -> float:
    """Area under the ROC curve over all pixels.

    Args:
        maps: float anomaly maps [N, H, W] (higher = more anomalous); tensor or array.
        masks: bool [N, H, W] ground truth (True = defect).

    Returns:
        AUROC in [0, 1] (exact, ties count half, as ``sklearn.metrics.roc_auc_score``); nan
        with a :class:`MetricWarning` if the masks hold only one class.
    """
    _check_same_shape(maps, masks)
    res = _binary_metrics(_scores_np(maps, "anomaly maps"), _masks_t(masks).numpy())
    return _nan("pixel AUROC", res) if isinstance(res, str) else res.auroc()


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores [N] against labels [N] (1 = defective).

    nan with a :class:`MetricWarning` if only one class is present.
    """
    s, y = _scores_np(scores, "image scores").reshape(-1), _labels_np(labels)
    if s.size != y.size:
        raise ValueError(f"{s.size} image scores but {y.size} labels")
    res = _binary_metrics(s, y != 0)
    return _nan("image AUROC", res) if isinstance(res, str) else res.auroc()


def pixel_f1_max(maps, masks) -> float:
    """Best F1 score over all thresholds, counting pixels (the maximum of 2PR/(P+R) over
    ``sklearn.metrics.precision_recall_curve``). nan with a warning if no pixel is a defect."""
    _check_same_shape(maps, masks)
    res = _binary_metrics(_scores_np(maps, "anomaly maps"), _masks_t(masks).numpy(), need_both=False)
    return _nan("pixel F1-max", res) if isinstance(res, str) else res.f1


def aupro(maps, masks, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD).

    Args:
        maps: float anomaly maps [N, H, W].
        masks: bool [N, H, W]; regions are their 8-connected components.
        max_fpr: integration limit in (0, 1].

    Returns:
        AUPRO in [0, 1] (1 = every region fully detected before any false positive); nan with a
        :class:`MetricWarning` if there is no defect region or no defect-free pixel.
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    _check_same_shape(maps, masks)
    scores = _scores_np(maps, "anomaly maps")
    masks_t = _masks_t(masks)
    if scores.ndim == 2:
        scores, masks_t = scores[None], masks_t[None]
    keys, counts, image_of_code, k = _pixel_keys(scores, masks_t)
    sub = _pixel_subset(None, counts, image_of_code, k)
    if isinstance(sub, str):
        return _nan("AUPRO", sub)
    if sub.n_neg == 0:
        return _nan("AUPRO", "the masks have no defect-free pixel")
    return _stream(keys, [sub], max_fpr)[0].aupro()


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


def _pixel_keys(scores: np.ndarray, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Keys for all pixels and the code tables.

    Codes: 1..K = ground-truth region (defect pixel), K + 1 + i = defect-free pixel of image i.
    Returns (keys int64 [N*H*W], pixel count per code, image of each code, K).
    """
    n = scores.shape[0]
    # int32 where they fit: with the keys, the labels were the largest of the pixel metrics' arrays
    small = int(np.prod(masks.shape)) < 1 << 31
    labels, k = connected_components(masks, connectivity=8, dtype=torch.int32 if small else torch.int64)
    per = int(np.prod(scores.shape[1:]))  # pixels per image (explicit: a -1 cannot be inferred when n is 0)
    labels = labels.reshape(n, per).numpy()
    keys = np.empty(labels.size, dtype=np.int64).reshape(n, per)
    flat_scores = scores.reshape(n, per)
    counts = np.zeros(k + 1 + n, dtype=np.int64)
    step = max(1, _BLOCK // max(1, labels.shape[1]))
    for a in range(0, n, step):
        lab = labels[a : a + step]
        codes = np.where(lab > 0, lab, (k + 1 + np.arange(a, a + lab.shape[0]))[:, None])
        counts += np.bincount(codes.reshape(-1), minlength=counts.size)
        _pack(flat_scores[a : a + step].reshape(-1), codes.reshape(-1), keys[a : a + step].reshape(-1))
    per_image = np.maximum.accumulate(labels.max(axis=1)) if labels.shape[1] else np.zeros(n, dtype=np.int64)
    regions_per_image = np.diff(np.concatenate(([0], per_image)))
    image_of_code = np.concatenate(([-1], np.repeat(np.arange(n), regions_per_image), np.arange(n)))
    return keys.reshape(-1), counts, image_of_code, k


def _pixel_subset(members: np.ndarray | None, counts: np.ndarray, image_of_code: np.ndarray, k: int) -> _Subset | str:
    """Tables for the images selected by ``members`` (bool [N]; None = all)."""
    keep = None if members is None else np.concatenate(([False], members[image_of_code[1:]]))
    region = np.zeros(counts.size, dtype=bool)
    region[1 : k + 1] = True
    inside = np.ones(counts.size, dtype=bool) if keep is None else keep
    n_pos = int(counts[region & inside].sum())
    n_neg = int(counts[~region & inside].sum())
    n_regions = int((region & inside).sum())
    if n_pos == 0:
        return "the masks have no defect pixel"
    weight = np.zeros(counts.size, dtype=np.float64)
    sel = region & inside
    weight[sel] = 1.0 / (counts[sel] * n_regions)
    return _Subset(keep, region, weight, n_pos, n_neg)


def evaluate(maps, masks, image_scores, labels, classes: Sequence[str] | None, max_fpr: float = 0.3) -> dict:
    """All metrics for a test set, overall and per defect class.

    Args:
        maps: float anomaly maps [N, H, W] (tensor or array; higher = more anomalous).
        masks: bool ground truth [N, H, W].
        image_scores: float [N] image-level anomaly scores (None: no image AUROC).
        labels: [N], 0 = good, 1 = defective (None: no image AUROC and no per-class results).
        classes: N class names (e.g. ``TestSet.classes``; None: no per-class results). Good
            images are those with label 0.
        max_fpr: AUPRO integration limit in (0, 1].

    Returns:
        ``{"pixel_auroc", "image_auroc", "aupro", "pixel_f1_max": float, "num_images": int,
        "per_class": {class: {the same keys}}}`` where each defect class is evaluated on its own
        images plus all good images. Undefined metrics are nan (with a :class:`MetricWarning`).
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    _check_same_shape(maps, masks)
    scores = _scores_np(maps, "anomaly maps")
    masks_t = _masks_t(masks)
    if scores.ndim == 2:
        scores, masks_t = scores[None], masks_t[None]
    n = scores.shape[0]
    lab = None if labels is None else _labels_np(labels)
    img = None if image_scores is None else _scores_np(image_scores, "image scores").reshape(-1)
    for name, arr in (("image scores", img), ("labels", lab), ("class names", classes)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"{n} anomaly maps but {len(arr)} {name}")

    # Which images each result uses: all, then each defect class with the good images.
    groups: dict[str, np.ndarray | None] = {"": None}
    if lab is not None and classes is not None:
        names = np.asarray(list(classes), dtype=object)
        for cls in sorted({c for c, y in zip(classes, lab) if y == 1}):
            groups[cls] = (lab == 0) | ((names == cls) & (lab == 1))

    keys, counts, image_of_code, k = _pixel_keys(scores, masks_t)
    subs = {g: _pixel_subset(m, counts, image_of_code, k) for g, m in groups.items()}
    live = {g: s for g, s in subs.items() if not isinstance(s, str)}
    accs = dict(zip(live, _stream(keys, list(live.values()), max_fpr))) if live else {}
    del keys

    def result(g: str) -> dict:
        where = "" if not g else f" (class {g})"
        sub = subs[g]
        idx = np.arange(n) if groups[g] is None else np.flatnonzero(groups[g])
        out: dict = {}
        if isinstance(sub, str):
            out["pixel_auroc"] = _nan("pixel AUROC" + where, sub)
            out["aupro"] = _nan("AUPRO" + where, sub)
            out["pixel_f1_max"] = _nan("pixel F1-max" + where, sub)
        else:
            acc = accs[g]
            no_neg = "the masks have no defect-free pixel"
            out["pixel_auroc"] = acc.auroc() if sub.n_neg else _nan("pixel AUROC" + where, no_neg)
            out["aupro"] = acc.aupro() if sub.n_neg else _nan("AUPRO" + where, no_neg)
            out["pixel_f1_max"] = acc.f1
        if img is None or lab is None:
            out["image_auroc"] = math.nan
        else:
            res = _binary_metrics(img[idx], lab[idx] == 1)
            out["image_auroc"] = _nan("image AUROC" + where, res) if isinstance(res, str) else res.auroc()
        out["num_images"] = int(idx.size)
        return {key: out[key] for key in ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max", "num_images")}

    final = result("")
    final["per_class"] = {g: result(g) for g in groups if g}
    return final
