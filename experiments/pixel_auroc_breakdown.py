"""Where a run's pooled pixel AUROC is lost: which normal pixels outrank which defect pixels.

    python3 experiments/pixel_auroc_breakdown.py RUN [DATA] [--halo 32] [--out FILE]

The pooled pixel AUROC ranks every defect pixel of the test split against every normal pixel of
every test image, good and defective. It mixes three things that a per-class figure hides:

- **which defect pixels are low**: each class's defect pixels against the pixels of the good
  images only (the ranking a perfect map would win whatever its bleed);
- **the bleed of a defect into its surroundings**: the normal pixels of defective images, by
  their distance to the nearest defect pixel of their image (0-4, 4-8, ... px, at the map's
  resolution), against the pixels of the good images: the maps see whole neighbourhoods (conv2
  fields of 51 px, a half-size pyramid level, the context's 15 x 15 grid, the smoothing), so a
  strong defect lifts the normal pixels around it;
- **what that bleed costs**: the pooled AUROC with the normal pixels within ``--halo`` px of a
  defect left out of the negatives (all classes, and around each class's defects only). Not a
  figure any map could reach, since annotations are not exact to the pixel: a bound on what a
  sharper map would gain.

Every AUROC is exact (scikit-learn over all pixels). Writes one JSON (default
``experiments/results/pixel-auroc-breakdown/<run name>.json``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import GOOD, load_test_set  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

#: Distance bins (px) of normal pixels to the nearest defect pixel of their image.
BINS = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, None))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC of ``pos`` ranked above ``neg`` (None when either is empty)."""
    if pos.size == 0 or neg.size == 0:
        return None
    y = np.concatenate([np.ones(pos.size, np.int8), np.zeros(neg.size, np.int8)])
    return float(roc_auc_score(y, np.concatenate([pos.ravel(), neg.ravel()])))


def breakdown(maps: np.ndarray, masks: np.ndarray, classes: list[str], halo: int = 32) -> dict:
    """The figures of the module docstring for maps [N, S, S], masks bool [N, S, S], N class names."""
    cls = np.asarray(classes)
    good = maps[cls == GOOD].ravel()
    dist = np.full(maps.shape, np.inf, np.float32)  # distance of each pixel to its image's defect
    for i in np.flatnonzero(masks.reshape(len(cls), -1).any(1)):
        dist[i] = distance_transform_edt(~masks[i])
    normal = ~masks
    out: dict = {"n_images": int(len(cls)), "halo_px": halo,
                 "pooled_pixel_auroc": auroc(maps[masks], maps[normal])}
    out["pooled_without_halos"] = auroc(maps[masks], maps[normal & (dist > halo)])
    per_class = {}
    for c in sorted(set(classes) - {GOOD}):
        sel = cls == c
        d, own = maps[sel][masks[sel]], maps[sel][normal[sel]]
        others = maps[~sel & (cls != GOOD)][normal[~sel & (cls != GOOD)]]
        around = np.zeros_like(masks)
        around[sel] = normal[sel] & (dist[sel] <= halo)
        bins = {}
        for lo, hi in BINS:
            ring = normal[sel] & (dist[sel] > lo) & ((dist[sel] <= hi) if hi is not None else np.isfinite(dist[sel]))
            px = maps[sel][ring]
            bins[f"{lo}-{hi if hi is not None else 'inf'}"] = {
                "n_pixels": int(px.size), "median": float(np.median(px)) if px.size else None,
                "auroc_vs_good_pixels": auroc(px, good)}
        per_class[c] = {
            "n_images": int(sel.sum()), "n_defect_pixels": int(d.size),
            "share_of_defect_pixels": float(d.size / max(1, int(masks.sum()))),
            "defect_median": float(np.median(d)) if d.size else None,
            "defect_vs_good_pixels": auroc(d, good),
            "defect_vs_normal_pixels_of_its_images": auroc(d, own),
            "defect_vs_normal_pixels_of_other_defective_images": auroc(d, others),
            "normal_pixels_by_distance": bins,
            "pooled_without_its_halos": auroc(maps[masks], maps[normal & ~around]),
        }
    out["good_median"] = float(np.median(good)) if good.size else None
    out["per_class"] = per_class
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (or model.pt)")
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--halo", type=int, default=32, help="px around a defect left out for the bound (default 32)")
    p.add_argument("--images-per-batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    det = Detector.load(args.run)
    test = load_test_set(args.data, det.image_size)
    res = det.predict_batched(test.images, args.images_per_batch)
    out = breakdown(res["maps"].float().numpy(), test.masks.numpy(), test.classes, args.halo)
    out["run"], out["data"] = str(args.run), str(args.data)
    out["command"] = "python3 experiments/pixel_auroc_breakdown.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = args.run.name if args.run.is_dir() else args.run.parent.name
    path = args.out or ROOT / "experiments" / "results" / "pixel-auroc-breakdown" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = write_text(path, dump_json_strict(out))
    print(f"pooled pixel AUROC {100 * out['pooled_pixel_auroc']:.2f}; without the normal pixels within "
          f"{args.halo} px of a defect {100 * out['pooled_without_halos']:.2f}")
    print(f"{'class':10s} {'share':>6s} {'vs good':>8s} {'vs own':>8s} {'vs other':>9s} {'no halo':>8s}   "
          f"normal px by distance (AUROC vs good)")
    for c, r in out["per_class"].items():
        rings = " ".join(f"{k}:{100 * v['auroc_vs_good_pixels']:.0f}" for k, v in r["normal_pixels_by_distance"].items()
                         if v["auroc_vs_good_pixels"] is not None)
        print(f"{c:10s} {100 * r['share_of_defect_pixels']:5.1f}% {100 * r['defect_vs_good_pixels']:8.2f} "
              f"{100 * r['defect_vs_normal_pixels_of_its_images']:8.2f} "
              f"{100 * r['defect_vs_normal_pixels_of_other_defective_images']:9.2f} "
              f"{100 * r['pooled_without_its_halos']:8.2f}   {rings}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_script(main)
