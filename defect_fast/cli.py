"""Command line: ``defect-fast train | evaluate | predict | watch | report | diagnose | calibrate | audit | export | demo | info``.

Every command goes through one boundary (:func:`main` -> :func:`defect_fast.safety.run_main`): a
user's mistake is one line ``defect-fast: error: ...`` and exit status 2 (``--debug`` adds the
traceback), a bug keeps its traceback. Numbers and devices are checked while parsing; outputs are
checked against the inputs and against folders defect-fast did not write before anything is read
or written (see :mod:`defect_fast.safety`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from .safety import (LOCK_NAME, MANIFEST_NAME, ArgumentParser, OutputFolder, OutputRefused, RunLock, Stopped, UsageError, UserError, add_threshold_options, atomic_open, atomic_write_json,
                     device_arg, dump_json_strict, far_errors, finite_float, input_path, nonneg_float, nonneg_int, one_line, output_path, output_stems, positive_float, positive_int,
                     printable, rate, read_own_json, run_main, safe_output_file, signals_held)

EPILOG = """examples:
  defect-fast demo runs/demo                                  synthetic data, train, evaluate, maps
  defect-fast train DATA --model cmaae --out runs/tile        DATA: MVTec-style root or image folder
  defect-fast train DATA --out runs/tile --preset photos      the settings measured on real photographs
  defect-fast train DATA --out runs/tile --resume             continue an interrupted run
  defect-fast evaluate runs/tile DATA --json metrics.json
  defect-fast predict runs/tile img1.png folder/ --out maps/
  defect-fast watch runs/tile drop/ --out results/ --far 0.05  pass/fail each new image, false alarms <= 5 %
  defect-fast export runs/tile --format torchscript --out tile.ts
  defect-fast calibrate runs/tile good/ --out runs/tile-cal   thresholds set again from unseen good images
  defect-fast audit runs/tile --out audit/                    training images that look defective
