"""Evaluation of a trained run on a labelled test split, and the Detector the trainer calibrates with."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .detect import Detector
from .models import AnomalyModel


def detector_for(model: AnomalyModel, image_size: int, device: torch.device | str = "cpu", *,
                 map_kind: str | None = None, stride: int | None = None, blend: str = "none",
                 smooth_sigma: float = 0.0) -> Detector:
    """The :class:`Detector` of a freshly trained ``model`` with the run's inference settings (no
    normalisation and no perceptual statistics yet): what the trainer calibrates with (train.py
    does not import detect.py). An image-level map ("perceptual") is not set: the Detector computes
    the model's own map until :meth:`Detector.fit_perceptual` fits it and switches to it."""
    image_level = map_kind in model.image_maps
    return Detector(model, image_size=image_size, map_kind=None if image_level else map_kind, stride=stride,
                    device=device, smooth_sigma=smooth_sigma, blend=blend)


def evaluate_run(run: Path | str, data: Path | str, map_kind: str | None = None, device: str = "auto",
                 stride: int | None = None, smooth: float | None = None, far: float | None = None,
                 threshold: float | None = None, **options) -> dict[str, Any]:
    """Evaluate a trained run on the test split of an MVTec-style folder; returns the metrics dict.

    ``options`` go to :class:`Detector` (blend, precision, ...). Adds "n_images", "map",
    "smooth_sigma", "stride", "blend", "inference_ms_per_image" and "thresholds" to :func:`defect_fast.metrics.evaluate`'s
    keys; "thresholds" is :func:`defect_fast.calibration.evaluate_thresholds` (the F1-optimal image
    threshold, the false-alarm and miss rates at the stored one next to the asked rate; with
    ``far``, at the threshold for that rate set from the stored held-back scores, checked before
    the test images are read; with ``threshold``, at that image threshold).
    """
    from .calibration import evaluate_thresholds, threshold_at_far
    from .data import load_test_set
    from .data.io import blank_images
    from .metrics import evaluate
    from .runs import load_model_state

    state = load_model_state(run)
    # a setting the model cannot take (stride beyond the patch, ...) is a one-line SettingError
    det = Detector.from_state(state, device, map_kind, stride, smooth, where=run, **options)
    if far is not None:
        threshold_at_far(det.calibration, far)  # a rate the run cannot give fails before the work
    test = load_test_set(data, det.image_size, require_masks=False)
    det.check_proportions(test.sizes, test.paths, Path(data) / "test")
    # the stored thresholds judge the test images when no --threshold is given (--far: from their scores)
    seen = seen_test_images(state, test.images, test.paths, run,
                            thresholds_used=threshold is None and "inapplicable" not in det.calibration)
    t0 = time.perf_counter()
    res = det.predict_batched(test.images)
    seconds = time.perf_counter() - t0
    n_images = int(test.images.shape[0])
    # blank frames (a camera fault) are scored and counted as the images they stand for; named, as
    # predict marks them and watch and report judge none
    blank = [str(p) for p, b in zip(test.paths, blank_images(test.images).tolist()) if b]
    test.images = None  # let go before the pixel metrics, whose peak is the command's: 3 bytes a pixel less
    check_finite(res, test.paths, run, det.precision, "test images")
    if test.has_masks:
        metrics = evaluate(res["maps"], test.masks, res["scores"], test.labels, test.classes)
    else:
        metrics = image_level_metrics(res["scores"], test.labels, test.classes)
    metrics["n_images"] = n_images
    metrics["map"] = det.map_kind
    metrics["smooth_sigma"] = det.smooth_sigma
    metrics["stride"] = det.stride
    metrics["blend"] = det.blend
    metrics["inference_ms_per_image"] = 1000 * seconds / max(1, n_images)
    metrics["thresholds"] = evaluate_thresholds(res["scores"], test.labels, det.calibration, threshold=threshold, far=far)
    metrics["seen_by_run"] = seen
    metrics["blank_images"] = blank
    return metrics


