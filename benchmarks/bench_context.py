"""What the image context (``--context``, :mod:`defect_fast.context`) costs: inference per image
against the Detector without it, and the fit at the end of training.

A CMA-AE Detector with the perceptual map (pyramid 1 2, stride 32, Hann blending, smoothing 4:
the recommended run's inference) on random 256x256 images, timed in alternating rounds with and
without a fitted context; and ``ImageContext.fit`` on ``--fit-images`` random images. Weights
and images are random (``--images``: photos to time on instead; the medians of the band profile
take longer on the features of photos than on those of random pixels); the trunk is the ImageNet AlexNet when
``$DEFECT_FAST_ALEXNET_WEIGHTS`` names it, else random weights of the same shapes.

Also timed in the same rounds, the same Detector with the frozen trunk as it ran before it
followed the Detector's precision: float32, and the image's conv1 and conv2 computed twice (by the
perceptual map and by the context) instead of once ("with_float32_trunk"); the ratio of the two
is what the tuned trunk saves per image of the recommended run. And the same Detector with a
context that adds the band profile (``--context-profile rows``, "with_profile"), and that
context's fit; and that Detector with the map and the context levelling each image's brightness
before the trunk (``--level-brightness``, "with_profile_levelled": the recommended run's inference
since v7), and that Detector again with the band profile's medians taken by ``torch.median``
("with_profile_levelled_torch_median"), as before they ran as a selection network on CPUs
(``defect_fast.context._median``; the same values), and with the perceptual map's layers
concatenated before they are standardised ("with_profile_levelled_concatenated"), as before it
went layer by layer (``PerceptualMap._level_map_by_layer``; the same values). Also
``PerceptualMap.fit`` on the ``--fit-images`` images (the statistics training fits at its end),
layer by layer and as before, with the residual concatenated (``PerceptualMap._batch_sums``; the
same statistics), 3 alternating rounds. And the recommended run's Detector with conv1 brought
to the band profile's grid by the bilinear resize of files fitted before the 3 x 3 pool
("with_profile_levelled_bilinear", ``ImageContext.profile_resample``; v7 and earlier): what the
pool of v8 costs per image. And that Detector with the map's and the context's feature cells
placed on their receptive fields' centres ("with_profile_levelled_centres", ``--placement
centres``) instead of resized to the image by size alone (the default): what that option costs. On a GPU
(``--device cuda``) every Detector timed replays CUDA graphs. The process's C allocator is set
as the command line sets it (:func:`defect_fast.allocator.keep_freed_memory`, recorded as
"allocator"; results written before this record none and ran with glibc's own settings).

    python benchmarks/bench_context.py [--device cpu|cuda] [--threads 2] [--batch 8] [--rounds 10]
        [--fit-images 540] [--images FOLDER] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from common import RESULTS, command_line, device_info, time_interleaved, write_results

import defect_fast.context as context_module
from defect_fast.allocator import keep_freed_memory
from defect_fast.context import ImageContext
from defect_fast.detect import Detector
from defect_fast.models import build_model
from defect_fast.perceptual import PerceptualMap
from defect_fast.precision import cudnn_benchmark

SIZE = 256


class Float32Trunk(Detector):
    """The Detector with the trunk path before it followed the precision option: float32, nothing shared."""

    def _trunk_options(self):
        return {"dtype": None, "channels_last": False}

    def _shared_stem(self, ctx):
        return 0


def _with_torch_median(fn):
    """``fn`` run with the context's medians taken by ``torch.median`` (its route before the
    selection network)."""
    def call():
        saved = context_module._median
        context_module._median = lambda x, dim: x.median(dim=dim).values
        try:
            return fn()
        finally:
            context_module._median = saved
    return call


def _with_concatenated_residual(fn):
    """``fn`` run with the perceptual map's levels computed as before they went layer by layer:
    the layers' residuals concatenated, standardised, then squared (the same values)."""
    def call():
        saved = PerceptualMap._level_map_by_layer
        PerceptualMap._level_map_by_layer = (lambda self, x, recon, level, size, **trunk:
                                             self.level_map(self.standardised(x, recon, level, **trunk), size))
        try:
            return fn()
        finally:
            PerceptualMap._level_map_by_layer = saved
    return call