"""


def _print_metrics(metrics: dict, out=None) -> None:
    out = out or sys.stdout
    keys = ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")
    rows = [("all", *(metrics.get(k) for k in keys))]
    for cls, m in sorted(metrics.get("per_class", {}).items()):
        rows.append((cls, *(m.get(k) for k in keys)))
    head = f"{'class':<14}" + "".join(f"{k:>14}" for k in keys)
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, *vals in rows:
        cells = "".join(f"{v:>14.4f}" if isinstance(v, (int, float)) and v == v else f"{'n/a':>14}" for v in vals)
        print(f"{name:<14}{cells}", file=out)


def _fmt(v, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "n/a"


def _print_thresholds(th: dict | None, out=None) -> None:
    """Pass/fail lines of ``evaluate``: F1-optimal threshold, rates at the stored one vs the asked rate."""
    if not th:
        return
    from .calibration import threshold_text  # thresholds in full: given as --threshold, they flag the same images

    out = out or sys.stdout
    f1 = th["f1_optimal"]
    if th.get("n_good") == 0:  # flagging every image is "optimal" there: a number that says nothing (report omits it)
        print("F1-optimal image threshold: n/a, the test set holds no defect-free image", file=out)
    else:
        print(f"F1-optimal image threshold {threshold_text(f1['threshold'])}: F1 {_fmt(f1['f1'])}, precision "
              f"{_fmt(f1['precision'])}, recall {_fmt(f1['recall'])}", file=out)
    at = th.get("at_threshold")
    if at is None:
        print(printable(th.get("threshold_source") or "no stored image threshold in the model file", newlines=False),
              file=out)
        return
    # (texts of the model file, one line each: written by hand, a line break forged a line of results)
    print(f"threshold: {printable(str(th['threshold_source']), newlines=False)}", file=out)
    images = printable(str(th.get("threshold_images") or "calibration"), newlines=False)  # what the scores were of
    if th.get("threshold_image"):
        print(f"the threshold is the score of {images} image {printable(str(th['threshold_image']), newlines=False)}",
              file=out)
    # (a threshold given as a number was set from no rate: nothing asked or expected to say)
    asked = (f"; asked {_fmt(th.get('far_asked'))}, expected {_fmt(th.get('far_expected'))} from "
             f"{th.get('n_calibration_images')} {images} images"
             if th.get("far_asked") is not None or th.get("far_expected") is not None else "")
    print(f"at that threshold {threshold_text(at['threshold'])}: false-alarm rate "
          f"{_fmt(at['false_alarm_rate'])} ({at['false_alarms']}/{at['n_good']} good images{asked}), miss rate "
          f"{_fmt(at['miss_rate'])} ({at['misses']}/{at['n_defective']} defective images)", file=out)
    points = th.get("operating_points") or []
    if len(points) > 1:
        print(f"thresholds --far can set (the k-th highest {images} score) and their rates here:", file=out)
        print(f"  {'--far':>8} {'k':>3} {'threshold':>10} {'false alarms':>14} {'misses':>14}", file=out)
        for p in points:
            fa, miss = f"{p['false_alarms']}/{p['n_good']}", f"{p['misses']}/{p['n_defective']}"
            print(f"  {p['far']:>8.4g} {p['rank']:>3} {p['threshold']:>10.4g} {fa:>14} {miss:>14}", file=out)


def _built(model: str, options: dict):
    """``model`` built with ``options``; one line naming them when it cannot be."""
    from .models import build_model
    from .train import ConfigError

    try:
        return build_model(model, **options)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--set: model {model} cannot be built with {options} ({exc})") from None


def _stages(model: str, options: dict) -> tuple[str, ...]:
    """The training stages of ``model`` built with ``options`` ("normal", "synthetic")."""
    return tuple(_built(model, options).stages)


def _refuse_unused(args: argparse.Namespace, model, given: list[str]) -> None:
    """Refuse options given for what ``model`` (built with the run's options) does not have (a
    memory's size for a plain AE, anomaly photos for a model trained on defect-free patches only)."""
    stages = tuple(model.stages)
    config = model.config()
    built = "".join(f"{key}={config[key]}, " for key in ("fusion", "loss_mode") if config.get(key)) + \
        f"stages: {', '.join(stages)}"
    unused = model.unused_options(given)
    if unused:
        it = "it" if len(unused) == 1 else "them"
        raise UsageError(f"--set {', '.join(unused)}: model {args.model} with these options does not use {it} "
                         f"({built}); leave {it} out")
    if args.anomaly_source is not None and "synthetic" not in stages:
        raise UsageError(f"--anomaly-source: model {args.model} trains no stage on synthetic anomalies ({built}), "
                         "so the photos would not be read; leave it out")


def _per_stage(values: list[int] | None, n: int, option: str) -> list[int] | None:
    if values is None or len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise UsageError(f"{option}: the model trains in {n} stage(s); give one value or {n}, got {len(values)}")


#: ``train --preset NAME``: a set of train options in one word, as argparse destinations and
#: values; options given explicitly take precedence. "photos": the options of the recommended
#: magnetic-tile runs (README, "Results on magnetic tile"; v7 in experiments/README.md), which
#: met the accuracy bars there (the band profile across the training images' streaks: per row
#: on those tiles, whose streaks run top to bottom; each image levelled to the training images'
#: mean brightness before the AlexNet trunk).
PRESETS: dict[str, dict] = {
    "photos": {"image_size": 256, "batch_size": 64, "patch_sampling": "random", "flips": True,
               "lr_schedule": "cosine", "map": "perceptual", "infer_stride": 32, "blend": "hann",
               "smooth": 4.0, "context": True, "context_profile": "auto", "level_brightness": True},
}
#: What a preset sets that depends on the model: options of its synthetic anomalies (``--set``),
#: for a model trained on them that has them, where ``--set`` does not give them; and the epochs
#: in all, split evenly over the stages (the v4 rows: 1 + 1 for two-stage models, 2 for one-stage ones).
PRESET_MODEL_OPTIONS: dict[str, dict] = {"photos": {"synthesis": "perlin"}}
PRESET_EPOCHS: dict[str, int] = {"photos": 2}


@functools.cache
def _negatable() -> frozenset[str]:
    """The train options that take --no-NAME (argparse.BooleanOptionalAction)."""
    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    return frozenset(a.dest for a in train._actions if isinstance(a, argparse.BooleanOptionalAction))


def _flag(dest: str, value) -> str:
    flag = "--" + dest.replace("_", "-")
    if value is True:
        return flag
    if value is False and dest in _negatable():
        return f"--no-{dest.replace('_', '-')}"
    if value is False or value is None:
        return f"no {flag}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def _preset_flags(name: str, args: argparse.Namespace | None = None, applied: dict | None = None) -> str:
    """The options preset ``name`` stands for, as command-line flags (for messages and help); with
    ``args`` (and the model options it ``applied``), those in effect, and the ones given
    explicitly instead in parentheses."""
    preset = PRESETS[name]
    kept = [d for d in preset if args is None or getattr(args, d) == preset[d]]
    flags = [_flag(d, preset[d]) for d in kept]
    model = PRESET_MODEL_OPTIONS.get(name, {}) if args is None else (applied or {})
    flags += [f"--set {k}={v}" for k, v in model.items()]
    if args is None or args.epochs is None:
        flags.append(f"and {PRESET_EPOCHS[name]} epochs in all")
    given = [_flag(d, getattr(args, d)) for d in preset if d not in kept] if args is not None else []
    return " ".join(flags) + (f" (given instead: {' '.join(given)})" if given else "")


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``train --preset`` (and no ``--resume``), parse again with the preset's
    values as the defaults, so that options given explicitly win."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None) and not args.resume:
        args = build_parser(train_defaults=PRESETS[args.preset]).parse_args(argv)
    return args


def _preset_model_options(preset: str, model: str, given: dict) -> dict:
    """The preset's model options for ``model`` (built with the ``--set`` options ``given``) that
    ``--set`` did not give: none for a model without a synthetic stage."""
    from .models import check_options

    if "synthetic" not in _stages(model, given):
        return {}
    out = {}
    for key, value in PRESET_MODEL_OPTIONS.get(preset, {}).items():
        if key in given:
            continue
        try:
            check_options(model, {key: value})
        except ValueError:
            continue  # a model of its own synthesis, without this option
        out[key] = value
    return out


# train options a --resume may be given with: the rest are the run's own, saved when it started
#: What --resume takes besides the run: the device too (a run begun on a GPU that is gone goes on elsewhere).
_RESUME_OPTIONS = {"data", "out", "resume", "quiet", "debug", "threads", "func", "command", "device"}


def _typed_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """dest -> the option as typed in ``argv`` for ``parser``'s options: a switch's ``--no-`` form,
    ``--opt=value`` by its option and an abbreviation argparse resolves (exact names first, else
    the one option the prefix starts)."""
    names = {s: a.dest for a in parser._actions for s in a.option_strings}
    typed: dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        t = token.split("=", 1)[0]
        hits = {names[t]} if t in names else {d for s, d in names.items() if s.startswith(t)}
        if len(hits) == 1:
            typed.setdefault(hits.pop(), t)
    return typed


def _typed_train_options(argv: list[str]) -> tuple[dict, dict[str, str]]:
    """The ``train`` options typed in ``argv``: {dest: value} (no defaults) and {dest: as typed}."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in train._actions:  # a default is no value: only what was typed stays
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv)), _typed_options(train, argv)


def _given_train_options(args) -> list[str]:
    """The ``train`` options given in ``args`` (as "--name"): those typed on the command line
    (``args._argv``, kept by the parse), a default's value included (``--lr 0.0002`` on a run
    started at 1e-3 was taken silently); without the command line, those that differ from their
    defaults."""
    argv = getattr(args, "_argv", None)
    if argv is not None:
        typed, as_typed = _typed_train_options(argv)
        return [as_typed.get(k, "--" + k.replace("_", "-")) for k in typed
                if k not in _RESUME_OPTIONS and not k.startswith("_")]
    defaults = vars(build_parser().parse_args(["train", "DATA", "--out", "OUT"]))
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in _RESUME_OPTIONS and k in defaults and v != defaults[k]]


def cmd_train(args) -> int:
    from .models import parse_options
    from .train import TrainConfig, train

    if args.resume:
        given = _given_train_options(args)
        if given:
            raise UsageError(f"--resume continues the run in {args.out} with the settings it started with; drop "
                             f"{', '.join(given)} (or train a new run into another --out)")
        train(TrainConfig(data=args.data), args.out, resume=True, device=args.device, progress=not args.quiet)
        return 0
    try:
        kwargs = parse_options(args.model, args.set)
    except ValueError as exc:
        raise UsageError(f"--set: {exc}") from None
    given = list(kwargs)  # the --set keys as the model names them (memory-size is memory_size)
    if args.preset:
        applied = _preset_model_options(args.preset, args.model, kwargs)
        kwargs = {**applied, **kwargs}
        print(f"defect-fast: --preset {args.preset}: {_preset_flags(args.preset, args, applied)}", file=sys.stderr)
        # what the preset sets for a part turned off explicitly (--no-context) goes with it; typed, it stays
        typed = _typed_train_options(args._argv)[0] if getattr(args, "_argv", None) is not None else {}
        dropped = []
        if not args.context and "context_profile" not in typed and args.context_profile != "none":
            dropped.append(_flag("context_profile", args.context_profile))
            args.context_profile = "none"
        if args.level_brightness and "level_brightness" not in typed and not args.context \
                and (args.map or "") != "perceptual":
            dropped.append(_flag("level_brightness", True))
            args.level_brightness = False
        if dropped:
            why = "--no-context" + ("" if args.map == "perceptual" else f", --map {args.map or 'of the model'}")
            print(f"defect-fast: --preset {args.preset}: {' and '.join(dropped)} left out: nothing in the run uses "
                  f"{'it' if len(dropped) == 1 else 'them'} ({why})", file=sys.stderr)
    if args.map and kwargs.get("map") not in (None, args.map):  # --map won, and config.json kept the other
        raise UsageError(f"--set map={kwargs['map']} and --map {args.map} name two maps; give the map with --map alone")
    if args.fit_on == "held-back" and args.map != "perceptual" and args.normalize != "position":
        raise UsageError("--fit-on held-back chooses the images --map perceptual and --normalize position fit their "
                         "statistics on; alone it changes nothing: add one of them, or leave it out")
    model = _built(args.model, kwargs)
    n_stages = len(model.stages)
    _refuse_unused(args, model, given)
    del model  # the run builds its own
    default_epochs = max(1, PRESET_EPOCHS[args.preset] // n_stages) if args.preset else 10
    epochs = _per_stage(args.epochs, n_stages, "--epochs") or [default_epochs] * n_stages
    cfg = TrainConfig(
        data=str(args.data), model=args.model, model_kwargs=kwargs, image_size=args.image_size, stride=args.stride,
        batch_size=args.batch_size, epochs=epochs, max_steps=_per_stage(args.max_steps, n_stages, "--max-steps"),
        lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every, anomaly_source=args.anomaly_source,
        device=args.device or "auto", holdback=args.holdback, far=args.far, normalize=args.normalize, fit_on=args.fit_on, map_scales=list(args.map_scales),
        patch_sampling=args.patch_sampling, flips=args.flips, lr_schedule=args.lr_schedule, precision=args.precision,
        map=args.map or "", infer_stride=args.infer_stride, blend=args.blend, smooth=args.smooth,
        context=args.context, context_profile=args.context_profile, level_brightness=args.level_brightness,
        image_score=args.image_score, placement=args.placement,
    )
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def __getattr__(name: str):
    """``evaluate_run`` stays importable from here, without importing torch when the command line
    starts: a Ctrl-C in that second printed a traceback (run_main was not entered yet)."""
    if name == "evaluate_run":
        from .evaluate import evaluate_run

        return evaluate_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    to_stdout = args.json == "-"  # the metrics as JSON on standard output, the table on standard error
    json_path = (safe_output_file(args.json, args.overwrite, inputs=[args.run, args.data], what="--json")
                 if args.json and not to_stdout else None)
    with far_errors(args.run, args.far):
        metrics = evaluate_run(args.run, args.data, args.map, args.device, args.stride, args.smooth, blend=args.blend,
                               far=args.far, threshold=args.threshold)
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        _print_metrics(metrics)
        if metrics.get("pixel_metrics"):
            print(f"pixel metrics: {metrics['pixel_metrics']}")
        _print_thresholds(metrics.get("thresholds"))
        print(f"\n{metrics['n_images']} images, map={metrics['map']}, {metrics['inference_ms_per_image']:.1f} ms/image")
    if to_stdout:
        print(dump_json_strict(metrics, nan="null", indent=2), flush=True)
    if json_path is not None:
        # checked again: a file may have appeared there while the test set was evaluated (and one
        # that appears during the write is not replaced either, without --overwrite)
        appeared = OutputRefused(f"--json {json_path}: a file appeared there while the test set was evaluated; not "
                                 "replacing it (pass --overwrite to replace it, or choose another name)")
        if not args.overwrite and (json_path.exists() or json_path.is_symlink()):
            raise appeared
        safe_output_file(json_path, args.overwrite, inputs=[args.run, args.data], what="--json")
        try:
            atomic_write_json(json_path, metrics, replace=args.overwrite, unlisted=True)
        except FileExistsError:
            raise appeared from None
        except OutputRefused as exc:  # reserved by another command meanwhile: named as the option
            raise OutputRefused(f"--json {exc}") from None
    return 0


#: Images ``predict`` holds at once: a larger set is checked whole first (every bad file named
#: before any output), then read, scored and written in parts of this many, so that its memory does
#: not grow with the set (a day's 10,000 512-px images and maps held 18 GB).
PREDICT_PART = 64


def cmd_predict(args) -> int:
    from .calibration import chosen_threshold, threshold_text
    from .data.io import DataWarning, blank_images, check_images, collect_images, read_image, read_images
    from .detect import Detector
    from .evaluate import check_finite
    from .maps import resize_map
    from .visualize import save_map, save_overlay, white_value

    out = Path(args.out)
    inputs = [args.run, *args.images]
    resume = getattr(args, "resume", False)
    if resume and args.overwrite:
        raise UsageError("--resume continues the stopped predict in --out and --overwrite starts it again: give one")
    if resume:  # refuse before reading anything
        earlier = _stopped_predict(out)
    else:
        try:
            OutputFolder.check(out, overwrite=args.overwrite, inputs=inputs, command="predict")
        except OutputRefused as exc:  # a stopped predict's output: --overwrite would throw its finished images away
            try:
                _stopped_predict(out)
            except UserError:  # none there (or in use): the refusal as it is
                raise exc from None
            raise OutputRefused(f"{exc}; or --resume does only the images the stopped predict there had not done") \
                from None
    det = Detector.load(args.run, device=args.device, map_kind=args.map, stride=args.stride,  # SettingError: one line
                        smooth_sigma=args.smooth, blend=getattr(args, "blend", None))
    with far_errors(args.run, args.far):  # before any image is read
        image_t, pixel_t, source, image_name, _far = chosen_threshold(det.calibration, args.threshold, args.far)
    paths = collect_images(args.images)
    stems = output_stems(paths)
    names = [(f"maps/{stem}_map.png", f"overlays/{stem}_overlay.png") for stem in stems]
    planned = [n for pair in names for n in pair] + ["scores.json"]
    header = {"run": str(args.run), "model_sha256": det.model_sha256, "precision": det.precision, "map": det.map_kind,
              "stride": det.stride, "smooth": det.smooth_sigma, "blend": det.blend, "threshold": image_t,
              "threshold_source": source,
              "threshold_image": image_name,  # the image whose score it is, where the model file names it
              "pixel_threshold": pixel_t}
    start = 0  # the first image not done
    if resume:
        start = _resumable(out, earlier, header, paths, names)
    else:  # a user's file at one of them: refused now, before --overwrite clears the earlier output
        OutputFolder.check(out, overwrite=args.overwrite, inputs=inputs, command="predict", names=planned)
    part = PREDICT_PART
    if len(paths) - start > part:  # every bad file named, before any output; read again below, a part at a time
        sizes: list = []
        check_images(paths[start:], det.image_size, where="predict inputs", sizes=sizes)
        det.check_proportions(sizes, paths[start:], "predict inputs")
    if image_t is None:
        print(f"defect-fast: warning: no image is flagged: {source}", file=sys.stderr)
    # white in the map images: twice the pixel threshold, or the colour scale stored with it; a model
    # file with neither (a Detector saved uncalibrated): each map's own maximum, as watch draws them
    scale = pixel_t or det.calibration.get("pixel_q999") or 0.0

    header["map_scale"] = 2 * scale or None
    one_part = len(paths) - start <= part

    def scored(a: int) -> tuple:
        """The part of the inputs from ``a``: (its images, their own sizes as this read found them, results)."""
        chunk, sizes = paths[a:a + part], []
        images = read_images(chunk, det.image_size, where="predict inputs", sizes=sizes, warn=one_part)
        if one_part:  # else said of them all, above
            det.check_proportions(sizes, chunk, "predict inputs")
        res = det.predict_batched(images)
        what = "images" if len(paths) <= part else f"images of the part from image {a + 1} of {len(paths)}"
        check_finite(res, chunk, args.run, det.precision, what)  # before its outputs: a NaN score would pass
        return images, sizes, res

    # before any output: a model that gives NaN is refused before --overwrite clears anything (for a
    # set of more than one part, a NaN, or a file changed since the check, in a later part comes
    # after: what this command wrote is then removed, and an earlier output it replaced stays gone;
    # a resumed predict keeps what is done instead, as a stop does, the earlier command's images too)
    first = scored(start) if start < len(paths) else None
    if resume:
        folder = OutputFolder.open(out, lock=True, command="predict")
        try:  # what was checked is what is there, now that no other predict can change it
            if _stopped_predict(out, locked=True) != earlier:
                raise OutputRefused(f"--out {out}: its scores.json changed since this command began; nothing written")
        except BaseException:
            folder.release()
            raise
    else:
        folder = OutputFolder.create(out, overwrite=args.overwrite, inputs=inputs, lock=True, command="predict")
    with folder if resume else folder.writing():
        folder.mkdir("maps")
        folder.mkdir("overlays")
        # (the images done, named as this command names them: the list an uninterrupted one writes)
        # (a blank frame an earlier version judged by its score: flagged, as this one flags them)
        report = {**header, "images": [{**e, "image": str(p), **({"defective": True} if e.get("blank") and image_t
                                                                   is not None else {})}
                                       for e, p in zip(earlier["images"][:start], paths)] if resume else []}
        folder.reserve(planned)  # checked above; a user's file put there since: refused, none written
        begun: list[str] = []  # the files of the image in hand

        def write_parts() -> None:
            """Each part's maps, overlays and entries in ``report``, an image at a time."""
            nonlocal first
            for a in range(start, len(paths), part):
                images, sizes, res = first if a == start else scored(a)
                first = None  # no part is held past its own
                blank = blank_images(images).tolist()
                for path, (map_rel, overlay_rel), img, m, s, (w, h), is_blank in zip(
                        paths[a:a + part], names[a:a + part], images, res["maps"], res["scores"], sizes, blank):
                    map_png, overlay_png = folder.path / map_rel, folder.path / overlay_rel
                    if (w, h) != (det.image_size, det.image_size):  # at the photo's own size, as the Python API gives them
                        m = resize_map(m, (h, w))
                        with warnings.catch_warnings():  # read moments ago: what it says of the file was said then
                            warnings.simplefilter("ignore", DataWarning)
                            img = read_image(path, None)
                    begun[:] = [map_rel, overlay_rel]  # until its entry is in: a stop removes what of it was written
                    with atomic_open(map_png) as fh:  # under a temporary name until complete (kill -9 leaves no half PNG)
                        save_map(m, fh, scale=2 * scale)
                    with atomic_open(overlay_png) as fh:
                        save_overlay(img, m, fh, scale=2 * scale)
                    entry = {"image": str(path), "score": float(s), "map": map_rel, "overlay": overlay_rel, "size": [w, h]}
                    if not scale:  # each map drawn to its own maximum: the value white is, to read the PNG back by
                        entry["map_scale"] = white_value(m, 0.0)
                    if image_t is not None:  # a blank frame, a camera fault, showed nothing of the part: it
                        # never passes (watch rejects it); a grey one's low score had passed it
                        entry["defective"] = bool(is_blank or float(s) > image_t)
                    if is_blank:
                        entry["blank"] = True
                    report["images"].append(entry)
                del images, res, img, m  # the next part is read with none of this one held

        stopped, listed = None, False
        while not listed:  # the list of what is kept is written whole, whatever stop comes on the way
            try:
                if stopped is None:  # (after a stop, the parts not done are left)
                    write_parts()
                with signals_held():  # (raised while the list is written, a stop removed every image)
                    if stopped is not None:
                        last = {f for e in report["images"][-1:] for f in (e["map"], e["overlay"])}
                        for f in begun:  # the image in hand, if not listed yet: not kept
                            if f not in last:
                                with contextlib.suppress(FileNotFoundError):
                                    (folder.path / f).unlink()
                        report["stopped"] = {"images_done": len(report["images"]), "images_given": len(paths)}
                    folder.write_json("scores.json", report)
                    listed = True
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: the images done are kept, and scores.json says so
                stopped = stopped or exc
            except Exception as exc:  # noqa: BLE001 - re-raised below: a resumed predict keeps the images done
                if not resume or stopped is not None:  # (the earlier command's among them), as a stop does
                    raise
                stopped = exc  # an error, not a stop (a KeyboardInterrupt is no Exception)
    rest = ("continue with the same run, images and options and --resume (not --overwrite), or predict all again "
            "with --overwrite" if len(report["images"]) < len(paths) else "every image was done")
    kept = f"the maps, overlays and scores of {len(report['images'])} of {len(paths)} image(s) are kept in {out} " \
           f"(scores.json lists them)"
    if isinstance(stopped, Exception):  # an error in a resumed predict: said, after what is kept
        print(f"defect-fast: {kept}; {rest}", file=sys.stderr)
        raise stopped
    if stopped is not None:
        raise Stopped(f"stopped: {kept}; {rest}", getattr(stopped, "signum", signal.SIGINT))
    flagged = sum(1 for e in report["images"] if e.get("defective"))
    n_blank = sum(1 for e in report["images"] if e.get("blank"))
    print(f"wrote maps, overlays and scores for {len(paths)} image(s) to {out}"
          + (f" ({len(paths) - start} of them now, {start} before the stop)" if resume else "")
          + (f"; {flagged} flagged at threshold {threshold_text(image_t)}" if image_t is not None else "")
          + (f"; {n_blank} blank frame(s), marked \"blank\" in scores.json"
             + (" and flagged whatever their score (a camera fault: image those parts again)"
                if image_t is not None else "") if n_blank else ""))
    return 0


