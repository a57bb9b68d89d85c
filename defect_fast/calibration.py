"""Pass/fail thresholds from held-back defect-free images, and the rates they give.

A line wants a pass/fail per part at a known false-alarm rate (FAR). The images a model was
trained on score optimistically low, so thresholds come from a slice of defect-free images held
back from training (:func:`split_holdback`).

Image threshold rule (:func:`image_threshold`). Let s_(1) >= s_(2) >= ... >= s_(n) be the scores
of n held-back defect-free images, and flag an image as defective when its score is strictly
greater than the threshold t = s_(k), the k-th largest held-back score. If a new defect-free image
is exchangeable with the held-back ones (same process, not trained on), its rank among the n + 1
scores is uniform, so

    expected FAR = P(new score > s_(k)) = k / (n + 1)        (at most that when scores tie).

The rule takes the largest k with k / (n + 1) <= far, i.e. k = floor(far * (n + 1)). It needs
k >= 1, that is n >= ceil(1 / far) - 1 held-back images: 99 for far = 0.01, 19 for 0.05. With
fewer, no order statistic reaches the asked rate; :func:`image_threshold` then either raises
:class:`CalibrationError` or (``fallback=True``) uses the largest held-back score, whose expected
FAR is 1 / (n + 1), and says so in ``note`` and with a :class:`CalibrationWarning`.

The realised FAR of one calibration varies around k / (n + 1): it follows Beta(k, n + 1 - k), and
``far_upper95`` is its 95 % upper bound (e.g. n = 99, k = 1: expected 0.01, upper bound 0.030).

Pixel threshold (:func:`pixel_threshold`): the same order-statistic rule over all pixels of the
held-back maps at a pixel false-alarm rate (default 0.001, i.e. the 99.9th percentile the
detector used before); pixels of a map above it form the defect regions (:func:`defect_regions`).
Its ``pixel_far_expected`` is nominal: k / (m + 1) would be the expected rate on new images if
pixels were exchangeable like images, but the pixels of one map share that image's level and
neighbourhood, so the top pixels of a few held-back maps set the threshold and a new defect-free
image can flag several times that share of its pixels (more so the more the maps' level varies
from image to image). It is a rank's nominal rate, not a promise about new images (the share of
the held-back pixels strictly above the threshold is (k - 1) / m or less); the image threshold
above is the calibrated one.

Evaluation helpers: :func:`f1_optimal_threshold` and :func:`rates_at` (false-alarm and miss rates
at a threshold).
"""
from __future__ import annotations

import math
import numbers
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np
import torch

__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "ImageThreshold",
    "ModelInfo",
    "PixelThreshold",
    "calibrate",
    "defect_regions",
    "evaluate_thresholds",
    "f1_optimal_threshold",
    "image_threshold",
    "min_images_for",
    "operating_points",
    "pixel_threshold",
    "rates_at",
    "scored_images",
    "short_names",
    "scores_named",
    "holdback_count",
    "split_holdback",
    "stored_thresholds",
    "threshold_at_far",
    "chosen_threshold",
    "ChosenThreshold",
]

_T = TypeVar("_T")

#: Default target image false-alarm rate (``--far``).
DEFAULT_FAR = 0.01
#: Default pixel false-alarm rate of the defect-region threshold.
DEFAULT_PIXEL_FAR = 0.001
_EPS = 1e-9  # guards floor(far * (n + 1)) against far given as e.g. 0.1 + 0.2


class CalibrationError(ValueError):
    """Too few or unusable held-back images for the asked rate; the message gives the numbers."""


class CalibrationWarning(UserWarning):
    """A threshold was set by a documented fallback instead of the asked rate."""


