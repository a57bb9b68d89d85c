"""Model-free reference maps on an MVTec-style dataset, scored like the models.

    python3 experiments/model_free.py [DATA] [--image-size 256] [--out experiments/results/magnetic-tile]

Rows written (one JSON each, same metrics as ``defect-fast evaluate``):
- ``model-free-mean``: |x - mean training image| (the calibration point of issue "Detect real defects").
- ``model-free-blur-perceptual``: the perceptual map of :mod:`defect_fast.perceptual` with a
  Gaussian blur (sigma 8 px) of the input in place of a reconstruction, statistics from the same
  held-back images as a ``--fit-on held-back --map-scales 1`` run (every other image of the 10 %
  a run holds back, seed 0). It tells what the map gets from an autoencoder beyond "a smooth copy
  of the input".
- ``model-free-blur-perceptual-v3``: the same with a run's current defaults, statistics from the
  training images (the 90 % a run trains on) and the two-level pyramid (``--map-scales 1 2``).
- ``model-free-context``: the image context of :mod:`defect_fast.context` alone (no
  reconstruction): its map, smoothed with sigma 4, and as image score the map's top values plus
  the context score, fitted on the training images, standardised on all held-back images (as a
  run's ``--context``).
- ``model-free-blur-perceptual-v3-context``: ``model-free-blur-perceptual-v3`` with the image
  context added the way a ``--context`` run adds it. With the row above, it tells what the
  autoencoder adds to a ``--context`` run.

    python3 experiments/model_free.py [DATA] --rows model-free-context   (only the rows named)

``--context-layers 2 3 4 5`` (default 3 4 5, what ``--context`` reads) names the AlexNet layers of
the context rows, which then end in ``-layers2345``: how much the result depends on that choice.
``--context-profile rows`` adds the band profile to their context (``--context-profile`` of
``train``); the rows then end in ``-rows-v8``: the image score without the profile (as the
Detector's since v6) and the profile reading conv1 through its pool geometry (since v8,
``ImageContext.profile_resample``). Files of earlier code keep their names: ``-rows`` (the profile
in the score's map, before v6) and ``-rows-v6`` (the bilinear resize of v6 and v7).
``--level-brightness`` levels the images' brightness
before the trunk of the context and of the blur-perceptual map, to the training images' mean
(``--level-brightness`` of ``train``); the rows then end in ``-levelled``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.calibration import split_holdback  # noqa: E402
from defect_fast.context import LAYERS, ImageContext  # noqa: E402
from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.maps import blur_matrix  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.perceptual import PerceptualMap  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import provenance, run_script, write_text  # noqa: E402


#: The version of the band profile an ImageContext computes, by its profile_resample: the row names' tag.
PROFILE_VERSION = {"bilinear": "v6", "pool": "v8"}

ROWS = ["model-free-mean", "model-free-blur-perceptual", "model-free-blur-perceptual-v3", "model-free-context",
        "model-free-blur-perceptual-v3-context"]


def scores_of(maps: torch.Tensor, top: float = 0.001) -> torch.Tensor:
    flat = maps.flatten(1)
    return flat.topk(max(1, round(flat.shape[1] * top)), dim=1).values.mean(1)


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [..., H, W] (edges replicated)."""
    a_h, a_w = blur_matrix(x.shape[-2], sigma).float(), blur_matrix(x.shape[-1], sigma).float()
    return a_h @ x @ a_w.T


