"""``defect-fast audit``: which of a run's training images a detector that has not seen them flags.

A training folder of "defect-free" photographs often holds a few that are not: among the 600
magnetic-tile ``train/good`` photographs, a bright line along the streaks, small dark spots, a
crack-like line (``experiments/README.md``, "The training folder, audited"). Such images move
the statistics the map is standardised by, and, held back, they set the thresholds (the v7
run's threshold is the score of a held-back photograph with a curved mark). The run cannot see them in its own scores of its training
images: its map statistics and image context were fitted on those very images, and a z-score is
smallest in its own sample (the v7 run's highest training-image score is 2.08 against 6.857 for
that held-back photograph).

:func:`audit` scores every training image out of fold: the training images are split into
``folds`` parts (identical images in one part: :func:`fold_parts`); for each part, the run's map
statistics, image context and thresholds are fitted again as training fits them
(:func:`defect_fast.train.finish_run`: the run's settings, its held-back images for the
thresholds; a held-back image identical to one the part holds is left out of them, since it
would set the threshold at that image's own score) on the other parts, and that detector scores
the part. An image is flagged when its
score exceeds the image threshold of the detector that scored it, the
threshold the run's false-alarm rate sets on the held-back images. Defect-free images are
flagged too, at that threshold's expected rate (1/61 with 60 held-back images and the default
rate, about 9 of 540): the list is a place to look, sorted by score, not a verdict, and the
command says how many would be flagged by chance. A run that fitted nothing on its training
images but the autoencoder (:func:`defect_fast.train.fits_on_training_images`) has nothing to
fit again: each fold's detector is the run's own, and the command says so. The autoencoder's
weights stay the run's: it was trained on every training image, and reproduces them no better than unseen ones at the budgets measured
(``experiments/recon_error_split.py``). The held-back images are not audited: they set the
thresholds, and the run's own scores of them are already those of a detector that did not see
them (the command repeats the highest the run names).

Command line::

    defect-fast audit RUN --out DIR [--folds 2] [--data FOLDER] [--device auto]

``DIR`` (new, or an earlier audit's with ``--overwrite``) receives ``audit.json`` (every training
image with its out-of-fold score, the threshold it was judged by, whether it is flagged, its fold
(from 1, as "folds_from" says; files written before it number them from 0) and, for a frame of
one colour throughout, "blank", highest first) and ``overlays/``
(each flagged image with its map).
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

#: Folds by default: each detector is fitted on half of the training images.
DEFAULT_FOLDS = 2


def fold_parts(train_idx: list[int], keys: list[str], folds: int) -> list[list[int]]:
    """``train_idx`` in ``folds`` parts: the image at position j in part j mod ``folds``, except that
    identical images (the same ``keys[i]``, :func:`defect_fast.data.io.image_keys`) go with the first
    of them: a copy in the other parts would be in the fit of the detector that scores it, and hide
    a defective photograph that the folder holds twice."""
    first: dict[str, int] = {}
    parts: list[list[int]] = [[] for _ in range(folds)]
    for j, i in enumerate(train_idx):
        parts[first.setdefault(keys[i], j) % folds].append(i)
    return parts


def _fit_minimum(cfg) -> int:
    """The fewest images a fold's detector can be fitted on with the run's settings."""
    if cfg.context:
        from .context import MIN_IMAGES

        return MIN_IMAGES
    return 2


def audit(run: str | Path, out: str | Path, *, folds: int = DEFAULT_FOLDS, device: str = "auto",
          overwrite: bool = False, data: str | Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every training image of ``run`` with a detector fitted without it; write ``out``.

    ``data``: the folder of the run's training images where they are now, when they moved (a run
    copied to another machine); default: where the run read them. They must be the images the run
    trained on, names and pixels (checked against the run's record).

    Returns:
        ``{"images": [{"image", "score", "threshold", "flagged", "fold" (1 to ``folds``, as the log
        numbers them)(, "overlay")(, "blank": a frame of one colour throughout)}, ...] highest score
        first, "flagged": how many, "expected_by_chance": how many defect-free images the
        thresholds would flag by chance (each fold's images times its threshold's expected
        false-alarm rate, k / (n + 1) of the held-back images), "far": the run's rate, "folds",
        "refitted": whether the folds' detectors differ from the run's (False: the run fitted
        nothing on its training images but the autoencoder, and no fold left out a held-back
        copy of an image it scores; the scores are then predict's)}``.

    Raises:
        UsageError: ``folds`` < 2 or more than the training images allow; RunError: a run without
        held-back images or training configuration, or whose training images changed or are gone
        (or, at ``data``, are other images); OutputRefused: ``out``.
    """
    from .calibration import scores_named
    from .data.dataset import load_train_images
    from .data.io import blank_images
    from .detect import Detector
    from .evaluate import check_finite
    from .runs import RunError, load_model_state, model_file, model_from_state, resolve_device, stored_trunk
    from .safety import OutputFolder, UsageError, atomic_open, output_stems, real_path
    from .data.io import image_keys
    from .train import TrainConfig, finish_run, fits_on_training_images, images_digest, where_now

    if folds < 2:
        raise UsageError(f"--folds must be 2 or more, got {folds}")
    out = Path(out)
    OutputFolder.check(out, overwrite=overwrite, inputs=[run], command="audit")  # before any reading
    path = model_file(run)
    state = load_model_state(path)
    if not state.get("train_config"):
        raise RunError(f"{path}: the model file holds no training configuration to refit with")
    if "fitted" in (state.get("image_keys") or {}):  # Detector.save after fit_normalization and the like
        raise RunError(f"{path}: its maps were fitted again in Python (Detector.save after a fit): the audit "
                       "refits the run's maps, not these; audit the run's own model file")
    cfg = TrainConfig.from_json(state["train_config"])
    moved_from = None  # where the run read its images, when they are read elsewhere now
    if data is not None and real_path(data, expand_user=True) != real_path(cfg.data):
        if state.get("data_digest") is None:
            raise RunError(f"{path}: records no digest of its training images, so images at another path ({data}) "
                           f"cannot be checked to be the ones it trained on; audit it with its images at {cfg.data}")
        moved_from = cfg.data
        cfg = replace(cfg, data=str(Path(data).expanduser().absolute()))
    inputs = [run, cfg.data]  # the training folder is read too: overlays written into it would be read next time
    OutputFolder.check(out, overwrite=overwrite, inputs=inputs, command="audit")
    held = [str(p) for p in state.get("held_back") or []]
    if "held_back" not in state and "position" in state:  # RUN/stageN.pt: the weights at a stage's end, no more
        raise RunError(f"{path}: the model at the end of a stage, which does not record the run's held-back images; "
                       "audit the run folder (its model.pt)")
    if not held:
        raise RunError(f"{path}: the run held back no images, so there is no threshold to judge its training images "
                       "by (train with --holdback)")
    try:
        images, paths = load_train_images(cfg.data, cfg.image_size)
    except (OSError, ValueError) as exc:
        # (a run without a digest of its images can be audited only where it read them)
        moved = (" (moved? give --data with the folder they are in now)"
                 if not Path(cfg.data).exists() and state.get("data_digest") is not None else "")
        raise RunError(f"{path}: its training images cannot be read: {exc}{moved}") from None
    keys = image_keys(images)
    digest = state.get("data_digest")
    if digest is not None and images_digest(keys, paths) != digest:
        from .train import _changed_files

        what = _changed_files(state.get("data_files"), [[p.name, k.hex()] for p, k in zip(paths, keys)])
        if moved_from is not None:
            raise RunError(f"{cfg.data}: holds other images than {path} trained on in {moved_from}"
                           + (f" ({what})" if what else "") + "; give the folder of the run's images")
        raise RunError(f"{cfg.data}: the training images changed since {path} was trained"
                       + (f" ({what})" if what else "") + "; the audit judges the images the run trained on")
    if moved_from is not None:  # the held-back images where they are now (names and pixels checked above)
        held = where_now(held, paths)
        log(f"{path} trained on the images in {moved_from}; auditing the same images (names and pixels) in {cfg.data}")
    held_set = set(held)
    held_idx = [i for i, p in enumerate(paths) if str(p) in held_set]
    train_idx = [i for i, p in enumerate(paths) if str(p) not in held_set]
    if len(held_idx) != len(held):
        raise RunError(f"{cfg.data}: {len(held) - len(held_idx)} held-back image(s) of {path} are gone")
    if len(train_idx) < 2 * folds:
        most = (f"--folds {len(train_idx) // 2} at most" if len(train_idx) >= 4 else
                "an audit needs 4 at least, 2 folds of 2")
        raise UsageError(f"--folds {folds}: {path} trained on {len(train_idx)} images, too few for {folds} folds "
                         f"(2 images a part at least: {most})")
    need = _fit_minimum(cfg)

    def usable(sizes: list[int]) -> bool:  # every fold scores some images, and its detector fits on enough
        return all(sizes) and len(train_idx) - max(sizes) >= need

    def sizes_for(k: int) -> list[int]:
        return [len(part) for part in fold_parts(train_idx, keys, k)]

    parts = fold_parts(train_idx, keys, folds)
    sizes = [len(part) for part in parts]
    if not usable(sizes):
        fewest = len(train_idx) - max(sizes)
        more = next((k for k in range(folds + 1, len(train_idx) // 2 + 1) if usable(sizes_for(k))), None)
        distinct = len({keys[i] for i in train_idx})
        copies = (f" (only {distinct} of them differ: identical copies stay in one fold)"
                  if distinct < len(train_idx) else "")
        raise UsageError(f"--folds {folds}: a fold's detector would fit on {fewest} of the {len(train_idx)} images "
                         f"{path} trained on{copies}, and {'its image context' if cfg.context else 'it'} needs {need}; "
                         + (f"use --folds {more}" if more else
                            "too few different training images to audit this run" if copies else
                            "too few training images to audit this run"))
    cfg.held_back = [str(paths[i]) for i in held_idx]  # the calibration's names, in the order of its images
    model = model_from_state(state, path)
    refitted = fits = fits_on_training_images(cfg, model)
    trunk = stored_trunk(state)  # the folds run the run's own trunk, and need no weights file
    dev = resolve_device(device)

    entries: list[dict[str, Any]] = []
    maps: dict[str, tuple[int, torch.Tensor]] = {}  # a flagged image's file -> (its index, its map)
    expected = 0.0  # defect-free images flagged by chance: each fold's images x its threshold's expected rate
    scales: dict[int, float] = {}
    for k, scored in enumerate(parts):
        in_part = set(scored)
        fitted = [i for i in train_idx if i not in in_part]
        # a held-back copy of an image the fold scores would set the threshold at that image's own
        # score (the same pixels, the same detector): it could never be flagged; left out here
        scored_keys = {keys[i] for i in scored}
        cal_idx = [i for i in held_idx if keys[i] not in scored_keys]
        if not cal_idx:
            raise RunError(f"{path}: every held-back image is a copy of a training image; no threshold is left to "
                           "audit by")
        if len(cal_idx) < len(held_idx):
            refitted = True  # its thresholds (and statistics fitted on held-back images) are its own
            copies = [paths[i].name for i in held_idx if keys[i] in scored_keys]
            log(f"fold {k + 1}: {len(copies)} held-back image(s) identical to training images it scores "
                f"({', '.join(copies[:3])}{', ...' if len(copies) > 3 else ''}) left out of its threshold")
        fold_cfg = replace(cfg, held_back=[str(paths[i]) for i in cal_idx])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few held-back images for the rate: the run's own note
            fitted_images = images[fitted]  # (a copy: one for both uses, not one each)
            fin = finish_run(model, fold_cfg, images[cal_idx], dev, train_images=fitted_images,
                             context_images=fitted_images, where=f"{path} (fold {k + 1})", trunk=trunk)
            del fitted_images
        fold_state = {**state, "perceptual": fin["perceptual"], "context": fin["context"],
                      "normalization": fin["normalization"], "calibration": fin["calibration"],
                      "detector": fin["detector"]}
        fold_state = {k2: v for k2, v in fold_state.items() if v is not None}
        det = Detector.from_state(fold_state, dev, where=f"{path} (fold {k + 1})")
        part = images[scored]  # (a copy: taken once, for the blank frames and the scores)
        blank = blank_images(part).tolist()  # one colour throughout: a camera fault, not a surface
        res = det.predict_batched(part)
        del part
        check_finite(res, [str(paths[i]) for i in scored], f"{path} (fold {k + 1})", det.precision, "training images")
        threshold = float(fin["calibration"]["image_threshold"])
        # the overlays' colour scale, as predict draws maps: 2 x the pixel threshold (0: each map's maximum)
        scales[k + 1] = 2 * float(fin["calibration"].get("pixel_threshold") or 0.0)
        expected += len(scored) * float(fin["calibration"].get("far_expected") or cfg.far)
        for j, i in enumerate(scored):
            score = float(res["scores"][j])
            entries.append({"image": str(paths[i]), "score": score, "threshold": threshold,
                            "flagged": score > threshold, "fold": k + 1})
            if blank[j]:  # whatever its score, no photograph of the surface (marked as predict marks it)
                entries[-1]["blank"] = True
            if score > threshold:  # a copy: a view kept the fold's every map (1 MB an image at 512 px) to the end
                maps[str(paths[i])] = (i, res["maps"][j].clone())
        judged = f"fitted on {len(fitted)} training images" if fits else "the run's own detector"
        # the image whose score the threshold is, where the folds' thresholds are their own (they can
        # differ a lot by it); the run's own, named once at the end, otherwise
        named = fin["calibration"].get("threshold_image") if refitted else None
        log(f"fold {k + 1} of {folds}: {judged}, scored {len(scored)}, "
            f"threshold {threshold:.4g} from {fin['calibration']['n_images']} held-back images"
            + (f" (the score of {Path(named).name})" if named else "") + "; "
            f"{sum(1 for e in entries if e['fold'] == k + 1 and e['flagged'])} flagged")
    entries.sort(key=lambda e: -e["score"])
    if not refitted:
        log(f"{path} fitted nothing on its training images but the autoencoder (no map statistics from them, no "
            "image context, no brightness level): every fold's detector is the run's own, and its scores are "
            "those predict gives")
    n_flagged = sum(1 for e in entries if e["flagged"])
    far = float(cfg.far)
    # "folds_from": the first fold's number in "images" (files without it number them from 0)
    result = {"run": str(path), "folds": folds, "folds_from": 1, "far": far, "refitted": refitted, "n_images": len(entries),
              "flagged": n_flagged, "expected_by_chance": expected, "images": entries}

    from .data.io import DataWarning, read_image
    from .maps import resize_map
    from .visualize import save_overlay

    flagged = [e for e in entries if e["flagged"]]
    # as predict names its overlays: unique, a long name shortened
    names = [f"overlays/{stem}_overlay.png" for stem in output_stems([Path(e["image"]) for e in flagged])]
    # a user's file at one of the names: refused before an earlier audit is cleared
    folder = OutputFolder.create(out, overwrite=overwrite, inputs=inputs, lock=True, command="audit",
                                 names=["audit.json", *names])
    with folder.writing():
        folder.reserve(["audit.json", *names])
        if flagged:
            folder.mkdir("overlays")
        for e, name in zip(flagged, names):
            i, m = maps[e["image"]]
            with warnings.catch_warnings():  # read before: what it says of the file was said then
                warnings.simplefilter("ignore", DataWarning)
                photo = read_image(paths[i], None)  # at the photo's own size, as predict draws overlays
            with atomic_open(out / name) as fh:  # under a temporary name until complete
                save_overlay(photo, resize_map(m, tuple(photo.shape[-2:])), fh, scale=scales[e["fold"]])
            e["overlay"] = name
        folder.write_json("audit.json", result)
    judge = "a detector that did not see them" if refitted else "the run (its own detector)"
    log(f"{n_flagged} of {len(entries)} training images score above the threshold of {judge} (of defect-free "
        f"images, about {expected:.1f} would be by chance, at the thresholds' expected false-alarm rates)"
        + ("; look at them, highest first:" if flagged else "")
        + "".join(f"\n  {e['score']:8.4g}  {e['image']}" for e in flagged[:20])
        + (f"\n  ... ({n_flagged - 20} more in {out / 'audit.json'})" if n_flagged > 20 else ""))
    cal = state.get("calibration") or {}
    named = cal.get("highest_scores") or []
    if cal.get("calibrated_from"):  # a calibrate output: its thresholds come from other images than the run's
        log(f"{path} was calibrated again ({cal.get('source')}); the audit judges the training images by thresholds "
            f"set as training set them: at the run's rate {far:g} on its {len(held_idx)} held-back images, which are "
            "not audited")
    elif named:  # the held-back images are not audited: they set the thresholds, and the run scored them unseen
        log("the held-back images set the thresholds and are not audited; the run's highest held-back scores: "
            + scores_named(named))
    blanks = [e["image"] for e in entries if e.get("blank")]
    if blanks:  # the reader said it when it read them; here, among what to remove before training again
        log(f"{len(blanks)} training image(s) are blank frames, of one colour throughout (a failed exposure, a covered "
            f"lens?), marked \"blank\" in audit.json: {', '.join(blanks[:3])}{', ...' if len(blanks) > 3 else ''}")
    log(f"wrote {out / 'audit.json'}" + (f" and {len(flagged)} overlays in {out / 'overlays'}" if flagged else ""))
    return result


def add_parser(subparsers) -> None:
    """Register ``defect-fast audit`` on the CLI's sub-parsers."""
    from .safety import device_arg, input_path, output_path, positive_int

    a = subparsers.add_parser(
        "audit", help="training images a detector that has not seen them flags (defects in the defect-free set)",
        description="Score every training image of RUN with the run's map statistics, image context and thresholds "
                    "fitted again on the other training images (--folds parts), and list those above the threshold, "
                    "highest first, with overlays: photographs in the defect-free set that look defective, to look at "
                    "and remove before training again. (A run that fitted nothing on its training images but the "
                    "autoencoder is audited with its own detector, as it says.)")
    a.add_argument("run", type=input_path, help="run folder (or model.pt)")
    a.add_argument("--out", required=True, type=output_path,
                   help="folder for audit.json and the flagged images' overlays (new or empty; an earlier audit's only "
                   "with --overwrite)")
    def folds_arg(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:  # said as what --folds takes (positive_int says ">= 1")
            raise argparse.ArgumentTypeError(f"expected a whole number >= 2, got {text!r}") from None
        if v < 2:  # argparse names the option: "argument --folds: must be 2 or more, got '1'"
            raise argparse.ArgumentTypeError(f"must be 2 or more (one part leaves no images to fit on), got {text!r}")
        return positive_int(text)  # its upper bound too

    a.add_argument("--folds", type=folds_arg, default=DEFAULT_FOLDS,
                   help=f"parts (2 or more, at most half the training images: 2 images a part at least) the "
                   f"training images are split into (default {DEFAULT_FOLDS}: each detector fitted on half)")
    a.add_argument("--data", type=input_path, default=None, metavar="FOLDER",
                   help="the run's training images where they are now, when they moved (a run copied to another "
                   "machine): the same images, names and pixels, checked against the run's record (default: where "
                   "the run read them)")
    a.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")
    a.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    audit(args.run, args.out, folds=args.folds, device=args.device, overwrite=args.overwrite, data=args.data)
    return 0


__all__ = ["audit", "add_parser", "command", "DEFAULT_FOLDS"]