def _scores_1d(x, what: str) -> np.ndarray:
    # tensors in float64 before numpy: it has no bfloat16
    a = (x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return a


def _check_far(far: float, name: str = "far") -> float:
    """``far`` as a Python float (numpy's too: a numpy scalar stored in a model file would make it
    unloadable with ``weights_only=True``); a rate outside (0, 1) or not a number is refused, and
    one below the smallest normal float (1/far would overflow)."""
    if isinstance(far, bool) or not isinstance(far, numbers.Real) or not 0 < far < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {far!r}")
    if far < sys.float_info.min:
        raise ValueError(f"{name} must be at least {sys.float_info.min:.3g}, got {far!r}")
    return float(far)


def count_text(n: int) -> str:
    """An image count for a message: as it is, or rounded when it has more than 7 digits (--far
    1e-300 asked for a number of 300 digits)."""
    return str(n) if n < 10**7 else f"about {n:.2g}"


def min_images_for(far: float) -> int:
    """Fewest held-back images n for which the rule reaches ``far``: k = floor(far (n+1)) >= 1."""
    far = _check_far(far)
    return max(1, math.ceil(1.0 / far - _EPS) - 1)


def _rank_for(far: float, n: int) -> int:
    """k = floor(far (n+1)), at most n (a far within _EPS / (n+1) of 1 would make it n+1)."""
    return min(n, int(math.floor(far * (n + 1) + _EPS)))


def _beta_upper(k: int, n: int, q: float = 0.95) -> float:
    """q-quantile of Beta(k, n + 1 - k): upper bound on the realised FAR of the k-th largest of n."""
    from scipy.stats import beta

    return float(beta.ppf(q, k, n + 1 - k))


@dataclass
class ImageThreshold:
    """An image-score threshold and what it rests on (flag an image when score > threshold).

    Attributes:
        threshold: the k-th largest held-back score.
        far: the asked false-alarm rate.
        far_expected: k / (n + 1), the expected FAR on new defect-free images.
        far_upper95: 95 % upper bound of the realised FAR (Beta(k, n + 1 - k)).
        n_images: n, held-back images it rests on.
        rank: k.
        n_needed: images the asked rate needs (``min_images_for(far)``).
        sufficient: whether n >= n_needed (False: the fallback was used).
        note: one line for people: the rule, or why the asked rate was not reached.
    """

    threshold: float
    far: float
    far_expected: float
    far_upper95: float
    n_images: int
    rank: int
    n_needed: int
    sufficient: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_threshold(scores, far: float = DEFAULT_FAR, *, fallback: bool = True, images: str = "held-back") -> ImageThreshold:
    """Image threshold with expected false-alarm rate <= ``far`` from held-back scores.

    Args:
        scores: image scores [n] of held-back defect-free images (tensor, array or list).
        far: target false-alarm rate in (0, 1).
        fallback: when n is too small for ``far``, use the largest score (expected FAR
            1 / (n + 1)) with a :class:`CalibrationWarning`; False raises instead.
        images: what the scores' images are, in the note and the messages ("held-back", the
            training run's; "calibration", images given after training).

    Returns:
        :class:`ImageThreshold` (the rule is in this module's docstring).

    Raises:
        CalibrationError: no scores, or too few and ``fallback`` is False (the message gives n,
            the images needed and the lowest rate that n allows).
    """
    far = _check_far(far)
    s = _scores_1d(scores, f"{images} scores")
    n = s.size
    if n == 0:
        raise CalibrationError("no held-back defect-free images: cannot set an image threshold "
                               "(hold back some training images, e.g. --holdback 0.1)")
    need = min_images_for(far)
    k = _rank_for(far, n)
    desc = np.sort(s)[::-1]
    if k >= 1:
        # with the 95 % upper bound: one calibration set can give a threshold whose rate is well above the expected one
        note = (f"threshold = {k}{_ordinal(k)} largest of {n} {images} scores: expected false-alarm rate "
                f"{k}/{n + 1} = {k / (n + 1):.4g} <= {far:g} (95 % upper bound {_beta_upper(k, n):.3g})")
        return ImageThreshold(float(desc[k - 1]), far, k / (n + 1), _beta_upper(k, n), n, k, need, True, note)
    short = (f"far={far:g} needs at least {count_text(need)} {images} defect-free images (k/(n+1) <= far with k >= 1) "
             f"but only {n} are at hand; the lowest expected false-alarm rate {n} allow is 1/{n + 1} = {round_up(1 / (n + 1)):.4g}")
    if not fallback:
        raise CalibrationError(short)
    note = short + f"; using the largest {images} score (95 % upper bound of its rate {_beta_upper(1, n):.3g})"
    from .data.io import warn_data

    warn_data(note, stacklevel=2, category=CalibrationWarning)  # (in no registry: its text holds n and far)
    return ImageThreshold(float(desc[0]), far, 1 / (n + 1), _beta_upper(1, n), n, 1, need, False, note)


def _ordinal(k: int) -> str:
    return "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")