def _stopped_predict(out: Path, locked: bool = False) -> dict:
    """The ``scores.json`` of the stopped predict in ``out`` (for ``--resume``); OutputRefused
    with what to do where there is none. ``locked``: this process holds the folder's lock."""
    if OutputFolder.written_by(out) != "predict":
        raise OutputRefused(f"--out {out}: holds no output of defect-fast predict to resume")
    if not locked:  # a predict still at work there has written no list yet: "in use", not "killed"
        RunLock(out).check_free()
    try:
        earlier = read_own_json(out / "scores.json")
    except FileNotFoundError:
        raise OutputRefused(f"--out {out}: has no scores.json, so no list of the images done: the predict there "
                            "ended before it wrote one (killed); predict all again with --overwrite") from None
    except (OSError, ValueError) as exc:
        raise OutputRefused(f"--out {out}: its scores.json cannot be read ({exc}); predict all again with "
                            "--overwrite") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("images"), list):
        raise OutputRefused(f"--out {out}: its scores.json is not a predict's list of images; predict all again "
                            "with --overwrite")
    if "stopped" not in earlier:
        raise OutputRefused(f"--out {out}: the predict there was not stopped (it did every image); nothing to resume")
    return earlier


def _resumable(out: Path, earlier: dict, header: dict, paths: list[Path], names: list[tuple[str, str]]) -> int:
    """How many of ``paths`` the stopped predict in ``out`` did; OutputRefused where this command
    would not continue it: other images, another model file or other settings."""
    again = "give the stopped command's run, images and options again, or predict all again with --overwrite"
    unrecorded = [k for k in header if k != "run" and k not in earlier]
    if unrecorded:  # (not a setting given otherwise: none of them can be given again to match)
        raise OutputRefused(f"--resume: the predict stopped in {out} was of an earlier defect-fast, whose scores.json "
                            f"does not record the model file and settings to continue with ({', '.join(unrecorded)}); "
                            "predict all again with --overwrite")
    # (the run as given is not compared: the model file's SHA-256 says which it is, at any path)
    other = [k for k in header if k != "run" and earlier.get(k) != header[k]]
    if other:
        shown = ", ".join(f"{k} {earlier.get(k)!r} -> {header[k]!r}" for k in other)
        raise OutputRefused(f"--resume: the predict stopped in {out} ran with another model file or settings "
                            f"({printable(shown)}); {again}")
    done = earlier["images"]
    given = earlier["stopped"].get("images_given") if isinstance(earlier["stopped"], dict) else None
    if given != len(paths):
        raise OutputRefused(f"--resume: the predict stopped in {out} was given {given} image(s), this one "
                            f"{len(paths)}; {again}")
    for i, (e, path, (map_rel, overlay_rel)) in enumerate(zip(done, paths, names)):
        if not isinstance(e, dict) or not _same_image(e.get("image"), path) or \
                (e.get("map"), e.get("overlay")) != (map_rel, overlay_rel):
            shown = e.get("image") if isinstance(e, dict) else e
            raise OutputRefused(f"--resume: image {i + 1} of the predict stopped in {out} was {printable(str(shown))}, "
                                f"here it is {printable(str(path))}; {again}")
    for i, e in enumerate(done):  # a kept file removed since: done again, from that image on
        gone = [e[k] for k in ("map", "overlay") if not (out / e[k]).is_file()]
        if gone:
            print(f"defect-fast: {printable(str(out / gone[0]))} of image {i + 1} is gone: the images from it on are "
                  "predicted again", file=sys.stderr)
            return i
    return len(done)