def blur(x: torch.Tensor) -> torch.Tensor:
    """The control's stand-in for a reconstruction: a Gaussian blur (sigma 8 px)."""
    return gaussian(x, 8.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "magnetic-tile"))
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="the rows to compute (default: all)")
    p.add_argument("--context-layers", type=int, nargs="+", default=list(LAYERS), metavar="L",
                   help="AlexNet conv layers of the image context rows (default 3 4 5)")
    p.add_argument("--context-profile", choices=("none", "rows", "columns"), default="none",
                   help="the band profile of the image context rows (default none)")
    p.add_argument("--level-brightness", action="store_true",
                   help="the image context rows with the brightness levelled before the trunk (default: as read)")
    args = p.parse_args(argv)
    out = Path(args.out)
    s = args.image_size
    args.data = str(Path(args.data).resolve())
    train, paths = load_train_images(args.data, s)
    test = load_test_set(args.data, s)
    out.mkdir(parents=True, exist_ok=True)  # once the data are read: a wrong DATA leaves no empty folder
    index = {str(p): i for i, p in enumerate(paths)}
    tr_paths, held_paths = split_holdback([str(p) for p in paths], 0.1, seed=0)  # the split train() makes
    tr_idx, held_idx = [index[p] for p in tr_paths], sorted(index[p] for p in held_paths)[0::2]
    x_test = test.images.float() / 127.5 - 1

    if "model-free-mean" in args.rows:
        t0 = time.perf_counter()
        mean = (train[tr_idx].float() / 127.5 - 1).mean(0, keepdim=True)
        maps = (x_test - mean).abs().mean(1)
        write(out / "model-free-mean.json", maps, test, "abs(x - mean training image)", time.perf_counter() - t0, args)
    if "model-free-blur-perceptual" in args.rows:
        blur_perceptual_held_back(train[held_idx], x_test, test, out, args)
    if "model-free-blur-perceptual-v3" in args.rows:
        t0 = time.perf_counter()
        pm = PerceptualMap(s, scales=(1, 2))
        pm.fit((c, blur(c)) for c in (train[tr_idx].float() / 127.5 - 1).split(16))
        maps = gaussian(torch.cat([pm(c, blur(c)) for c in x_test.split(16)]), 4.0)
        write(out / "model-free-blur-perceptual-v3.json", maps, test,
              "perceptual map (AlexNet conv1-2, pyramid 1 2, training-image statistics) of x against a Gaussian blur "
              "of x (sigma 8), map smoothed with sigma 4", time.perf_counter() - t0, args)
    context_rows = [r for r in args.rows if r.endswith("-context")]
    if context_rows:
        all_held = sorted(index[p] for p in held_paths)
        context(train[tr_idx].float() / 127.5 - 1, train[all_held].float() / 127.5 - 1, x_test, test, out, args,
                context_rows)
    return 0


def blur_perceptual_held_back(held_u8, x_test, test, out: Path, args) -> None:
    t0 = time.perf_counter()
    s = args.image_size
    pm = PerceptualMap(s)
    held = held_u8.float() / 127.5 - 1
    pm.fit((c, blur(c)) for c in held.split(16))
    maps = torch.cat([pm(c, blur(c)) for c in x_test.split(16)])
    maps = gaussian(maps, 4.0)
    write(out / "model-free-blur-perceptual.json", maps, test,
          "perceptual map (AlexNet conv1-2, held-back statistics) of x against a Gaussian blur of x (sigma 8), "
          "map smoothed with sigma 4", time.perf_counter() - t0, args)


@torch.no_grad()
def context(x_train, x_held, x_test, test, out: Path, args, rows: list[str]) -> None:
    """The image context alone, and added to the blur-perceptual v3 map, as a ``--context`` run
    adds it (Detector.fit_context): fitted on the training images, standardised on all held-back ones."""
    t0 = time.perf_counter()
    s = args.image_size
    layers = tuple(sorted(args.context_layers))
    suffix = "" if layers == LAYERS else "-layers" + "".join(map(str, layers))
    level = reference_brightness_of(x_train) if args.level_brightness else None
    ctx = ImageContext(s, layers=layers, profile=args.context_profile)
    # a profiled row is named by the version whose profile it computes: "-v8", conv1 read through its
    # pool geometry (the committed "-v6" files: the score without the profile, bilinear resize; the
    # "-rows" files: before v6, the profile in the map the score's top values came from)
    suffix += "" if args.context_profile == "none" else f"-{args.context_profile}-{PROFILE_VERSION[ctx.profile_resample]}"
    suffix += "-levelled" if args.level_brightness else ""
    resampled = "" if args.context_profile == "none" else f" from conv1 by {ctx.profile_resample}"
    ctx.brightness = level
    ctx.fit(lambda: x_train.split(32))
    fitted = time.perf_counter() - t0
    parts = context_parts(ctx, x_held, x_test, s)

    def combined(base_held, base_test):
        return combine_like_detector(ctx, parts, base_held, base_test, s)

    if "model-free-context" in rows:
        maps, scores = combined(None, None)
        write(out / f"model-free-context{suffix}.json", maps, test,
              f"image context map (AlexNet conv layers {list(layers)}, profile {args.context_profile}{resampled}, "
              "training-image Gaussians), "
              "smoothed with sigma 4; "
              "image score its top values (of the map without the profile) standardised on the held-back images "
              f"plus the context score; brightness levelled: {level is not None}",
              time.perf_counter() - t0, args, scores)
    if "model-free-blur-perceptual-v3-context" in rows:
        t0 = time.perf_counter() - fitted
        pm = PerceptualMap(s, scales=(1, 2))
        pm.brightness = level
        pm.fit((c, blur(c)) for c in x_train.split(16))
        base_held = torch.cat([pm(c, blur(c)) for c in x_held.split(16)])
        base_test = torch.cat([pm(c, blur(c)) for c in x_test.split(16)])
        maps, scores = combined(base_held, base_test)
        write(out / f"model-free-blur-perceptual-v3-context{suffix}.json", maps, test,
              f"model-free-blur-perceptual-v3 plus the image context (AlexNet conv layers {list(layers)}, profile "
              f"{args.context_profile}{resampled}), combined as "
              f"a --context run combines them; brightness levelled: {level is not None}", time.perf_counter() - t0,
              args, scores)