def seen_test_images(state: dict[str, Any], images: torch.Tensor, paths: list, run: Path | str, *,
                     thresholds_used: bool = True, what: str = "test images") -> dict[str, list[str] | None] | None:
    """Which test images the run has seen, found by their pixels as read (the model file's record,
    :func:`defect_fast.recalibrate.recorded_keys`): ``{"trained": names of those it trained on or
    fitted its map statistics on, "thresholds": names of the others its stored thresholds were set
    on}`` (each None when the file cannot say), each said in a warning, since the metrics,
    or the false-alarm and miss rates at the stored threshold (``thresholds_used``), are optimistic
    on them. ``what`` names the images in the warnings. None when the model file records nothing
    (written before the record)."""
    from .recalibrate import recorded_keys
    from .data.io import image_keys
    from .train import TrainConfig

    cfg = TrainConfig.from_json(state["train_config"]) if state.get("train_config") else None
    recorded = recorded_keys(state, cfg)
    if recorded is None:
        return None
    keys = image_keys(images)
    trained = set(recorded["seen"] or ())
    seen: dict[str, list[str] | None] = {
        "trained": None if recorded["seen"] is None else [str(p) for p, k in zip(paths, keys) if k in trained]}
    if recorded["thresholds"] is None:
        seen["thresholds"] = None
    else:
        rest = set(recorded["thresholds"]) - trained
        seen["thresholds"] = [str(p) for p, k in zip(paths, keys) if k in rest]

    def listed(names: list[str]) -> str:
        return (f"{len(names)} of the {len(paths)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                + ("is one" if len(names) == 1 else "are ones"))

    if seen["trained"]:
        warnings.warn(f"{run}: {listed(seen['trained'])} the run trained on or fitted its map on, found by "
                      "their pixels: the metrics are optimistic; evaluate on images the run has not seen")
    if seen["thresholds"] and thresholds_used:
        warnings.warn(f"{run}: {listed(seen['thresholds'])} its thresholds were set on, found by their "
                      "pixels: the false-alarm rate at its thresholds is optimistic on them")
    return seen


def check_finite(res: dict[str, torch.Tensor], paths: list | None, run: Path | str | None, precision: str | None,
                 what: str) -> None:
    """Refuse maps or scores that are NaN or infinite (a model file whose weights diverged, or a
    reduced precision that overflows), in one line naming the images, before any metric,
    threshold or verdict (NaN > threshold is False: such an image would pass). ``paths`` name
    the images (None: their positions), ``run`` the model (None: not named); ``res`` without
    "scores": the maps alone."""
    from .runs import NonFiniteMaps

    finite = torch.isfinite(res["maps"]).flatten(1).all(1)
    bad = ~(finite & torch.isfinite(res["scores"]) if "scores" in res else finite)
    if bad.any():
        i = int(bad.nonzero()[0])
        first = paths[i] if paths is not None else f"image {i}"
        how = f"; inference in {precision}" if precision else ""
        raise NonFiniteMaps(f"{'' if run is None else f'{run}: '}the model gives NaN or infinite maps or scores for "
                       f"{int(bad.sum())} of {bad.numel()} {what} (the first: {first}{how}); its weights or "
                       "statistics are not usable")


def image_level_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """The keys of :func:`defect_fast.metrics.evaluate` for a test set without pixel masks: image
    AUROC overall and per defect class (its images and the good ones); the pixel metrics are None."""
    from .metrics import image_auroc

    pixel = {"pixel_auroc": None, "aupro": None, "pixel_f1_max": None}
    lab = labels.reshape(-1)
    good = lab == 0
    out: dict[str, Any] = {"image_auroc": image_auroc(scores, lab), **pixel, "num_images": int(lab.numel()),
                           "pixel_metrics": "none: the test set has no ground_truth/ folder (image-level results only)"}
    per_class = {}
    for cls in sorted({c for c, y in zip(classes, lab.tolist()) if y == 1}):
        rows = good | torch.tensor([c == cls for c in classes])
        per_class[cls] = {"image_auroc": image_auroc(scores[rows], lab[rows]), **pixel, "num_images": int(rows.sum())}
    out["per_class"] = per_class
    return out


__all__ = ["check_finite", "detector_for", "evaluate_run", "image_level_metrics", "seen_test_images"]
