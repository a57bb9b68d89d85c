"""``defect-fast calibrate``: set a finished run's pass/fail thresholds again, from defect-free
images it has not seen, without training again.

A run's stored thresholds rest on the images it held back at training (``--holdback``; 60 of the
600 magnetic-tile images). That is often too few or the wrong ones for a line:

- the rule behind a false-alarm rate (:func:`defect_fast.calibration.image_threshold`) needs
  ``1/far - 1`` images for rate ``far``: 99 for the default 0.01, so a run with 60 falls back to
  its largest held-back score;
- the held-back images are a random share of the training folder: a marked part among them sets
  the threshold (the run's log names the image), and a later lighting or camera change on the
  line is not in them.

:func:`recalibrate` predicts the given images with the run's own settings and writes a copy of
the run's model file whose calibration (image and pixel thresholds, every score, the highest
images named) comes from them, optionally together with the run's own held-back images. The
weights, the map statistics, the image context and the image score stay as they were: an image
scores the same under the new file as under the old one; only the thresholds move.

Images the run was trained on, or fitted its map statistics on, give optimistic thresholds (a
z-score is smallest in its own sample): they are refused, found by their pixels as read. The
model file records them (``image_keys``: SHA-256 of each image as read, by training); for files
written before that, the run's training folder is read instead, and when it is gone a warning
says the check was not made. Identical images are counted once. The new file adds the keys of
the images its thresholds rest on (``image_keys["calibrated"]``), which ``evaluate`` looks for
among its test images (:func:`recorded_keys`).

Command line::

    defect-fast calibrate RUN [IMAGES ...] --out NEW_RUN [--with-held-back] [--far RATE] [--overwrite] [--device auto]

``NEW_RUN`` is a new folder (or one an earlier ``calibrate`` wrote, with ``--overwrite``) holding
``model.pt``, which every other command takes as a run, and ``calibration.json``: the old and new
thresholds and the images they rest on.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .safety import UsageError

#: What ``calibrate`` writes in its output folder.
OUTPUT_FILES = ("model.pt", "calibration.json")


def _seen_images(state: dict[str, Any], cfg) -> tuple[list[bytes] | None, str]:
    """Pixel keys (:func:`defect_fast.data.io.image_keys`) of the images the run trained on or fitted
    its map statistics on, and a note: from the model file (``image_keys``, written by training
    since calibrate exists) or, for older files, from the run's training folder as it is now;
    (None, why) when that cannot be read."""
    from .data.dataset import load_train_images
    from .data.io import image_keys

    recorded = recorded_keys(state, cfg)
    if recorded is not None and recorded["seen"] is not None:
        keys = recorded["seen"]
        return keys, f"the {len(keys)} images recorded in the model file"
    if cfg is None or not cfg.data:
        return None, "the model file does not name its training images"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the training folder's own notes (skipped files) were said at training
            images, paths = load_train_images(cfg.data, int(state["image_size"]))
    except (OSError, ValueError) as exc:
        return None, f"its training images could not be read ({exc})"
    held = [str(p) for p in state.get("held_back") or []]
    fitted = set(_fit_half(held, state, cfg)[0])
    seen = [i for i, p in enumerate(paths) if str(p) not in held or str(p) in fitted]
    keys = image_keys(images)
    # and the images a fit in Python recorded (a file trained before the record, fitted again)
    fitted_now = _fitted_keys(state)
    return [keys[i] for i in seen] + fitted_now, f"{len(seen)} images of {cfg.data}" + (
        f" and the {len(fitted_now)} a fit in Python recorded" if fitted_now else "")


def _fitted_keys(state: dict[str, Any]) -> list[bytes]:
    """The pixel keys of the images a fit in Python recorded (``image_keys["fitted"]``,
    :meth:`defect_fast.detect.Detector.save`), which the map has seen besides the run's."""
    recorded = state.get("image_keys")
    return [bytes.fromhex(k) for k in ((recorded.get("fitted") if isinstance(recorded, dict) else None) or [])]