def _same_image(recorded: object, path: Path) -> bool:
    """Whether an image a stopped predict listed (as it was typed then) is ``path``: the same
    name, or the same file named another way (absolute where it was relative, ``./``, a link)."""
    if recorded == str(path):
        return True
    try:
        return isinstance(recorded, str) and os.path.samefile(recorded, path)
    except (OSError, ValueError):
        return False


def _record_tree(folder: OutputFolder, sub: str) -> None:
    """Record every file and folder under ``folder/sub`` (written by this command) in the manifest."""
    root = (folder.path / sub).absolute()
    if root.exists():
        # no manifest or lock file, at any depth: a nested run folder keeps its own, so that an
        # --overwrite can clear what it lists (a resumed training adds files the demo never saw)
        found = [p for p in sorted(root.rglob("*")) if p.name not in (MANIFEST_NAME, LOCK_NAME)]
        folder.record_many([root, *found] if sub else found)


#: What ``demo`` writes in its output folder (besides metrics.json and the manifest).
DEMO_OUTPUTS = ("data/train", "data/test", "data/ground_truth", "run", "maps")


def cmd_demo(args) -> int:
    from .models import model_class
    from .train import TrainConfig, checked_model

    out = Path(args.out)
    data = out / "data"
    options = dict(model_class(args.model).demo_options)
    n_stages = len(_stages(args.model, options))
    cfg = TrainConfig(data=str(data), model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      epochs=[args.epochs] * n_stages, seed=args.seed, device=args.device, model_kwargs=options)
    checked_model(cfg)  # a setting that cannot train is refused before an earlier demo is cleared
    from .data.io import DataError, image_stack

    # the training images' stack, as train will allocate it: an image size this process cannot hold is
    # refused in one line (the synthetic images' generation met it first, with numpy's MemoryError)
    s = args.image_size
    try:
        image_stack((32, 3, s, s), "demo")  # freed at once
    except DataError:  # said without image_stack's advice of fewer images, which the demo does not take
        raise DataError(f"demo --image-size {s}: its 32 training images at {s} x {s} need {32 * 3 * s * s / 2**30:.1f} "
                        "GiB in memory, more than this process can allocate; use a smaller --image-size") from None
    OutputFolder.check(out, overwrite=args.overwrite, what="output folder", command="demo")
    # a user's file where the demo writes is refused before an earlier demo is cleared, not after
    left = OutputFolder.unlisted(out, DEMO_OUTPUTS) if (out / MANIFEST_NAME).is_file() else []
    if left:
        first = left[0].name + ("/" if left[0].is_dir() and not left[0].is_symlink() else "")  # a folder: mine/
        raise OutputRefused(f"output folder {out}: {left[0].parent} holds files defect-fast did not write "
                            f"({first}); move them away or choose another folder")
    # locked until the demo ends: a second demo in the folder is refused before it clears anything
    # (it cleared the first one's data/ and only then met the lock of its run/)
    folder = OutputFolder.create(out, overwrite=args.overwrite, what="output folder", command="demo", lock=True)
    try:
        return _demo_in(folder, out, data, cfg, args)
    finally:
        folder.release()