@dataclass
class PixelThreshold:
    """A pixel-score threshold for defect regions (pixels > threshold are defect pixels).

    Attributes: threshold; pixel_far (asked); pixel_far_expected (k / (m + 1): the rank's nominal
    rate, see the module docstring); n_pixels (m);
    n_images (maps it came from); rank (k); sufficient (m large enough for pixel_far).
    """

    threshold: float
    pixel_far: float
    pixel_far_expected: float
    n_pixels: int
    n_images: int
    rank: int
    sufficient: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pixel_threshold(maps, pixel_far: float = DEFAULT_PIXEL_FAR) -> PixelThreshold:
    """Defect-region threshold from anomaly maps of held-back defect-free images.

    Args:
        maps: float [N, H, W] (or [H, W]) maps of defect-free images.
        pixel_far: fraction of defect-free pixels allowed above the threshold, in (0, 1).

    Returns:
        :class:`PixelThreshold`: the k-th largest of the m pixel scores, k = floor(pixel_far (m+1))
        (the largest pixel when m is too small, with ``sufficient`` False).
    """
    pixel_far = _check_far(pixel_far, "pixel_far")
    t = maps.detach().cpu() if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps))
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.numel() == 0:
        raise CalibrationError(f"held-back maps must be a non-empty [N, H, W], got shape {tuple(t.shape)}")
    flat = t.reshape(-1).to(torch.float32)
    if not torch.isfinite(flat).all():
        raise ValueError("held-back maps contain NaN or infinite values")
    m = flat.numel()
    k = _rank_for(pixel_far, m)
    ok = k >= 1
    k = max(k, 1)
    value = float(flat.topk(k).values[-1]) if k <= 4096 else float(torch.kthvalue(flat, m - k + 1).values)
    return PixelThreshold(value, pixel_far, k / (m + 1), m, int(t.shape[0]), k, ok)


#: :func:`colour_scale` estimates its percentile from at most this many map values.
COLOUR_SCALE_SAMPLE = 2_000_000


def colour_scale(maps: torch.Tensor) -> float:
    """The 99.9th percentile of the values of ``maps`` (stored as "pixel_q999", the maps' colour
    scale where a run has no pixel threshold): exact up to :data:`COLOUR_SCALE_SAMPLE` values,
    else estimated from that many drawn at random (seed 0; ``torch.quantile`` takes at most
    2**24 values)."""
    flat = maps.detach().flatten().float()
    if flat.numel() > COLOUR_SCALE_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:COLOUR_SCALE_SAMPLE]]
    return float(torch.quantile(flat, 0.999))


#: How many of the highest-scoring calibration images :func:`calibrate` names.
NAMED_IMAGES = 5


def calibrate(scores, maps=None, far: float = DEFAULT_FAR, pixel_far: float = DEFAULT_PIXEL_FAR,
              *, fallback: bool = True, names: Sequence[str] | None = None, images: str = "held-back") -> dict[str, Any]:
    """Everything a model file stores about its thresholds, as a JSON-safe dict.

    Args:
        scores: image scores [n] of the held-back defect-free images.
        maps: their maps [n, H, W] (None: no pixel threshold).
        far, pixel_far, fallback, images: as in :func:`image_threshold` / :func:`pixel_threshold`.
        names: the images' names [n] (e.g. their files), or None. With few images the threshold
            is one image's score: naming it (and the next highest) lets a person look at the
            defect-free images the line's pass/fail rests on, e.g. a marked part among them.

    Returns:
        ``{"image_threshold": float, "far": ..., "far_expected", "far_upper95", "n_images", "rank",
        "n_needed", "sufficient", "note", "images": ``images``, "pixel_threshold": float | None, "pixel_far",
        "pixel_far_expected", "n_pixels", "score_mean", "score_std", "score_max"}``; with
        ``names`` also "threshold_image" (the image whose score is the threshold) and
        "highest_scores" ([[name, score], ...], the :data:`NAMED_IMAGES` highest, highest first);
        "held_back_scores": every held-back score, highest first (:func:`threshold_at_far` sets
        the threshold for another rate from them, after training).
    """
    pixel_far = _check_far(pixel_far, "pixel_far")  # stored even without maps; far is checked by image_threshold
    it = image_threshold(scores, far, fallback=fallback, images=images)
    s = _scores_1d(scores, f"{images} scores")
    out = {"image_threshold": it.threshold, **{k: v for k, v in it.to_dict().items() if k != "threshold"},
           "images": images}
    out.update(score_mean=float(s.mean()), score_std=float(s.std(ddof=1)) if s.size > 1 else 0.0, score_max=float(s.max()),
               held_back_scores=[float(v) for v in np.sort(s)[::-1]])
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != s.size:
            raise ValueError(f"{s.size} held-back scores but {len(names)} names")
        order = np.argsort(-s, kind="stable")  # ties: in the given order
        out["threshold_image"] = names[order[it.rank - 1]]
        out["highest_scores"] = [[names[i], float(s[i])] for i in order[:NAMED_IMAGES]]
    if maps is None:
        out.update(pixel_threshold=None, pixel_far=pixel_far, pixel_far_expected=None, n_pixels=0)
    else:
        pt = pixel_threshold(maps, pixel_far)
        out.update(pixel_threshold=pt.threshold, pixel_far=pt.pixel_far, pixel_far_expected=pt.pixel_far_expected,
                   n_pixels=pt.n_pixels)
    return out