def _concatenated_sums(self, x, recon, level, dtype, channels_last):
    """``PerceptualMap._batch_sums`` as it was before it went layer by layer (the same sums)."""
    e = self.residual(x, recon, level, dtype=dtype, channels_last=channels_last).double()
    return e.sum(0), (e * e).sum(0)


def _fit_timings(pm: PerceptualMap, pairs: list, trunk: dict, rounds: int, device: str) -> dict:
    """PerceptualMap.fit on ``pairs``, layer by layer and with the residual concatenated, alternating."""
    def concatenated():
        saved = PerceptualMap._batch_sums
        PerceptualMap._batch_sums = _concatenated_sums
        try:
            pm.fit(pairs, **trunk)
        finally:
            PerceptualMap._batch_sums = saved
    return time_interleaved({"by_layer": lambda: pm.fit(pairs, **trunk), "concatenated": concatenated},
                            rounds=rounds, warmup=1, device=device)


def _trunk() -> dict[str, torch.Tensor]:
    if os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS"):
        from defect_fast.losses.lpips import load_alexnet_trunk

        return load_alexnet_trunk()[0]
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    t = {}
    for i, s in shapes.items():
        t[f"features.{i}.weight"] = torch.randn(*s, generator=g) * (2.0 / (s[1] * s[2] * s[3])) ** 0.5
        t[f"features.{i}.bias"] = torch.zeros(s[0])
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="images per Detector call (default 8)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fit-images", type=int, default=540, help="images ImageContext.fit runs on (default 540)")
    ap.add_argument("--images", default=None, help="time on --batch photos spread over this folder (read at 256 px) "
                    "instead of random pixels (default)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/context_<device>.json)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible")
    if min(args.threads, args.batch, args.rounds, args.fit_images) < 1:
        ap.error("--threads, --batch, --rounds and --fit-images must be >= 1")
    dev = torch.device(args.device)
    allocator = keep_freed_memory()  # as the command line sets it (DEFECT_FAST_MALLOC=default: glibc's own)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trunk = _trunk()
    g = torch.Generator().manual_seed(1)
    if args.images is not None:  # photos: what the features look like decides how long a median takes
        from defect_fast.data.io import collect_images, read_images

        paths = collect_images([args.images])
        if len(paths) < args.batch:
            ap.error(f"--images {args.images}: {len(paths)} images, fewer than --batch {args.batch}")
        images = read_images(paths[:: max(1, len(paths) // args.batch)][: args.batch], SIZE).to(dev)
    else:
        images = torch.randint(0, 256, (args.batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=g).to(dev)
    fit_set = (torch.rand(args.fit_images, 3, SIZE, SIZE, generator=g) * 2 - 1).to(dev)

    t0 = time.perf_counter()
    ctx = ImageContext(SIZE, trunk=trunk).to(dev)
    ctx.fit(lambda: fit_set.split(32))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx_rows = ImageContext(SIZE, trunk=trunk, profile="rows").to(dev)
    ctx_rows.fit(lambda: fit_set.split(32))
    fit_rows_s = time.perf_counter() - t0

    model = build_model("cmaae")
    pm = PerceptualMap(SIZE, trunk=trunk, scales=(1, 2)).to(dev)
    plain = Detector(model, SIZE, stride=32, blend="hann", smooth_sigma=4.0, device=dev)
    # statistics from 8 images whatever --batch is (the fit needs 2 or more); under the timed paths'
    # cuDNN setting, since cuDNN keeps the first plan it finds for a shape (at --batch 8 these are the same)
    with torch.no_grad(), cudnn_benchmark(plain.cudnn_benchmark):
        x = plain._to_model_input(torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8, generator=g).to(dev))
        pm.fit([(x, plain._stitched_recon(x))])
    kw = dict(stride=32, blend="hann", smooth_sigma=4.0, perceptual=pm, map_kind="perceptual", device=dev,
              cuda_graphs=dev.type == "cuda")  # on a GPU the tuned path replays CUDA graphs
    plain = Detector(model, SIZE, **kw)
    with_ctx = Detector(model, SIZE, context=ctx, **kw)
    before = Float32Trunk(model, SIZE, context=ctx, **kw)
    with_rows = Detector(model, SIZE, context=ctx_rows, **kw)
    # levelled to one brightness (any level costs the same; the trunks still share conv1-2)
    pm_levelled, ctx_levelled = copy.deepcopy(pm), copy.deepcopy(ctx_rows)
    pm_levelled.brightness = ctx_levelled.brightness = 0.45
    levelled = Detector(model, SIZE, context=ctx_levelled, **{**kw, "perceptual": pm_levelled})
    # the same Detector for the routes replaced: one each, since a CUDA graph replays the route it captured
    by_torch_median, concatenated = (Detector(model, SIZE, context=ctx_levelled, **{**kw, "perceptual": pm_levelled})
                                     for _ in range(2))
    # and with conv1 brought to the profile's grid by the bilinear resize of files fitted before
    # the pool ("profile_resample"; the v7 runs): what the pool costs or saves per image
    ctx_bilinear = copy.deepcopy(ctx_levelled)
    ctx_bilinear.profile_resample = "bilinear"
    bilinear = Detector(model, SIZE, context=ctx_bilinear, **{**kw, "perceptual": pm_levelled})
    # and with the feature cells on their receptive fields' centres (--placement centres)
    pm_centres, ctx_centres = copy.deepcopy(pm_levelled), copy.deepcopy(ctx_levelled)
    pm_centres.placement = ctx_centres.placement = "centres"
    centres = Detector(model, SIZE, context=ctx_centres, **{**kw, "perceptual": pm_centres})
    trunk = with_ctx._trunk_options()
    with torch.inference_mode():
        t = time_interleaved({"without": lambda: plain(images), "with": lambda: with_ctx(images),
                              "with_float32_trunk": lambda: before(images), "with_profile": lambda: with_rows(images),
                              "with_profile_levelled": lambda: levelled(images),
                              "with_profile_levelled_torch_median": _with_torch_median(lambda: by_torch_median(images)),
                              "with_profile_levelled_concatenated": _with_concatenated_residual(lambda: concatenated(images)),
                              "with_profile_levelled_bilinear": lambda: bilinear(images),
                              "with_profile_levelled_centres": lambda: centres(images),
                              "context_alone": lambda: ctx.map(ctx.features(plain._to_model_input(images), **trunk), SIZE)},
                             rounds=args.rounds, warmup=2, device=args.device)
    out = args.out or RESULTS / f"context_{dev.type}.json"
    info = device_info(args.device)
    per = {k: round(v["median_ms"] / args.batch, 2) for k, v in t.items()}
    # the inference timings now (the fits below take as long again): a run stopped at its time
    # limit keeps them; the whole record replaces this one at the end
    write_results(out, {"info": info, "command": command_line(), "batch": args.batch, "image_size": SIZE,
                        "ms_per_image": per, "timings": t, "partial": "the fit timings had not run yet"})
    # the perceptual map's statistics, as training fits them at its end (the reconstructions here
    # are the images dimmed: the fit's cost does not depend on them)
    fit_pm = copy.deepcopy(pm)
    pairs = [(c, c * 0.8) for c in fit_set.split(8)]
    fit_t = _fit_timings(fit_pm, pairs, trunk, rounds=3, device=args.device)
    res = {"info": info, "command": command_line(), "allocator": allocator, "threads": args.threads, "batch": args.batch,
           "image_size": SIZE,
           "images": args.images or "random", "detector_precision": plain.precision, "trunk": "imagenet" if os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS") else "random",
           "shared_trunk_layers": with_ctx._shared_stem(ctx),
           "ms_per_image": per, "ratio_with_over_without": round(per["with"] / per["without"], 3),
           "ratio_float32_trunk_over_tuned": round(per["with_float32_trunk"] / per["with"], 3),
           "ratio_with_profile_over_with": round(per["with_profile"] / per["with"], 3),
           "ratio_levelled_over_with_profile": round(per["with_profile_levelled"] / per["with_profile"], 3),
           "ratio_torch_median_over_network": round(per["with_profile_levelled_torch_median"]
                                                    / per["with_profile_levelled"], 3),
           "ratio_concatenated_over_by_layer": round(per["with_profile_levelled_concatenated"]
                                                     / per["with_profile_levelled"], 3),
           "profile_resample": ctx_levelled.profile_resample,
           "ratio_bilinear_over_pool": round(per["with_profile_levelled_bilinear"] / per["with_profile_levelled"], 3),
           "placement": pm_levelled.placement,
           "ratio_centres_over_cells": round(per["with_profile_levelled_centres"] / per["with_profile_levelled"], 3),
           "shared_trunk_layers_levelled": levelled._shared_stem(ctx_levelled),
           "fit_images": args.fit_images, "fit_seconds": round(fit_s, 2),
           "perceptual_fit_seconds": {k: round(v["median_ms"] / 1e3, 2) for k, v in fit_t.items()},
           "ratio_perceptual_fit_concatenated_over_by_layer": round(fit_t["concatenated"]["median_ms"]
                                                                    / fit_t["by_layer"]["median_ms"], 3),
           "fit_seconds_with_profile": round(fit_rows_s, 2), "timings": t}
    print(f"{info.get('gpu') or info['cpu']} | torch {info['torch']} | threads {args.threads} | "
          f"Detector precision {plain.precision}")
    print(f"per 256x256 image: without context {per['without']:.1f} ms, with {per['with']:.1f} ms "
          f"(x{res['ratio_with_over_without']:.3f}); context map alone {per['context_alone']:.1f} ms")
    print(f"with the float32 trunk, conv1-2 computed twice: {per['with_float32_trunk']:.1f} ms "
          f"(x{res['ratio_float32_trunk_over_tuned']:.3f} the tuned trunk)")
    print(f"with the band profile (rows): {per['with_profile']:.1f} ms (x{res['ratio_with_profile_over_with']:.3f} "
          f"the context without it)")
    print(f"and with the brightness levelled: {per['with_profile_levelled']:.1f} ms "
          f"(x{res['ratio_levelled_over_with_profile']:.3f} the same without levelling)")
    print(f"and with the profile's medians by torch.median: {per['with_profile_levelled_torch_median']:.1f} ms "
          f"(x{res['ratio_torch_median_over_network']:.3f} the selection network)")
    print(f"and with the perceptual map's layers concatenated before they are standardised: "
          f"{per['with_profile_levelled_concatenated']:.1f} ms (x{res['ratio_concatenated_over_by_layer']:.3f} "
          "layer by layer)")
    print(f"and with conv1 brought to the profile's grid by a bilinear resize (files before the pool): "
          f"{per['with_profile_levelled_bilinear']:.1f} ms (x{res['ratio_bilinear_over_pool']:.3f} the pool)")
    print(f"and with the feature cells on their receptive fields' centres (--placement centres): "
          f"{per['with_profile_levelled_centres']:.1f} ms (x{res['ratio_centres_over_cells']:.3f} resized by size alone)")
    print(f"ImageContext.fit on {args.fit_images} images: {fit_s:.1f} s; with the profile {fit_rows_s:.1f} s")
    print(f"PerceptualMap.fit on {args.fit_images} images: {fit_t['by_layer']['median_ms'] / 1e3:.1f} s, "
          f"{fit_t['concatenated']['median_ms'] / 1e3:.1f} s with the residual concatenated "
          f"(x{res['ratio_perceptual_fit_concatenated_over_by_layer']:.3f})")
    write_results(out, res)


if __name__ == "__main__":
    main()
