"""How much a run's figures depend on which test images were drawn: bootstrap intervals.

Predicts the test split once with each trained run, then draws resamples of the test images
(with replacement, within each class folder, so that every resample has the split's class counts:
a model of another split of the same dataset) and recomputes on each

- image AUROC, exactly (scikit-learn's ``roc_auc_score``), and
- pixel AUROC, from per-image histograms of the map values over 8192 bins placed at quantiles of
  all map values: a resample's positive and negative histograms are weighted sums of the images'
  ones, and pixels in one bin count as ties (half). The error of the binning is printed: the same
  computation with every image drawn once, against the exact pixel AUROC of
  :func:`defect_fast.metrics.pixel_auroc`.

Prints and writes, per run, the full-split figures, the 2.5 / 50 / 97.5 % points of the resamples
and the share of resamples at or above the bars (pixel AUROC >= 80, image AUROC >= 90). Every run
sees the same resamples (they depend on the class folders and the seed only), so the difference
from the first run is paired: its 2.5 / 97.5 % points are written too.

    python3 experiments/bootstrap_metrics.py RUN [RUN...] --data ../shared/data/magnetic-tile
        [--resamples 2000] [--seed 0] [--out experiments/results/bootstrap/NAME.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from defect_fast.data import load_test_set  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.metrics import image_auroc, pixel_auroc  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

BINS = 8192
BARS = {"pixel_auroc": 0.80, "image_auroc": 0.90}


def stratified_draws(classes: list[str], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Counts [resamples, N]: how often each image is drawn, resampling within each class."""
    classes_arr = np.asarray(classes)
    counts = np.zeros((resamples, len(classes)), dtype=np.int64)
    for c in sorted(set(classes)):
        members = np.flatnonzero(classes_arr == c)
        picks = rng.integers(0, members.size, size=(resamples, members.size))
        for r in range(resamples):
            np.add.at(counts[r], members[picks[r]], 1)
    return counts


def pixel_histograms(maps: np.ndarray, masks: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Per-image histograms [N, bins] of defect and defect-free pixel values, over shared edges
    at quantiles of all values."""
    edges = np.unique(np.quantile(maps.reshape(-1), np.linspace(0, 1, bins + 1)[1:-1]))
    n = maps.shape[0]
    pos = np.zeros((n, edges.size + 1))
    neg = np.zeros((n, edges.size + 1))
    for i in range(n):
        idx = np.searchsorted(edges, maps[i].reshape(-1), side="right")
        m = masks[i].reshape(-1)
        pos[i] = np.bincount(idx[m], minlength=edges.size + 1)
        neg[i] = np.bincount(idx[~m], minlength=edges.size + 1)
    return pos, neg


def histogram_auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from positive and negative histograms [R, bins] (ties within a bin count half) -> [R]."""
    above = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1] - pos  # positives in higher bins
    wins = (neg * (above + 0.5 * pos)).sum(axis=1)
    return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap(maps: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, classes: list[str],
              resamples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = stratified_draws(classes, resamples, rng)
    pos, neg = pixel_histograms(maps, masks)
    pixel = histogram_auroc(draws @ pos, draws @ neg)
    binned_full = float(histogram_auroc(pos.sum(0, keepdims=True), neg.sum(0, keepdims=True))[0])
    image = np.array([roc_auc_score(np.repeat(labels, d), np.repeat(scores, d)) for d in draws])
    out = {"values": {"pixel_auroc": pixel, "image_auroc": image},
           "full": {"pixel_auroc": pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)),
                    "image_auroc": image_auroc(torch.from_numpy(scores), torch.from_numpy(labels))},
           "pixel_auroc_binned_full": binned_full, "resamples": resamples, "seed": seed, "bins": int(pos.shape[1])}
    for key, values in (("pixel_auroc", pixel), ("image_auroc", image)):
        lo, mid, hi = np.quantile(values, [0.025, 0.5, 0.975])
        out[key] = {"q2.5": float(lo), "median": float(mid), "q97.5": float(hi), "std": float(values.std()),
                    "share_at_or_above_bar": float((values >= BARS[key]).mean()), "bar": BARS[key]}
    return out


def predict(run: Path, data: Path, images_per_batch: int = 8):
    det = Detector.load(run, device="cpu")
    test = load_test_set(data, det.image_size)
    with torch.inference_mode():
        res = det.predict_batched(test.images, images_per_batch)
    return (res["maps"].float().numpy(), test.masks.numpy().astype(bool), res["scores"].float().numpy(),
            test.labels.numpy(), list(test.classes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-style root with test/ and ground_truth/")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args(argv)
    for run in args.runs:
        if not (run / "model.pt").is_file():
            ap.error(f"run: {run} has no model.pt")
    if not (args.data / "test").is_dir():
        ap.error(f"--data: {args.data} has no test/ folder")
    if args.resamples < 10:
        ap.error("--resamples must be >= 10")
    if args.out.exists():
        ap.error(f"--out: {args.out} exists; remove it or pick another name")
    results = {"command": "python3 " + " ".join(sys.argv), "data": str(args.data), "runs": {}}
    first = None
    for run in args.runs:
        res = bootstrap(*predict(run, args.data), resamples=args.resamples, seed=args.seed)
        values = res.pop("values")
        if first is None:
            first = (run.name, values)
        else:
            res["minus_" + first[0]] = {}
            for key in ("pixel_auroc", "image_auroc"):
                d = values[key] - first[1][key]
                lo, hi = np.quantile(d, [0.025, 0.975])
                res["minus_" + first[0]][key] = {"q2.5": float(lo), "q97.5": float(hi), "std": float(d.std())}
        results["runs"][run.name] = res
        print(f"{run.name}: binned pixel AUROC {100 * res['pixel_auroc_binned_full']:.3f} "
              f"(exact {100 * res['full']['pixel_auroc']:.3f})")
        for key in ("pixel_auroc", "image_auroc"):
            r = res[key]
            print(f"  {key}: full split {100 * res['full'][key]:.2f}; resamples 95 % in "
                  f"[{100 * r['q2.5']:.2f}, {100 * r['q97.5']:.2f}], sd {100 * r['std']:.2f}; "
                  f">= {100 * r['bar']:.0f} in {100 * r['share_at_or_above_bar']:.1f} %")
            if "minus_" + first[0] in res:
                d = res["minus_" + first[0]][key]
                print(f"    minus {first[0]} on the same resamples: 95 % in [{100 * d['q2.5']:+.2f}, "
                      f"{100 * d['q97.5']:+.2f}], sd {100 * d['std']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    run_script(main)