def _from_training_images(cal: Mapping[str, Any]) -> bool:
    """Whether a calibration's scores are of training images (a run that held back none): optimistic,
    and no false-alarm rate to set by."""
    return cal.get("source") == "training images"


def threshold_at_far(calibration: Mapping[str, Any] | None, far: float) -> tuple[ImageThreshold, str | None]:
    """The image threshold for false-alarm rate ``far`` from a model file's held-back scores, set
    after training by the rule of :func:`image_threshold` (no fallback), and the held-back image
    whose score it is when the file names it.

    Model files store every held-back score (``held_back_scores``); older ones only the
    :data:`NAMED_IMAGES` highest (``highest_scores``), enough for the rates whose rank k is among them.

    Raises:
        CalibrationError: the file's thresholds do not apply (other inference settings), it holds no
            held-back scores (a run that held back none stores training-image scores: refused too),
            too few images for ``far``, or (older files) the k-th score is not stored.
    """
    far = _check_far(far)
    cal = dict(calibration or {})
    if cal.get("inapplicable"):
        raise CalibrationError(f"the model file's held-back scores were {cal['inapplicable']}; give --threshold, "
                               "or keep the run's settings")
    if _from_training_images(cal):
        raise CalibrationError("the run held back no images: its scores are of images it was trained on, which set "
                               "no false-alarm rate; give --threshold, or set one with defect-fast calibrate RUN IMAGES "
                               "--out NEW_RUN from defect-free images it has not seen")
    named = [(str(n), float(v)) for n, v in cal.get("highest_scores") or []]
    scores = cal.get("held_back_scores")
    n = len(scores) if scores is not None else cal.get("n_images")
    if not n or (scores is None and not named):
        raise CalibrationError("the model file stores no held-back scores to set a threshold from; give --threshold")
    k = _rank_for(far, n)
    if scores is None:  # an older file: its highest scores only
        if k > len(named):
            raise CalibrationError(f"far={far:g} takes the {k}{_ordinal(k)} largest of {n} held-back scores; this model "
                                   f"file (written before every score was stored) holds the {len(named)} highest only, "
                                   f"enough for rates below {(len(named) + 1) / (n + 1):.4g}; give --threshold, or retrain")
        scores = [v for _n, v in named] + [named[-1][1]] * (n - len(named))  # ranks beyond k are not read
    it = image_threshold(scores, far, fallback=False, images=scored_images(cal))
    it.note = f"set after training for far {far:g}: {it.note}"
    return it, (named[it.rank - 1][0] if it.rank <= len(named) else None)


def short_names(names: Sequence[str]) -> list[str]:
    """Each of ``names`` (paths) by its file name, or by as many of its last parts as tell it apart
    from the others (good/007.png beside train/good/007.png), for a line of highest scores."""
    parts = [Path(n).parts for n in names]
    out = []
    for p in parts:
        k = 1
        while k < len(p) and sum(1 for q in parts if q[-k:] == p[-k:]) > 1:
            k += 1
        out.append(str(Path(*p[-k:])) if p else "")
    return out


def scores_named(named: Sequence[tuple[str, float]]) -> str:
    """``[(image, score), ...]`` (a calibration's "highest_scores") as "0.123 (good/007.png), ...",
    each image by :func:`short_names`."""
    return ", ".join(f"{score:.4g} ({name})" for name, (_n, score) in zip(short_names([n for n, _s in named]), named))


def scored_images(calibration: Mapping[str, Any] | None) -> str:
    """What the images whose scores set a calibration's thresholds are, in a word: "held-back"
    (training's), "training" (a run that held none back: its source says "training images") or
    "calibration" (:func:`calibrate`'s given images); files from before the record: a
    ``calibrate`` output's are the images it was given."""
    cal = calibration or {}
    if cal.get("source") == "training images":  # set after calibrate()'s "images", in every model file
        return "training"
    return cal.get("images") or ("calibration" if cal.get("calibrated_from") else "held-back")