def _demo_in(folder: OutputFolder, out: Path, data: Path, cfg, args) -> int:
    """The demo's work in its output folder, created and locked by :func:`cmd_demo`."""
    from .data.synthetic import make_synthetic_dataset
    from .train import train

    for sub, command in (("run", "train"), ("maps", "predict")):
        # an earlier demo's training or maps: their files are listed in their own manifests (a training
        # killed, or resumed with train, added files the demo's manifest never listed)
        nested = out / sub
        if (nested / MANIFEST_NAME).is_file() and OutputFolder.written_by(nested) == command:
            try:
                earlier = OutputFolder.open(nested, lock=True, command=command)  # RunInUse while it trains
                try:
                    earlier.discard()  # its own files only; a user's file there stays, and is refused below
                finally:
                    earlier.release()
            except BaseException:
                folder.release()
                raise
    # what the demo writes; after the clear of an earlier demo, whatever is left there is not its own
    left = [out / sub for sub in DEMO_OUTPUTS if (out / sub).exists() or (out / sub).is_symlink()]
    if left:
        folder.release()
        raise OutputRefused(f"output folder {out}: {left[0]} holds files defect-fast did not write; move them away "
                            "or choose another folder")
    try:
        make_synthetic_dataset(data, size=args.image_size, seed=args.seed, overwrite=True)  # its parts are not there
        for sub in DEMO_OUTPUTS[:3]:  # its own parts of data/, not a user's file beside them
            _record_tree(folder, sub)
        print(f"synthetic dataset written to {data}")
        train(cfg, out / "run", progress=not args.quiet)
        _record_tree(folder, "run")
        from .evaluate import evaluate_run

        metrics = evaluate_run(out / "run", data, device=args.device)
        _print_metrics(metrics)
        _print_thresholds(metrics.get("thresholds"))
        folder.write_json("metrics.json", metrics)
        test_dir = data / "test"
        samples = [p for cls in sorted(test_dir.iterdir()) if cls.name != "good" for p in sorted(cls.iterdir())[:2]]
        ns = argparse.Namespace(run=out / "run", images=[str(p) for p in samples], out=out / "maps", overwrite=False,
                                device=args.device, map=None, stride=None, threshold=None, far=None, smooth=0.0)
        cmd_predict(ns)
        _record_tree(folder, "maps")
    except BaseException as exc:
        for sub in DEMO_OUTPUTS:  # absent before this demo: all in them is its own
            _record_tree(folder, sub)
        run = out / "run"
        trained = (run / "model.pt").exists()
        if not trained and not (run / "checkpoint.pt").exists():
            folder.discard()  # a failed start: nothing half-made is left (a training's progress is kept)
        elif not trained and isinstance(exc, UserError) and "--resume" in str(exc):  # the training's advice, in demo's terms
            advice = copy.copy(exc)  # of the same kind (a stop keeps its signal)
            advice.args = (f"{exc}: defect-fast train {shlex.quote(str(data))} --out {shlex.quote(str(run))} --resume "
                           f"finishes it, or defect-fast demo {shlex.quote(str(out))} --overwrite starts over",)
            raise advice from None
        elif trained and isinstance(exc, (KeyboardInterrupt, Stopped)):
            # stopped after the training (its evaluation, the maps): the run is kept, and predict's own advice
            # (its --resume, of a predict the user did not start) is not the demo's
            raise Stopped(f"stopped after the training: the trained run is kept in {run} (defect-fast evaluate "
                          f"{shlex.quote(str(run))} {shlex.quote(str(data))} gives its metrics); defect-fast demo "
                          f"{shlex.quote(str(out))} --overwrite starts over",
                          getattr(exc, "signum", signal.SIGINT)) from None
        raise
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, ops

    from .precision import cpu_flags, default_precision

    info = {"defect_fast": __version__, "torch": torch.__version__, "backend_cpu": ops.backend("cpu"),
            "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(),  # (--threads)
            # what --precision auto and the Detector's default pick here, and the flags they read
            "cpu_bf16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}),
            "precision_auto_cpu": default_precision("cpu")}
    if torch.cuda.is_available():
        info["backend_cuda"] = ops.backend("cuda")
        info["precision_auto_cuda"] = default_precision("cuda")
    try:
        from .ops import _native

        module, reason = _native.load()
        # the build's facts with its file (the build cache) and source digest, as _native reads them
        info["native"] = _native.build_info() if module is not None and hasattr(module, "build_info") else reason
    except Exception as exc:  # pragma: no cover - informational
        info["native"] = f"{type(exc).__name__}: {exc}"
    print(dump_json_strict(info))
    return 0