def reference_brightness_of(x: torch.Tensor) -> float:
    """:func:`defect_fast.perceptual.reference_brightness` of images in [-1, 1] (as the Detector's
    fit takes it from their uint8 pixels)."""
    return float(((x.double() + 1) / 2).mean())


@torch.no_grad()
def context_parts(ctx: ImageContext, x_held: torch.Tensor, x_test: torch.Tensor, s: int) -> dict[str, torch.Tensor | None]:
    """A fitted context's parts of the held-back and test images ([N,3,s,s] in [-1, 1]): maps without
    the profile ("held", "test"), profile values ("prof_held", "prof_test", None without a profile)
    and the test images' context scores ("score_test")."""
    feats_held = [ctx.features(c) for c in x_held.split(16)]
    feats_test = [ctx.features(c) for c in x_test.split(16)]
    held, prof_held = _parts([ctx.map_parts(f, s) for f in feats_held])
    test, prof_test = _parts([ctx.map_parts(f, s) for f in feats_test])
    return {"held": held, "prof_held": prof_held, "test": test, "prof_test": prof_test,
            "score_test": torch.cat([ctx.score(f) for f in feats_test])}


def combine_like_detector(ctx: ImageContext, parts: dict, base_held, base_test, s: int):
    """Test maps and image scores of the context ``parts`` (:func:`context_parts`) added to base maps
    (unsmoothed [N, s, s], or None for the context alone) as the Detector adds them: base maps
    standardised on the held-back images' maps, smoothed with sigma 4; the profile (if any) joins
    the map, not the map the score's top values come from; the score's top values standardised
    on the held-back images, plus the context score."""
    if base_held is not None:
        ctx.set_detector_stats(base_maps=base_held)
        held_maps = gaussian(ctx.combine_maps(base_held, parts["held"]), 4.0)
        test_maps = gaussian(ctx.combine_maps(base_test, parts["test"]), 4.0)
    else:
        held_maps, test_maps = gaussian(parts["held"], 4.0), gaussian(parts["test"], 4.0)
    top_held, top_test = scores_of(held_maps), scores_of(test_maps)
    if parts["prof_test"] is not None:
        test_maps = test_maps + gaussian(ctx.spread(parts["prof_test"], s), 4.0)
    return test_maps, (top_test - top_held.mean()) / top_held.std() + parts["score_test"]


def _parts(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ImageContext.map_parts of several batches -> (maps without the profile, profile values or None)."""
    maps = torch.cat([m for m, _v in parts])
    return maps, (None if parts[0][1] is None else torch.cat([v for _m, v in parts]))


def write(path: Path, maps, test, what: str, seconds: float, args, scores=None) -> None:
    m = evaluate(maps, test.masks, scores_of(maps) if scores is None else scores, test.labels, test.classes)
    m.update(model="model-free", map=what, image_size=args.image_size, seconds=round(seconds, 1),
             command="python3 experiments/model_free.py " + " ".join(sys.argv[1:]), **provenance())
    path = write_text(path, dump_json_strict(m))
    print(f"{path.name}: pixel AUROC {m['pixel_auroc']:.4f}, image AUROC {m['image_auroc']:.4f}, AUPRO {m['aupro']:.4f}")


if __name__ == "__main__":
    run_script(main)