def stored_thresholds(calibration: Mapping[str, Any] | None, far: float | None = None) -> tuple[float | None, float | None, str]:
    """(image threshold, pixel threshold, where they came from) from a model file's calibration.

    Reads :func:`calibrate`'s keys; model files from before it (keys ``score_max``,
    ``pixel_q999``: the largest training-image score, optimistic) give those with a note saying so.
    With ``far``, the image threshold is :func:`threshold_at_far`'s (CalibrationError when the file
    cannot give it).
    """
    cal = dict(calibration or {})
    if far is not None:
        it, _name = threshold_at_far(cal, far)
        return it.threshold, cal.get("pixel_threshold"), it.note
    if cal.get("inapplicable"):  # Detector.load with other inference settings than the run's (another
        # top_fraction alone keeps the pixel threshold: the map is the same)
        return None, cal.get("pixel_threshold"), (f"no threshold: the model file's thresholds were "
                                                  f"{cal['inapplicable']}; give --threshold, or keep the run's settings")
    if "image_threshold" in cal:
        return cal["image_threshold"], cal.get("pixel_threshold"), cal.get("note", "held-back calibration")
    if "score_max" in cal:
        return (cal["score_max"], cal.get("pixel_q999"),
                "largest score of the calibration images (older model file; not a calibrated false-alarm rate)")
    return None, cal.get("pixel_q999"), "the model file holds no threshold"


class ChosenThreshold(NamedTuple):
    """The thresholds a command judges by (:func:`chosen_threshold`)."""

    image: float | None
    pixel: float | None
    source: str  # where the image threshold came from, for people
    image_name: str | None  # the calibration image whose score the image threshold is, when the file names it
    far_expected: float | None  # its expected false-alarm rate, as the file or threshold_at_far gives it


def chosen_threshold(calibration: Mapping[str, Any] | None, threshold: float | None = None,
                     far: float | None = None) -> ChosenThreshold:
    """The image threshold a command judges by: ``threshold`` given on its command line, the one
    for false-alarm rate ``far`` (:func:`threshold_at_far`; CalibrationError when the file cannot
    give it), or the stored one (:func:`stored_thresholds`); the pixel threshold is the stored one."""
    if threshold is not None and far is not None:
        raise ValueError("give threshold or far, not both")
    cal = dict(calibration or {})
    image, pixel, source = stored_thresholds(cal)
    # (thresholds set aside keep the rate their file was calibrated for, not one of a threshold in use)
    name, far_expected = (cal.get("threshold_image"), cal.get("far_expected")) if image is not None else (None, None)
    if threshold is not None:  # no rate was asked of it, and none is known
        image, source, name, far_expected = float(threshold), "given on the command line", None, None
    elif far is not None:
        it, name = threshold_at_far(cal, far)
        image, source, far_expected = it.threshold, it.note, it.far_expected
    return ChosenThreshold(image, pixel, source, name, far_expected)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _labels_1d(labels, n: int) -> np.ndarray:
    """The metrics' checked labels (0 or 1), as booleans, one per score."""
    from .metrics import _labels_np

    y = _labels_np(labels)
    if y.size != n:
        raise ValueError(f"{n} scores but {y.size} labels")
    return y.astype(bool)


def f1_optimal_threshold(scores, labels) -> dict[str, float]:
    """Image threshold with the best F1 for "defective" (flag when score > threshold).

    Args:
        scores: image scores [N]; labels: [N], 1 = defective, 0 = good.

    Returns:
        ``{"threshold", "f1", "precision", "recall"}``. Among cuts with equal F1 the one flagging
        the fewest images wins. The threshold is the largest score left unflagged (any value up to
        the next higher score flags the same images); flagging every image gives a threshold just
        below the smallest score. nan everywhere when no image is defective.
    """
    s = _scores_1d(scores, "image scores")
    y = _labels_1d(labels, s.size)
    n_pos = int(y.sum())
    if n_pos == 0:
        return {"threshold": math.nan, "f1": math.nan, "precision": math.nan, "recall": math.nan}
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    ends = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s.size - 1)  # last index of each tie run
    tp = np.cumsum(y_desc)[ends]
    fp = (ends + 1) - tp
    f1 = 2.0 * tp / (tp + fp + n_pos)
    j = int(np.argmax(f1))  # first maximum = highest cut
    # flag every score >= s_desc[ends[j]], i.e. > the next lower distinct score
    nxt = ends[j] + 1
    # flagging every image: the float32 below the smallest score, which stays below it when the
    # scores are compared in float32 (torch tensors), where a float64 step rounds back onto it
    thr = float(s_desc[nxt]) if nxt < s.size else float(np.nextafter(np.float32(s_desc[-1]), np.float32(-np.inf)))
    return {"threshold": thr, "f1": float(f1[j]), "precision": float(tp[j] / (tp[j] + fp[j])), "recall": float(tp[j] / n_pos)}