def cmd_export(args) -> int:
    from .export import export

    if args.format == "exported" and Path(args.out).suffix.lower() != ".pt2":  # before the model is read
        raise UsageError(f"--out {args.out}: --format exported writes a torch.export program, which "
                         "torch.export.load reads from a name ending in .pt2; name it so")
    with far_errors(args.run, args.far):
        path = export(args.run, args.out, args.format, batch=args.batch, map_kind=args.map, stride=args.stride,
                      smooth_sigma=args.smooth, blend=args.blend, overwrite=args.overwrite, precision=args.precision,
                      far=args.far)
    print(f"wrote {path} and {path.with_name(path.name + '.json')}")
    return 0


def _fraction(text: str) -> float:
    """argparse type: a share in [0, 1) (``--holdback``)."""
    v = nonneg_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return v


def _learning_rate(text: str) -> float:
    """argparse type: ``--lr``, a number > 0 and at most :data:`~defect_fast.train.MAX_LR` (a larger
    one diverged: NaN maps found only once the training had run)."""
    from .train import MAX_LR

    v = positive_float(text)
    if v > MAX_LR:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LR:g} (Adam's step size; the papers train at 1e-4 "
                                         f"to 1e-3), got {text!r}")
    return v



def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """``--map``, ``--stride``, ``--smooth`` and ``--blend``: the inference settings a command that
    makes a run's maps takes in place of the run's (evaluate, predict, export, diagnose)."""
    from .detect import BLENDS
    from .models import map_names

    parser.add_argument("--map", choices=map_names(), default=None, help="anomaly map (default: the run's --map, else the model's)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="patch stride at inference (default: the run's --infer-stride, else the patch size)")
    parser.add_argument("--smooth", type=nonneg_float, default=None,
                        help="Gaussian blur of the maps, in pixels (default: the run's setting)")
    parser.add_argument("--blend", choices=BLENDS, default=None, help="weights of overlapping patches (default: the run's setting)")


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``defect-fast`` parser; ``train_defaults``: other defaults of ``train`` options (a
    preset's: options given on the command line still win)."""
    from . import __version__
    from .detect import BLENDS
    from .export import FORMATS
    from .models import map_names, model_names
    from .context import IMAGE_SCORES, PROFILE_CHOICES
    from .perceptual import PLACEMENTS
    from .train import FIT_SOURCES, NORMALIZATIONS

    p = ArgumentParser(prog="defect-fast", description="Unsupervised surface-defect detection: "
                       "train on defect-free images, map and score defects.", allow_abbrev=False,  # (--thr: no --threads)
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error too (any position)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads the command's tensor work uses, in "
                   "any position (default: torch's, one per core, or $OMP_NUM_THREADS): fewer leave cores to the "
                   "line's other software")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model on defect-free images",
                       description="Train on DATA/train/good (MVTec layout) or on a plain folder of defect-free images. "
                       "A share of the images (--holdback) is never trained on: it sets the stored pass/fail thresholds.")
    t.add_argument("data", type=input_path, help="MVTec-style root (uses train/good) or a folder of defect-free images")
    t.add_argument("--out", required=True, type=output_path, help="run folder (new or empty; a folder of an earlier run only with --overwrite/--resume)")
    t.add_argument("--model", default="cmaae", choices=model_names(), help="model (default: cmaae)")
    t.add_argument("--image-size", type=positive_int, default=512, help="images are resized to SxS (default 512)")
    t.add_argument("--stride", type=positive_int, default=None, help="patch stride in training (default: patch size); with --patch-sampling random, "
                   "the patches per image and epoch are those a grid of this stride holds, at random offsets")
    t.add_argument("--batch-size", type=positive_int, default=512, help="patches per step (default 512)")
    t.add_argument("--epochs", type=positive_int, nargs="+", default=None, help="epochs per stage (one value = every stage; default 10)")
    t.add_argument("--max-steps", type=positive_int, nargs="+", default=None, help="cap on steps per stage")
    t.add_argument("--lr", type=_learning_rate, default=2e-4, help="Adam learning rate (default 2e-4, beta1 0.5; at most 1)")
    t.add_argument("--seed", type=nonneg_int, default=0, help="seed of the patch order, the held-back images and the "
                   "synthetic anomalies (default 0)")
    t.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints (default 50)")
    t.add_argument("--holdback", type=_fraction, default=0.1, help="share of the defect-free images held back for "
                   "thresholds, never trained on (default 0.1, at least 4 images; 0: none, thresholds then optimistic)")
    t.add_argument("--far", type=rate, default=0.01, help="false-alarm rate of the stored image threshold (default 0.01)")
    t.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                   help="per-position map normalisation fitted on defect-free maps (default none)")
    t.add_argument("--fit-on", choices=FIT_SOURCES, default="train",
                   help="images the map statistics (--map perceptual, --normalize position) are fitted on: the "
                   "training images (default; every held-back image then calibrates) or half of the held-back ones")
    t.add_argument("--patch-sampling", choices=("grid", "random"), default="grid",
                   help="training patches on the inference grid (the papers', the default) or at random offsets (no seams)")
    t.add_argument("--flips", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal and vertical flips of training patches (on in --preset photos)")
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate per stage: constant (the papers', the default) or cosine down to 1 %%")
    t.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="auto",
                   help="arithmetic of the training steps: auto (default: bfloat16 autocast with channels-last where the "
                   "device computes it natively, CPUs with AVX512-BF16/AMX and GPUs of compute capability 8+; float32 elsewhere), float32 or bfloat16; the map "
                   "statistics and thresholds at the end are measured as predict computes maps (the Detector's default)")
    t.add_argument("--map", choices=map_names(), default=None,
                   help="the run's anomaly map (default: the model's); 'perceptual' is fitted on defect-free images (--fit-on)")
    t.add_argument("--map-scales", type=positive_int, nargs="+", default=[1, 2], metavar="F",
                   help="image pyramid of the perceptual map, as downsampling factors (default 1 2: the image and "
                   "its half-size copy, one set of statistics each; 1: the image only)")
    t.add_argument("--infer-stride", type=positive_int, default=None,
                   help="the run's inference patch stride (default: the patch size, tiles)")
    t.add_argument("--blend", choices=BLENDS, default="none", help="the run's weights of overlapping patches (default none)")
    t.add_argument("--smooth", type=nonneg_float, default=0.0, help="the run's Gaussian blur of maps, in pixels (default 0: none)")
    t.add_argument("--context", action=argparse.BooleanOptionalAction, default=False,
                   help="add the image context to the run's maps and scores: Gaussians of the whole image's AlexNet "
                   "conv3-5 statistics, fitted on the training images (for defects spread over a region; README)")
    t.add_argument("--context-profile", choices=PROFILE_CHOICES, default="none",
                   help="with --context, also compare each row (rows) or column (columns) of an image with its "
                   "other rows (columns), for bands across the surface; auto: across the streaks of the "
                   "training images (refused when they share no direction) (default none)")
    t.add_argument("--level-brightness", action=argparse.BooleanOptionalAction, default=False,
                   help="scale every image to the training images' mean brightness before the AlexNet trunk of "
                   "--map perceptual and --context (the reconstruction by its input's factor): lighting "
                   "differences between images out of their statistics (README; on in --preset photos, "
                   "--no-level-brightness turns it off)")
    t.add_argument("--image-score", choices=IMAGE_SCORES, default="combined",
                   help="with --context, the image score: combined (default: the map's top values plus the context "
                   "score) or context (the whole-image distance alone, the map then localising; README)")
    t.add_argument("--placement", choices=PLACEMENTS, default="cells",
                   help="where --map perceptual and --context put the AlexNet feature cells on the image: cells "
                   "(default: a resize by size alone) or centres (each on its receptive field's centre; on magnetic "
                   "tile it cost 0.8 pixel AUROC, experiments/README.md)")
    t.add_argument("--anomaly-source", default=None, help="folder of natural photos for synthetic anomalies "
                   "(added to the sample photos shipped with scikit-learn, which are always used)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="model option, e.g. --set fusion=mam, "
                   "--set gate_activation=sigmoid (repeatable; values parsed as JSON; an option the model as "
                   "built does not use is refused)")
    t.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1 or auto (default; with --resume: the run's own)")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a set of options in one word; options given explicitly take precedence. photos: "
                   + _preset_flags("photos") + " (the settings measured on magnetic-tile photographs; the "
                   "perceptual map and the context read ImageNet AlexNet weights)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (only the files defect-fast wrote)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (its settings and data)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train, **(train_defaults or {}))

    e = sub.add_parser("evaluate", help="pixel/image AUROC, AUPRO, F1 and pass/fail rates on a test split")
    e.add_argument("run", type=input_path, help="run folder (or model.pt)")
    e.add_argument("data", type=input_path, help="MVTec-style root with test/<class>/ and ground_truth/<class>/ (without "
                   "ground_truth/: image-level metrics only)")
    e.add_argument("--json", default=None, type=output_path, help="also write the metrics to this JSON file (new, unless --overwrite; "
                   "'-': to standard output, the table then on standard error)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_inference_options(e)
    which = e.add_mutually_exclusive_group()
    which.add_argument("--threshold", type=finite_float, default=None,
                       help="give the rates at this image threshold (a score: e.g. the F1-optimal one printed, or the one a "
                       "line runs at; default: the threshold stored in the model file)")
    which.add_argument("--far", type=rate, default=None, metavar="RATE",
                       help="give the rates at the threshold for this false-alarm rate, set from the defect-free images the "
                       "run held back (default: at the threshold stored in the model file)")
    e.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1 or auto (default: a GPU when there is one)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="anomaly maps, overlays and scores for images")
    r.add_argument("run", type=input_path, help="run folder (or model.pt)")
    r.add_argument("images", type=input_path, nargs="+", help="image files or folders")
    r.add_argument("--out", required=True, type=output_path, help="output folder (new or empty; earlier predict output only with --overwrite, or a stopped one with --resume)")
    r.add_argument("--overwrite", action="store_true", help="replace earlier output in --out (only the files defect-fast wrote)")
    r.add_argument("--resume", action="store_true", help="continue a predict that was stopped (Ctrl-C, SIGTERM) in --out: "
                   "the same run, images and options, only the images it had not done")
    add_inference_options(r)
    add_threshold_options(r)
    r.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1 or auto (default: a GPU when there is one)")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="write the whole inference pipeline as ONNX, TorchScript or torch.export file",
                       description="Export patches, model, map, stitching, smoothing and score for images uint8 "
                       "[B, 3, S, S] (RGB 0..255, already resized to the run's size S; dynamic B where the format "
                       "allows), plus FILE.json with the size, thresholds and settings.")
    x.add_argument("run", type=input_path, help="run folder (or model.pt)")
    x.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (onnxruntime and others; needs the onnx package), torchscript (LibTorch, the C++ runner) "
                   "or exported (torch.export's program; --out FILE.pt2)")
    x.add_argument("--out", required=True, type=output_path, help="output file (FILE.json is written beside it)")
    x.add_argument("--batch", type=positive_int, default=1, help="images per call in the traced graph (default 1)")
    add_inference_options(x)
    x.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="float32 (default, portable) or bfloat16: the tuned CPU graph, for CPUs with AVX512-BF16 "
                   "or AMX (emulated, and slow, elsewhere); TorchScript files only")
    x.add_argument("--far", type=rate, default=None, metavar="RATE",
                   help="the sidecar's image threshold for this false-alarm rate, set from the defect-free images "
                   "the run held back (default: the threshold stored in the model file)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its FILE.json")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="make a small synthetic defect set, train briefly, evaluate and write maps")
    d.add_argument("out", nargs="?", default="defect-fast-demo", type=output_path, help="output folder (default ./defect-fast-demo)")
    d.add_argument("--model", default="cmaae", choices=model_names(), help="model to train (default cmaae)")
    d.add_argument("--image-size", type=positive_int, default=128, help="side of the synthetic images, in pixels (default 128)")
    d.add_argument("--epochs", type=positive_int, default=4, help="epochs of each training stage (default 4)")
    d.add_argument("--batch-size", type=positive_int, default=32, help="patches per training step (default 32)")
    d.add_argument("--seed", type=nonneg_int, default=0, help="seed of the images and the training (default 0)")
    d.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1 or auto (default: a GPU when there is one)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo in the folder (only its own files)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions and which kernels run")
    i.set_defaults(func=cmd_info)

    from . import watch as watch_cmd
    watch_cmd.add_parser(sub)
    from . import report as report_cmd
    report_cmd.add_parser(sub)
    from . import diagnose as diagnose_cmd
    diagnose_cmd.add_parser(sub)
    from . import recalibrate as calibrate_cmd
    calibrate_cmd.add_parser(sub)
    from . import audit as audit_cmd
    audit_cmd.add_parser(sub)
    return p


