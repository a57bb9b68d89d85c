"""Does squeezing every crop into a square cost accuracy? The model-free perceptual map, two ways.

Magnetic-tile crops are 103-632 px wide and 222-403 px high (width / height 0.44 to 2.3 in the
training images). Resized to a square, as every run does (``--image-size 256``), the surface
is stretched sideways by a factor that differs from image to image by up to 5x: the vertical
grinding streaks, and the cracks that run along them, come out narrow in one image and wide in
the next, and the map's defect-free statistics have to accept all those widths as normal.

Every row is the ``model-free-blur-perceptual-v3`` map of ``experiments/model_free.py`` (x against
a Gaussian blur of x, sigma 8; AlexNet conv1-2; pyramid 1 2; statistics from the 90 % of
train/good a run trains on; map smoothed with sigma 4, image score the mean of its top 0.1 %),
computed in one run:

- ``square``: images resized to 256 x 256 (the runs' input);
- ``one-scale-H``: every image resized by the same factor, the one that takes the training
  images' median height to H px (``--heights``, default 256), aspect ratio kept. The residual
  features are resampled to the map's fixed grid, so the statistics stay per position of the
  normalised image; the map is resized to 256 x 256 at the end and scored against the same
  256 x 256 masks;
- ``square-S`` (``--square-sides``): images squeezed into S x S squares, the map resampled as in
  the one-scale rows: more pixels with the aspect ratio still lost, the control that tells the
  scale's share from the resolution's;
- ``...-context`` (``--context``): each row with the image context (computed on the 256 x 256
  images, band profile ``--context-profile``, rows by default) added as a ``--context`` run adds
  it (:func:`model_free.combine_like_detector`); ``square-context`` is
  ``model-free-blur-perceptual-v3-context-rows-v6`` of ``experiments/model_free.py``.

    python3 experiments/native_scale_probe.py [DATA] [--heights H...] [--square-sides S...] [--context] [--out FILE]
    (default FILE: experiments/results/native-scale/model-free.json)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from defect_fast.calibration import split_holdback  # noqa: E402
from defect_fast.data import load_test_set, load_train_images, read_image  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.perceptual import PerceptualMap  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from defect_fast.context import ImageContext  # noqa: E402
from model_free import combine_like_detector, context_parts, gaussian, scores_of  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

SIZE = 256


def one_scale(image: torch.Tensor, factor: float) -> torch.Tensor:
    """uint8 [3, h, w] -> [1, 3, h', w'] in [-1, 1]: the image resized by ``factor`` on both sides."""
    h, w = image.shape[-2:]
    size = (max(64, round(h * factor)), max(64, round(w * factor)))
    return F.interpolate(image.float()[None], size=size, mode="bilinear", antialias=True, align_corners=False) / 127.5 - 1


def square(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [1, 3, side, side] in [-1, 1]: the image squeezed into a square of ``side`` px."""
    return F.interpolate(image.float()[None], size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False) / 127.5 - 1