def recorded_keys(state: dict[str, Any], cfg=None) -> dict[str, list[bytes] | None] | None:
    """What the model file records of the images behind it (``image_keys``, pixel keys as
    :func:`defect_fast.data.io.image_keys` gives them): ``{"seen": the images the run trained on or
    fitted its map statistics on, "thresholds": those its stored thresholds were set on}`` (an
    earlier ``calibrate``'s images; else the held-back images the map was not fitted on; with none
    held back, the training images). None for a file without the record (written before it);
    "seen" is None when no training images are recorded (a file trained before the record, whose
    later ``calibrate`` or fit in Python recorded its own images only: :func:`_seen_images` reads
    the training folder then); "thresholds" None when the file's held-back names and keys do not
    pair up, or ``"calibrated"`` is None (a calibrate in Python on float images, or a fit since
    that set the thresholds aside). A fit in Python (:meth:`defect_fast.detect.Detector.save`)
    adds its images' keys, "fitted", to those seen."""
    recorded = state.get("image_keys")
    if not isinstance(recorded, dict):
        return None
    if "trained" not in recorded:
        if "calibrated" not in recorded and "fitted" not in recorded:
            return None
        calibrated = recorded.get("calibrated")
        return {"seen": None, "thresholds": None if calibrated is None else [bytes.fromhex(k) for k in calibrated]}
    fitted_now = _fitted_keys(state)
    held = [str(p) for p in state.get("held_back") or []]
    held_keys = list(recorded.get("held_back") or [])
    paired = len(held_keys) == len(held)
    fitted = set(_fit_half(held, state, cfg)[0]) if paired else set()
    trained = list(recorded["trained"])
    seen = trained + [k for p, k in zip(held, held_keys) if p in fitted]
    if "calibrated" in recorded:
        thresholds = None if recorded["calibrated"] is None else list(recorded["calibrated"])
    elif not paired:
        thresholds = None
    else:
        thresholds = [k for p, k in zip(held, held_keys) if p not in fitted] or trained
    return {"seen": [bytes.fromhex(k) for k in seen] + fitted_now,
            "thresholds": None if thresholds is None else [bytes.fromhex(k) for k in thresholds]}


def _check_held_back_unchanged(run, state: dict[str, Any], held: list[str], keys: list[bytes]) -> None:
    """Refuse held-back files whose pixels are not those the run recorded for them (a camera's
    numbering that restarted wrote other parts, defective ones among them, over old names): their
    scores would set the thresholds as if they were the run's defect-free images. Model files
    written before the keys were recorded are not checked."""
    from .runs import RunError

    recorded = state.get("image_keys")
    names = [str(p) for p in state.get("held_back") or []]
    stored = list(recorded.get("held_back") or []) if isinstance(recorded, dict) else []
    if len(stored) != len(names):
        return
    was = dict(zip(names, stored))
    changed = [p for p, k in zip(held, keys) if p in was and was[p] != k.hex()]
    if changed:
        raise RunError(f"{run}: --with-held-back: {len(changed)} of its held-back images changed since the run held "
                       f"them back ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): thresholds from "
                       "them would rest on other images than the run's; restore them, or calibrate without "
                       "--with-held-back on defect-free images given by name")


def _fit_half(held: list[str], state: dict[str, Any], cfg) -> tuple[list[str], list[str]]:
    """The run's held-back files split into (fitted the map statistics, calibrated): when the map
    statistics were fitted on held-back images (``--fit-on held-back``, or ``train`` with fewer than
    2 training images), every other one fitted (``train.finish_run``). The file's
    ``calibration["map_fitted_on"]`` says which; files from before it, the run's ``fit_on``."""
    cal = state.get("calibration") or {}
    if "map_fitted_on" in cal:
        on_held = str(cal["map_fitted_on"] or "").endswith("held-back images")
    else:
        fitted_map = bool(state.get("perceptual")) or bool(state.get("normalization"))
        on_held = cfg is not None and cfg.fit_on == "held-back" and fitted_map
    return (held[0::2], held[1::2]) if on_held else ([], held)