def threshold_text(threshold: float | None) -> str:
    """A threshold as text that reads back as the same number (``repr``): given again as
    ``--threshold``, it flags the same images. Rounded to a few digits, it may land below the
    largest score it leaves unflagged (the F1-optimal threshold is that score) or above the next."""
    if threshold is None or not math.isfinite(threshold):
        return "n/a"
    return repr(float(threshold))


def rates_at(scores, labels, threshold: float) -> dict[str, float | int]:
    """False-alarm and miss rates when images with score > ``threshold`` are flagged.

    Args:
        scores: image scores [N]; labels: [N], 1 = defective, 0 = good.

    Returns:
        ``{"threshold", "false_alarm_rate": false alarms / good images (nan without good images),
        "miss_rate": misses / defective images (nan without defective ones), "false_alarms",
        "misses", "n_good", "n_defective"}``.
    """
    s = _scores_1d(scores, "image scores")
    y = _labels_1d(labels, s.size)
    flagged = s > threshold
    fa, miss = int((flagged & ~y).sum()), int((~flagged & y).sum())
    n_good, n_def = int((~y).sum()), int(y.sum())
    return {"threshold": float(threshold),
            "false_alarm_rate": fa / n_good if n_good else math.nan,
            "miss_rate": miss / n_def if n_def else math.nan,
            "false_alarms": fa, "misses": miss, "n_good": n_good, "n_defective": n_def}


#: Most held-back ranks :func:`operating_points` lists, and the highest expected rate it goes to.
OPERATING_RANKS, OPERATING_FAR = 10, 0.1


def operating_points(scores, labels, calibration: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The thresholds ``--far`` can choose from a model file's held-back scores, and the rates each
    gives on a labelled test set: what a line trades between false alarms and misses.

    Lists the ranks k = 1, 2, ... (the k-th largest held-back score) up to an expected false-alarm
    rate of :data:`OPERATING_FAR` (at least k = 1) and :data:`OPERATING_RANKS` ranks, among the
    scores the file stores (older files: their 5 highest). Each is ``{"rank": k, "far_expected":
    k / (n + 1), "far": that rate rounded up to 4 significant digits (a ``--far`` that picks k),
    "threshold", **rates_at(...)}``; none when the file stores no held-back scores (training-image
    scores of a run that held back none do not count) or its thresholds do not apply.
    """
    cal = dict(calibration or {})
    if cal.get("inapplicable") or _from_training_images(cal):
        return []
    stored = cal.get("held_back_scores")
    if stored is None:
        stored = [v for _name, v in cal.get("highest_scores") or []]
        n = cal.get("n_images") or 0
    else:
        n = len(stored)
    if not stored or not n:
        return []
    last = min(len(stored), OPERATING_RANKS, max(1, _rank_for(OPERATING_FAR, n)))
    return [{"rank": k, "far_expected": k / (n + 1), "far": round_up(k / (n + 1)), **rates_at(scores, labels, stored[k - 1])}
            for k in range(1, last + 1)]


def round_up(x: float, digits: int = 4) -> float:
    """``x`` > 0 rounded up to ``digits`` significant digits (never below it, so that a rate
    k / (n + 1) printed this way still picks rank k: floor(far (n + 1)) = k)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - _EPS) / scale


def evaluate_thresholds(scores, labels, calibration: Mapping[str, Any] | None = None,
                        threshold: float | None = None, far: float | None = None) -> dict[str, Any]:
    """What ``evaluate`` reports about pass/fail on a labelled test set.

    Args:
        scores: image scores [N]; labels: [N], 1 = defective, 0 = good.
        calibration: the model file's calibration (:func:`calibrate`'s dict; older files work too).
        threshold: overrides the stored image threshold.
        far: instead, the threshold for this false-alarm rate from the stored held-back scores
            (:func:`threshold_at_far`).

    Returns:
        ``{"f1_optimal": f1_optimal_threshold(...), "n_good": the defect-free images among them,
        "at_threshold": rates_at(...) or None when there
        is no threshold, "far_asked": the rate asked of the threshold or None, "far_expected",
        "n_calibration_images", "threshold_source", "threshold_image": the image whose score the
        threshold is, when the model file names it, "threshold_images": what the images of those
        scores are (:func:`scored_images`), "operating_points":
        :func:`operating_points`}``; put ``at_threshold["false_alarm_rate"]`` next to ``far_asked``.
    """
    cal = dict(calibration or {})
    chosen = chosen_threshold(cal, threshold, far)
    far_asked = far if far is not None else (cal.get("far") if threshold is None else None)  # the rate asked of it
    return {"f1_optimal": f1_optimal_threshold(scores, labels), "far_asked": far_asked,
            "n_good": int((np.asarray(labels).reshape(-1) == 0).sum()),
            "far_expected": chosen.far_expected,
            "n_calibration_images": cal.get("n_images") if chosen.far_expected is not None else None,
            "threshold_image": chosen.image_name, "threshold_images": scored_images(cal),
            "at_threshold": rates_at(scores, labels, chosen.image) if chosen.image is not None else None,
            "threshold_source": chosen.source, "operating_points": operating_points(scores, labels, cal)}