#: The warning lines a command showed lately (one text is said once: an image read twice).
#: Bounded, as warn_data keeps no registry: ``watch`` lives for months and names frames in them.
_SHOWN: dict[str, None] = {}
_SHOWN_MAX = 1024


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line ``defect-fast: warning: ...`` (no source line), a text shown lately
    not again."""
    text = f"defect-fast: warning: {one_line(str(message))}"
    if text in _SHOWN:
        return
    _SHOWN[text] = None
    if len(_SHOWN) > _SHOWN_MAX:
        del _SHOWN[next(iter(_SHOWN))]
    print(text, file=sys.stderr if file is None else file)


def _run(argv: list[str]) -> int:
    with warnings.catch_warnings():
        _SHOWN.clear()  # per command
        warnings.showwarning = _show_warning
        from PIL import Image

        # said with the file's name by defect_fast.data.io (PIL's own names no file)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        argv = [a for a in argv if a != "--debug"]
        argv, threads = _take_threads(argv)
        args = _parse(argv)
        args._argv = argv  # what was typed (a default's value given explicitly is still given)
        if threads is None:
            return args.func(args)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return args.func(args)
        finally:  # a caller of main() in its own process keeps its count
            torch.set_num_threads(before)


def _take_threads(argv: list[str]) -> tuple[list[str], int | None]:
    """``--threads N`` (or ``--threads=N``) taken out of ``argv`` at any position, as ``--debug``
    is: (the rest, N or None). A count that is not a whole number >= 1 is a usage error."""
    rest, threads = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":  # what follows is a value, not an option
            rest += argv[i:]
            break
        if a == "--threads" or a.startswith("--threads="):
            if a == "--threads" and i + 1 == len(argv):
                raise UsageError("argument --threads: expected one argument (see 'defect-fast --help')")
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            try:
                threads = positive_int(value)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"argument --threads: {exc} (see 'defect-fast --help')") from None
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    return rest, threads


def main(argv: list[str] | None = None) -> int:
    """The ``defect-fast`` entry point: parse, run, and turn known errors into one line and status 2."""
    from .allocator import keep_freed_memory

    keep_freed_memory()  # the process runs the same large tensors call after call: keep freed pages
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 must not fail a command that is done
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with _sigterm_as_interrupt() as received:
        status = run_main(_run, argv)  # torch is imported in there: a Ctrl-C while it loads is one line too
        if status == 128 + signal.SIGTERM:  # a command that stopped on SIGTERM after keeping its work (train)
            received.append(signal.SIGTERM)  # ends as the signal would, as the others do
        return status


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is (a command that keeps its work says which it was)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a service manager's stop, ``kill``) ends a command as Ctrl-C does: what it had begun
    to write is removed (``OutputFolder.writing``), where the default action ended the process
    with a half-written file under its final name. Then, where SIGTERM would have ended the
    process, it does (the exit status a service manager reads as a stop, not as a failure).
    ``train`` and ``watch`` install their own handlers while they work (stop after the step or
    image in hand)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # the process was started ignoring it: it stays ignored
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if received and previous in (signal.SIG_DFL, None):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