def recalibrate(run: str | Path, images: Sequence[str | Path] = (), out: str | Path | None = None, *,
                far: float | None = None, with_held_back: bool = False, device: str = "auto",
                overwrite: bool = False, precision: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``out/model.pt``: the run's model with thresholds set from ``images`` (files or
    folders of defect-free images the run has not seen) and, with ``with_held_back``, the run's
    own held-back images (those it did not fit its map statistics on).

    Args:
        run: run folder or model file.
        far: the image threshold's false-alarm rate (default: the rate the run's thresholds were set
            at: that of an earlier ``calibrate`` for its output, else the one the run was trained with);
            when given, too few images for it is refused (:class:`~defect_fast.safety.UsageError`),
            while the run's own rate falls back to the largest score with a warning, as at training.
        device: where the images are predicted.
        precision: what they are predicted in ("float32", "bfloat16", "float16"; None: the Detector's default
            on ``device``): that of the Detector or exported file that will judge by the thresholds
            (the model file records it; loading it to compute in another warns).
        overwrite: replace an earlier ``calibrate`` output in ``out`` (only its files).

    Returns:
        ``{"model": out/model.pt, "calibration": the new calibration dict, "before": the run's}``.

    Raises:
        UsageError: no images asked for, too few for ``far``; DataError: unreadable images, images the
        run trained on; RunError: a damaged run, held-back images gone; OutputRefused: ``out``.
    """
    from .calibration import DEFAULT_FAR, count_text, min_images_for, round_up, scores_named, threshold_text
    from .data.io import blank_images, collect_images, image_keys, read_images
    from .detect import Detector, _checked_calibration
    from .runs import MODEL_FILE, RunError, load_model_state, model_file
    from .safety import OutputFolder, save_with_digest
    from .train import TrainConfig

    if out is None:
        raise UsageError("calibrate: --out is required")
    if not images and not with_held_back:
        raise UsageError("calibrate: give defect-free images (files or folders) the run has not seen, "
                         "and/or --with-held-back")
    out = Path(out)
    inputs = [run, *images]
    OutputFolder.check(out, overwrite=overwrite, inputs=inputs, command="calibrate")  # before any reading
    path = model_file(run)
    state = load_model_state(path)
    try:  # thresholds that are no numbers (a damaged file): the ones this command sets anew
        _checked_calibration(state.get("calibration"), path)
    except RunError as exc:
        log(f"{exc}; they are set anew here")
        cal = state["calibration"] if isinstance(state.get("calibration"), dict) else {}
        far_was = cal.get("far")  # the rate asked, and the images the map was fitted on, are kept
        state["calibration"] = {**({"far": far_was} if isinstance(far_was, (int, float)) and not isinstance(far_was, bool)
                                   and 0 < far_was < 1 else {}),
                                **({"map_fitted_on": cal["map_fitted_on"]} if "map_fitted_on" in cal else {})}
    cfg = TrainConfig.from_json(state["train_config"]) if state.get("train_config") else None
    if cfg is not None and cfg.data:  # its training folder, which the run's held-back images are in: an input too
        inputs.append(cfg.data)
        OutputFolder.check(out, overwrite=overwrite, inputs=inputs, command="calibrate")
    with warnings.catch_warnings():  # the run's thresholds, of another precision, are replaced here
        warnings.filterwarnings("ignore", message=".*its thresholds were measured in")
        det = Detector.from_state(state, device, where=path,  # the run's own inference settings, so its maps and scores
                                  **({"precision": precision} if precision else {}))
    size = det.image_size
    asked = far is not None
    # the rate the run's thresholds were set at: a calibrated run's own, else the one it was trained with
    stored_far = (state.get("calibration") or {}).get("far")
    far = float(far) if asked else float(stored_far or getattr(cfg, "far", None) or DEFAULT_FAR)

    paths = collect_images(images) if images else []
    n_given = len(paths)
    if with_held_back:
        held = _fit_half([str(p) for p in state.get("held_back") or []], state, cfg)[1]
        if not held:
            raise RunError(f"{run}: --with-held-back: the run held back no images it did not fit its map on")
        gone = [p for p in held if not Path(p).is_file()]
        if gone:
            raise RunError(f"{run}: --with-held-back: {len(gone)} of its {len(held)} held-back images are gone "
                           f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})")
        paths += [Path(p) for p in held]
    sizes: list = []
    batch = read_images(paths, size, where="calibrate inputs", sizes=sizes)  # every bad file named, before any output
    # thresholds set on images stretched otherwise than the training images hold for none of them
    det.check_proportions(sizes, paths, "calibrate inputs")

    keys = image_keys(batch)
    if with_held_back:  # the files at the held-back names must still hold the pixels the run held back
        _check_held_back_unchanged(run, state, [str(p) for p in paths[n_given:]], keys[n_given:])
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < len(keys):
        twins = [paths[i].name for i, k in enumerate(keys) if first[k] != i]
        log(f"{len(twins)} image(s) are identical to another given one and count once ({', '.join(twins[:3])}"
            f"{', ...' if len(twins) > 3 else ''})")
        keep = sorted(first.values())
        n_given = sum(1 for i in keep if i < n_given)  # a held-back image also given counts as given
        batch, paths, keys = batch[keep], [paths[i] for i in keep], [keys[i] for i in keep]
    blank = blank_images(batch)
    if bool(blank.any()):  # a camera fault, never judged by watch: a black frame's score set the threshold 8x higher
        if bool(blank.all()):
            raise UsageError(f"calibrate: every one of the {len(paths)} images is a blank frame, one colour throughout "
                             "(a failed exposure, a covered lens?); give photographs of defect-free parts")
        left = [paths[i] for i in blank.nonzero().flatten().tolist()]
        log(f"{len(left)} blank frame(s), one colour throughout, are left out: a camera fault, which watch sets aside "
            f"and never judges ({', '.join(str(p) for p in left[:3])}{', ...' if len(left) > 3 else ''})")
        keep = (~blank).nonzero().flatten().tolist()
        n_given = sum(1 for i in keep if i < n_given)
        batch, paths, keys = batch[keep], [paths[i] for i in keep], [keys[i] for i in keep]
    seen, seen_what = _seen_images(state, cfg)
    if seen is None:
        warnings.warn(f"{run}: could not check that the images were not trained on: {seen_what}")
    else:
        trained = set(seen)
        known = [str(p) for p, k in zip(paths, keys) if k in trained]
        if known:
            from .data.io import DataError

            raise DataError(f"calibrate: {len(known)} of the images {'is one' if len(known) == 1 else 'are ones'} {run} trained on or fitted its map on "
                            f"({', '.join(known[:3])}{', ...' if len(known) > 3 else ''}): thresholds set on them are "
                            "optimistic; give defect-free images the run has not seen")
    earlier = (state.get("image_keys") or {}).get("calibrated")
    given_now = {k.hex() for k in keys}
    dropped = [k for k in earlier if k not in given_now] if isinstance(earlier, list) else []
    if dropped:  # a calibrated copy calibrated again (in another precision, say) from its held-back images alone
        log(f"{run}: its thresholds rested on {len(dropped)} image(s) not given now (given to an earlier calibrate: "
            "the model file keeps digests of their pixels, not their files), which the new thresholds leave out; "
            "give them again to keep them in")
    n = batch.shape[0]
    if asked and n < min_images_for(far):
        raise UsageError(f"--far {far:g}: needs at least {count_text(min_images_for(far))} defect-free images, got {n}; the "
                         f"lowest rate {n} allow is 1/{n + 1} = {round_up(1 / (n + 1)):.4g}")

    before = dict(state.get("calibration") or {})
    names = [str(Path(p).resolve()) for p in paths]  # as training names its held-back images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few images for the run's own rate: said below, as train does
        try:
            cal = dict(det.calibrate(batch, far, names=names))
        except RunError as exc:  # NaN or infinite maps: the images are named, the run is added
            raise RunError(f"{path}: {exc}") from None
    parts = ([f"{n_given} defect-free images given to calibrate"] if n_given else []) + \
        ([f"{n - n_given} images the run held back"] if n > n_given else [])
    cal["source"] = " and ".join(parts)
    cal["map_fitted_on"] = before.get("map_fitted_on")
    cal["calibrated_from"] = {"run": str(path), "image_threshold": before.get("image_threshold"),
                              "pixel_threshold": before.get("pixel_threshold"), "n_images": before.get("n_images"),
                              "source": before.get("source")}
    was = before.get("image_threshold")
    # what the run's own threshold does on these defect-free images: the false alarms it would raise
    flagged_before = (sum(1 for v in cal["held_back_scores"] if v > was) if isinstance(was, (int, float))
                      and not before.get("inapplicable") else None)
    state["calibration"] = cal
    # the images the thresholds now rest on, by their pixels (evaluate names test images among them)
    state["image_keys"] = {**(state.get("image_keys") or {}), "calibrated": [k.hex() for k in keys]}
    state.pop("tensor_digest", None)  # the new file gets its own

    folder = OutputFolder.create(out, overwrite=overwrite, inputs=inputs, lock=True, command="calibrate")
    with folder.writing():
        folder.reserve(OUTPUT_FILES)  # a user's file there: refused, none written
        save_with_digest(state, MODEL_FILE, folder=folder)
        summary = {"run": str(path), "model": str(out / MODEL_FILE), "far": far, "images": names,
                   "before": {**{k: before.get(k) for k in ("image_threshold", "pixel_threshold", "n_images", "far",
                                                            "note", "source")},
                              "flagged_here": flagged_before},
                   "after": {k: cal.get(k) for k in ("image_threshold", "pixel_threshold", "n_images", "far",
                                                     "far_expected", "far_upper95", "rank", "sufficient", "note",
                                                     "source", "threshold_image", "highest_scores")}}
        folder.write_json("calibration.json", summary)
    if flagged_before is not None:
        of_these = f"these {n} defect-free images" if n == n_given else f"these {n} defect-free images ({cal['source']})"
        log(f"at the run's threshold {threshold_text(was)}, {flagged_before} of {of_these} would be flagged "
            f"({100 * flagged_before / n:.1f} %; the run asked for {100 * float(before.get('far') or far):g} %)")
    log(f"image threshold {threshold_text(cal['image_threshold'])} from {n} images ({cal['source']})"
        + (f"; it was {threshold_text(was)} from {before.get('n_images')}" if isinstance(was, (int, float)) else "")
        + (f": {cal['note']}" if cal.get("sufficient") else ""))
    if not cal.get("sufficient", True):
        warnings.warn(cal["note"])
    log(f"the image threshold is the score of {cal['threshold_image']}; the highest scores: "
        + scores_named(cal["highest_scores"]))
    rise = _rise(before, cal.get("image_threshold"))
    if rise is not None and rise > RAISED:  # stdout said it; a threshold set on a defective part passes every defect below it
        from .data.io import warn_data

        warn_data(f"{out / MODEL_FILE}: its image threshold {threshold_text(cal['image_threshold'])} is above the run's "
                  f"{threshold_text(was)} by {rise:.1f} times the run's spread of defect-free scores (from their "
                  f"middle up to its threshold, or their standard deviation), set by {cal['threshold_image']}: a "
                  "changed line, or defective parts among the images given as defect-free? Look at the highest "
                  "scoring ones before judging by it", stacklevel=2, category=UserWarning)
    log(f"wrote {out / MODEL_FILE} (weights, maps and scores as in {path}; only the thresholds changed)")
    return {"model": out / MODEL_FILE, "calibration": cal, "before": before}


#: A new image threshold above the run's by more than this many times the run's spread of
#: defect-free scores (:func:`_rise`) is warned of: images given as defect-free that the run's own
#: do not explain (a defective part among them sets the threshold, and every defect scoring below
#: it then passes). More images of the same parts raise it by a fraction of that spread.
RAISED = 3.0


def _rise(before: dict[str, Any], new: Any) -> float | None:
    """How far ``new`` lies above the run's image threshold, in units of the run's spread of
    defect-free scores: the distance from their middle (the median of its held-back images' scores;
    in older files their mean) up to its threshold, or their standard deviation where the threshold
    is not above the middle (a high ``--far``). A ratio of thresholds means nothing for an image
    context's scores, centred on 0. None where the run's calibration does not tell: thresholds set
    aside, or set on the training images (a run that held none back: their scores are optimistic,
    an image context's all the more, fitted on them). ``before``: a calibration
    :func:`~defect_fast.detect._checked_calibration` passed (its numbers finite, or None)."""
    import statistics

    from .calibration import _from_training_images

    was, scores = before.get("image_threshold"), before.get("held_back_scores")
    if before.get("inapplicable") or _from_training_images(before) or was is None or new is None:
        return None
    if scores is not None and len(scores) >= 2:
        middle = statistics.median(scores)
    elif before.get("score_mean") is not None:
        middle = before["score_mean"]
    else:
        return None
    spread = was - middle
    if not spread > 0:
        spread = before.get("score_std") or 0.0
    return (new - was) / spread if spread > 0 else None


def add_parser(subparsers) -> None:
    """Register ``defect-fast calibrate`` on the CLI's sub-parsers."""
    from .safety import device_arg, input_path, output_path, rate

    c = subparsers.add_parser(
        "calibrate", help="set a run's pass/fail thresholds again from defect-free images it has not seen",
        description="Predict defect-free images the run has not seen with its own settings and write a copy of its "
                    "model file whose thresholds come from them (weights, maps and scores unchanged): more images "
                    "for a low false-alarm rate (0.01 needs 99), or the line's own images after a change. Images "
                    "the run trained on are refused.")
    c.add_argument("run", type=input_path, help="run folder (or model.pt)")
    c.add_argument("images", type=input_path, nargs="*", help="defect-free image files or folders the run was not trained on")
    c.add_argument("--out", required=True, type=output_path,
                   help="folder for the new model.pt and calibration.json (new or empty; earlier calibrate output only "
                   "with --overwrite)")
    c.add_argument("--with-held-back", action="store_true",
                   help="also use the images the run held back at training (those its map was not fitted on)")
    c.add_argument("--far", type=rate, default=None, metavar="RATE",
                   help="false-alarm rate of the image threshold (default: the run's, and fewer images than it needs are taken with "
                   "a warning: the largest score sets the threshold); too few images for a rate given here are refused")
    c.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    c.add_argument("--overwrite", action="store_true", help="replace earlier calibrate output in --out")
    c.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute the scores in this precision: that of the Detector or exported file that will judge "
                   "by the thresholds (default: the Detector's on --device, bfloat16 where it is native)")
    c.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    recalibrate(args.run, args.images, args.out, far=args.far, with_held_back=args.with_held_back,
                device=args.device, overwrite=args.overwrite, precision=args.precision)
    return 0


__all__ = ["recalibrate", "recorded_keys", "add_parser", "command", "OUTPUT_FILES"]