# --------------------------------------------------------------------------------------------
# Regions and the held-back split
# --------------------------------------------------------------------------------------------


def defect_regions(m, threshold: float, *, min_area: int = 1, max_regions: int | None = 50) -> list[dict[str, Any]]:
    """Connected regions (8-connected) of map pixels above ``threshold``.

    Args:
        m: one map [H, W] (tensor or array).
        threshold: pixel threshold (e.g. :func:`pixel_threshold`).
        min_area: regions with fewer pixels are dropped.
        max_regions: keep the regions with the largest peak score, at most this many (None: all).

    Returns:
        List of ``{"x0", "y0", "x1", "y1" (inclusive pixel box), "area" (pixels), "peak", "mean"}``,
        by decreasing peak.
    """
    from .metrics import connected_components

    t = (m.detach().cpu() if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))).to(torch.float32)
    if t.dim() != 2:
        raise ValueError(f"map must be [H, W], got shape {tuple(t.shape)}")
    labels, k = connected_components(t > threshold)
    if k == 0:
        return []
    lab = labels.reshape(-1)
    vals = t.reshape(-1)
    sel = lab > 0
    lab_s, val_s = lab[sel] - 1, vals[sel]
    idx = sel.nonzero().squeeze(1)
    ys, xs = idx // t.shape[1], idx % t.shape[1]
    area = torch.bincount(lab_s, minlength=k)
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, lab_s, val_s.double())
    peak = torch.full((k,), -math.inf).scatter_reduce(0, lab_s, val_s, "amax")
    big = torch.iinfo(torch.int64).max
    x0 = torch.full((k,), big).scatter_reduce(0, lab_s, xs, "amin")
    y0 = torch.full((k,), big).scatter_reduce(0, lab_s, ys, "amin")
    x1 = torch.full((k,), -1).scatter_reduce(0, lab_s, xs, "amax")
    y1 = torch.full((k,), -1).scatter_reduce(0, lab_s, ys, "amax")
    regions = [{"x0": int(x0[i]), "y0": int(y0[i]), "x1": int(x1[i]), "y1": int(y1[i]), "area": int(area[i]),
                "peak": float(peak[i]), "mean": float(total[i] / area[i])}
               for i in range(k) if int(area[i]) >= min_area]
    regions.sort(key=lambda r: -r["peak"])
    return regions if max_regions is None else regions[:max_regions]


def holdback_count(n: int, fraction: float, min_count: int = 4) -> int:
    """How many of ``n`` images :func:`split_holdback` holds back: none for ``fraction`` 0, else
    max(min_count, round(fraction * n))."""
    return 0 if fraction == 0 else max(min_count, int(round(fraction * n)))