def perceptual_maps(fit_images, *image_sets) -> list[torch.Tensor]:
    """The v3 model-free map, fitted on fit_images: the unsmoothed maps [N, SIZE, SIZE] of each of
    image_sets (iterables of [1|n,3,h,w] in [-1, 1])."""
    pm = PerceptualMap(SIZE, scales=(1, 2))
    blur = lambda x: gaussian(x, 8.0)  # noqa: E731
    pm.fit((x, blur(x)) for x in fit_images)
    with torch.no_grad():
        return [torch.cat([pm(x, blur(x), size=SIZE) for x in images]) for images in image_sets]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--heights", type=int, nargs="*", default=[SIZE], metavar="H",
                   help="one-scale rows: the factor takes the training images' median height to H px (default 256)")
    p.add_argument("--square-sides", type=int, nargs="*", default=[], metavar="S",
                   help="also rows 'square-S': images squeezed into S x S squares (more pixels, aspect not kept), "
                        "the map resampled to 256 x 256 as the one-scale rows' is")
    p.add_argument("--context", action="store_true",
                   help="also each row with the image context added as a --context run adds it (rows '...-context')")
    p.add_argument("--context-profile", choices=("none", "rows", "columns"), default="rows",
                   help="the context's band profile with --context (default rows, what --preset photos picks here)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "native-scale" / "model-free.json"))
    args = p.parse_args(argv)
    data = str(Path(args.data).resolve())
    train, paths = load_train_images(data, SIZE)
    test = load_test_set(data, SIZE)
    index = {str(q): i for i, q in enumerate(paths)}
    tr_paths, held_paths = split_holdback([str(q) for q in paths], 0.1, seed=0)  # the split train() makes
    tr_idx, held_idx = [index[q] for q in tr_paths], sorted(index[q] for q in held_paths)
    rows = {}
    scaled = lambda images: images.float() / 127.5 - 1  # noqa: E731
    square_train, square_held, square_test = scaled(train[tr_idx]), scaled(train[held_idx]), scaled(test.images)
    if args.context:  # fitted once, on the square images; each row then gets its "-context" twin
        t0 = time.perf_counter()
        ctx = ImageContext(SIZE, profile=args.context_profile)
        ctx.fit(lambda: square_train.split(32))
        parts = context_parts(ctx, square_held, square_test, SIZE)
        context_seconds = time.perf_counter() - t0

    def add_rows(name, fit_images, held_images, test_images, t0, what):
        held_maps, test_maps = perceptual_maps(fit_images, held_images, test_images)
        seconds = time.perf_counter() - t0
        rows[name] = row(gaussian(test_maps, 4.0), test, seconds, what)
        if args.context:
            maps, scores = combine_like_detector(ctx, parts, held_maps, test_maps, SIZE)
            rows[f"{name}-context"] = row(maps, test, seconds + context_seconds, f"{what}; plus the image context "
                                          f"(square images, profile {args.context_profile}) as a --context run adds it",
                                          scores)

    add_rows("square", square_train.split(16), square_held.split(16), square_test.split(16), time.perf_counter(),
             "256 x 256, aspect ratio not kept (the runs' input)")

    native_train = [read_image(q, None) for q in tr_paths]
    native_held = [read_image(paths[i], None) for i in held_idx]
    native_test = [read_image(q, None) for q in test.paths]
    median_height = statistics.median(x.shape[-2] for x in native_train)
    for side in args.square_sides:
        add_rows(f"square-{side}", (square(x, side) for x in native_train), (square(x, side) for x in native_held),
                 (square(x, side) for x in native_test), time.perf_counter(),
                 f"{side} x {side}, aspect ratio not kept, map resampled to 256 x 256")
    for height in args.heights:
        factor = height / median_height
        add_rows(f"one-scale-{height}", (one_scale(x, factor) for x in native_train),
                 (one_scale(x, factor) for x in native_held), (one_scale(x, factor) for x in native_test),
                 time.perf_counter(), f"every image resized by {factor:.4f} (median training height "
                 f"{median_height:g} -> {height} px), aspect kept")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "python3 experiments/native_scale_probe.py " + " ".join(sys.argv[1:]),
              "map": "model-free-blur-perceptual-v3 (see experiments/model_free.py)", "rows": rows}
    out = write_text(out, dump_json_strict(result))
    for name, r in rows.items():
        per = ", ".join(f"{c} {v['pixel_auroc']:.1f}/{v['image_auroc']:.1f}" for c, v in r["per_class"].items())
        print(f"{name:20s} pixel {r['pixel_auroc']:.2f} image {r['image_auroc']:.2f} AUPRO {r['aupro']:.2f}  "
              f"per class pixel/image: {per}")
    print(f"wrote {out}")
    return 0


def row(maps: torch.Tensor, test, seconds: float, what: str, scores: torch.Tensor | None = None) -> dict:
    m = evaluate(maps, test.masks, scores_of(maps) if scores is None else scores, test.labels, test.classes)
    pts = lambda v: round(100 * v, 2)  # noqa: E731
    return {"input": what, "pixel_auroc": pts(m["pixel_auroc"]), "image_auroc": pts(m["image_auroc"]),
            "aupro": pts(m["aupro"]), "seconds": round(seconds, 1),
            "per_class": {c: {"pixel_auroc": pts(v["pixel_auroc"]), "image_auroc": pts(v["image_auroc"])}
                          for c, v in m["per_class"].items()}}


if __name__ == "__main__":
    run_script(main)