def split_holdback(items: Sequence[_T], fraction: float = 0.1, *, min_count: int = 4, seed: int = 0,
                   min_train: int = 1) -> tuple[list[_T], list[_T]]:
    """Split training images into (train, held back), the held-back ones never trained on.

    Deterministic: the items are ordered by ``str(item)`` (so the input order does not matter),
    shuffled with ``random.Random(seed)``, and the first max(min_count, round(fraction * n)) are
    held back (none when ``fraction`` is 0). Both lists come back in the input order.

    Args:
        items: image paths (or anything with a stable ``str``), no duplicates.
        fraction: share held back, in [0, 1).
        min_count: fewest held back when ``fraction`` > 0.
        seed: shuffle seed.
        min_train: fewest left for training.

    Raises:
        ValueError: bad fraction, duplicates, or too few items for ``min_count`` + ``min_train``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdback fraction must be in [0, 1), got {fraction}")
    items = list(items)
    keys = [os.fspath(i) if isinstance(i, os.PathLike) else str(i) for i in items]
    if len(set(keys)) != len(keys):
        raise ValueError("holdback split: the image list holds duplicates")
    n = len(items)
    n_held = holdback_count(n, fraction, min_count)
    if n_held and n - n_held < min_train:
        raise ValueError(f"holdback split: {n} images cannot hold back {n_held} (fraction {fraction:g}, at least "
                         f"{min_count}) and still train on {min_train}")
    order = sorted(range(n), key=lambda i: keys[i])
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [items[i] for i in range(n) if i not in held], [items[i] for i in range(n) if i in held]


# --------------------------------------------------------------------------------------------
# What a deployed model is judged by
# --------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """Metadata that goes with a predict function (for :mod:`.watch` and :mod:`.report`).

    Attributes:
        image_size: side S of the square uint8 images [N, 3, S, S] the predict function takes.
        name: model name (e.g. "cmaae").
        version: model version written into every result (e.g. a hash of the model file).
        image_threshold: flag an image when its score > this (None: not calibrated).
        pixel_threshold: map pixels above it form defect regions (None: no regions).
        map_scale: map value drawn white in map PNGs (None: 2 x pixel_threshold, else each map's max).
        extra: anything else worth recording (calibration notes, run folder).
    """

    image_size: int
    name: str = "model"
    version: str = "unknown"
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    map_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_calibration(cls, image_size: int, name: str, version: str, calibration: Mapping[str, Any] | None,
                         threshold: float | None = None, far: float | None = None, **extra: Any) -> "ModelInfo":
        """From a model file's calibration dict; ``threshold`` overrides the stored image threshold,
        ``far`` sets it for that false-alarm rate from the stored held-back scores
        (:func:`threshold_at_far`; ``extra["far"]`` then says so).
        ``extra["threshold_image"]``: the image whose score the threshold is, when the file names
        it and the threshold is not given on the command line; ``extra["threshold_images"]`` says
        what the images whose scores set it are (:func:`scored_images`); ``extra["far_expected"]``
        and ``extra["n_calibration_images"]``: its expected false-alarm rate k / (n + 1) and n
        (as :func:`evaluate_thresholds` gives them; None for a threshold given as a number)."""
        chosen = chosen_threshold(calibration, threshold, far)
        named = {"threshold_image": chosen.image_name} if chosen.image_name else {}
        extra = {"threshold_images": scored_images(calibration), "far_expected": chosen.far_expected,
                 "n_calibration_images": (calibration or {}).get("n_images") if chosen.far_expected is not None else None,
                 **extra}
        if far is not None:
            extra = {**extra, "far": far, **named}
        elif chosen.image_name:
            extra = {**named, **extra}
        return cls(image_size, name, version, chosen.image, chosen.pixel, extra={"threshold_source": chosen.source, **extra})

    @classmethod
    def from_detector(cls, det, run: str | os.PathLike, threshold: float | None = None,
                      far: float | None = None) -> "ModelInfo":
        """For a loaded :class:`~defect_fast.detect.Detector` of ``run`` (run folder or model file).

        ``version`` is the first 12 hex digits of the model file's SHA-256 (a retrained or damaged
        file gets a new one): of the bytes ``det`` was loaded from when ``run`` is that file
        (:meth:`~defect_fast.detect.Detector.loaded_sha256`), else of the file there now; thresholds come from the model file's calibration
        (:func:`stored_thresholds`), ``threshold`` overriding the image threshold and ``far``
        setting it for that rate (:meth:`from_calibration`). ``extra`` holds the run, the map, the
        asked false-alarm rate, where the threshold came from, the images the thresholds rest on
        ("calibrated_on": the held-back images, or those given to ``defect-fast calibrate``) and, as
        "held_back", the calibration keys :func:`operating_points` reads.
        """
        from .runs import model_file
        from .safety import file_sha256

        cal = dict(getattr(det, "calibration", None) or {})
        name = getattr(det.model, "name", "") or type(det.model).__name__
        path = model_file(run)
        loaded = getattr(det, "loaded_sha256", None)
        sha = (loaded(path) if loaded is not None else None) or file_sha256(path)
        info = cls.from_calibration(det.image_size, name, sha[:12], cal, threshold, far, run=str(run), map=det.map_kind)
        if threshold is None:  # the rate asked at training, unless --far asked another; a given threshold asked none
            info.extra.setdefault("far", cal.get("far"))
        if cal.get("source") and not cal.get("inapplicable"):  # held-back images, or those given to calibrate
            info.extra["calibrated_on"] = cal["source"]
        # what operating_points reads: the rates other thresholds would give (report)
        info.extra["held_back"] = {k: cal[k] for k in ("held_back_scores", "highest_scores", "n_images", "inapplicable",
                                                       "source") if k in cal}
        if getattr(det, "trained_proportions", None) is not None:  # images far outside them are said (watch, report)
            info.extra["trained_proportions"] = list(det.trained_proportions)
        return info

    def scale(self) -> float:
        """Value drawn white in map images (0 = each map's own maximum, see visualize.save_map)."""
        if self.map_scale:
            return float(self.map_scale)
        return 2.0 * float(self.pixel_threshold) if self.pixel_threshold else 0.0
