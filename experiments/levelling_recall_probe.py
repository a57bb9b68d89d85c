"""Probe: where the levelling moves the pooled pixel F1-max, class by class and image by image.

    python3 experiments/levelling_recall_probe.py AS_READ LEVELLED [--data DATA] [--out FILE]   (about 2 min)

AS_READ and LEVELLED are two runs of the same weights, fitted without and with
``--level-brightness`` (e.g. the v6 and v7 rows of ``experiments/magnetic_tile_v2.sh``). The
pooled pixel F1-max takes one cut for every pixel of the test split, so it is decided at the top
of the score range, by the classes with the most defect pixels. This writes:

- each run's F1-optimal cut over all test pixels (``calibration.f1_optimal_threshold``): F1,
  precision, recall, and how many normal pixels it flags in good and in defective images;
- a cut on the levelled maps flagging as many normal pixels as the as-read run's F1-optimal cut,
  so that the two runs' recalls compare at one count of false-positive pixels;
- per defect class, at those two cuts: its share of all defect pixels, its images' mean
  brightness (0..255, the images as read; also of their normal and their defect pixels apart),
  its pixel recall in each run, and the Spearman rank
  correlation (ties at their mean rank), over its images with a defect, of the change in each
  image's recall with the image's mean brightness.

The levelling scales an image by the factor that takes its mean brightness to the training
images' mean, so a defect's contrast scales with it: a brightly lit image loses contrast, a dark
one gains. A negative correlation is that effect on the defects' own pixels. Writes one JSON
(default ``experiments/results/levelling-recall/<LEVELLED name>.json``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.calibration import f1_optimal_threshold  # noqa: E402
from defect_fast.data import GOOD, load_test_set  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402


def matched_cut(maps: np.ndarray, normal: np.ndarray, n_flagged: int) -> float:
    """The cut (flag > cut) on ``maps`` that flags ``n_flagged`` of its normal pixels (ties may add some)."""
    neg = np.sort(maps[normal])
    return float(neg[neg.size - n_flagged - 1]) if n_flagged < neg.size else float(np.nextafter(neg[0], -np.inf))


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation with tied values at their mean rank (many images' recall does
    not change); None with fewer than 3 values or a constant one."""
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b)[0])


def compare(as_read: np.ndarray, levelled: np.ndarray, masks: np.ndarray, classes: list[str],
            gray: np.ndarray) -> dict:
    """The figures of the module docstring for maps [N, S, S] of both runs, masks bool [N, S, S],
    N class names and the images' brightness [N, S, S] (mean over channels, 0..255)."""
    cls = np.asarray(classes)
    brightness = gray.reshape(len(cls), -1).mean(1)
    normal, good = ~masks, cls == GOOD
    out: dict = {"n_images": int(len(cls)), "n_defect_pixels": int(masks.sum())}
    cuts = {}
    for name, maps in (("as_read", as_read), ("levelled", levelled)):
        best = f1_optimal_threshold(maps.ravel(), masks.ravel())
        flagged = (maps > best["threshold"]) & normal
        best["normal_pixels_flagged"] = {"good_images": int(flagged[good].sum()), "defective_images": int(flagged[~good].sum())}
        out[f"f1_optimal_{name}"] = best
        cuts[name] = best["threshold"]
    n_fp = int(((as_read > cuts["as_read"]) & normal).sum())
    cuts["levelled_matched"] = matched_cut(levelled, normal, n_fp)
    out["levelled_cut_matched_to_as_read_false_positives"] = {"threshold": cuts["levelled_matched"], "normal_pixels_flagged": n_fp}
    hit_read = (as_read > cuts["as_read"]) & masks
    hit_lev = (levelled > cuts["levelled_matched"]) & masks
    per_class = {}
    for c in sorted(set(classes) - {GOOD}):
        idx = np.flatnonzero((cls == c) & masks.reshape(len(cls), -1).any(1))
        pos = masks[idx].reshape(idx.size, -1).sum(1)
        r_read = hit_read[idx].reshape(idx.size, -1).sum(1)
        r_lev = hit_lev[idx].reshape(idx.size, -1).sum(1)
        change = (r_lev - r_read) / pos
        per_class[c] = {
            "n_images_with_defect": int(idx.size),
            "share_of_defect_pixels": float(pos.sum() / out["n_defect_pixels"]),
            "mean_brightness": float(brightness[cls == c].mean()),
            "normal_pixels_brightness": float(np.mean([gray[i][~masks[i]].mean() for i in idx])),
            "defect_pixels_brightness": float(np.mean([gray[i][masks[i]].mean() for i in idx])),
            "recall_as_read": float(r_read.sum() / pos.sum()),
            "recall_levelled_matched": float(r_lev.sum() / pos.sum()),
            "recall_change_vs_brightness_rank_correlation": _spearman(change, brightness[idx]),
        }
    out["good_mean_brightness"] = float(brightness[good].mean()) if good.any() else None
    out["per_class"] = per_class
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("as_read", type=Path, help="run fitted without --level-brightness")
    p.add_argument("levelled", type=Path, help="the same weights fitted with --level-brightness")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--images-per-batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    maps, test = [], None
    for run in (args.as_read, args.levelled):
        det = Detector.load(run, device="cpu")
        if test is None or test.images.shape[-1] != det.image_size:  # the same weights: read once
            test = load_test_set(args.data, det.image_size)
        maps.append(det.predict_batched(test.images, args.images_per_batch)["maps"].float().numpy())
    gray = test.images.double().mean(dim=1).numpy()
    out = compare(maps[0], maps[1], test.masks.numpy().astype(bool), test.classes, gray)
    out["runs"] = {"as_read": str(args.as_read), "levelled": str(args.levelled)}
    out["data"] = str(args.data)
    out["command"] = "python3 experiments/levelling_recall_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = args.out or ROOT / "experiments" / "results" / "levelling-recall" / f"{args.levelled.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = write_text(path, dump_json_strict(out))
    a, b = out["f1_optimal_as_read"], out["f1_optimal_levelled"]
    print(f"pixel F1-max as read {100 * a['f1']:.2f} (recall {100 * a['recall']:.2f}), "
          f"levelled {100 * b['f1']:.2f} (recall {100 * b['recall']:.2f})")
    print(f"{'class':10s} {'share':>6s} {'bright':>7s} {'normal':>7s} {'defect':>7s} {'recall':>7s} {'matched':>8s} {'rho':>6s}")
    for c, r in out["per_class"].items():
        rho = r["recall_change_vs_brightness_rank_correlation"]
        print(f"{c:10s} {100 * r['share_of_defect_pixels']:5.1f}% {r['mean_brightness']:7.1f} "
              f"{r['normal_pixels_brightness']:7.1f} {r['defect_pixels_brightness']:7.1f} "
              f"{100 * r['recall_as_read']:7.2f} {100 * r['recall_levelled_matched']:8.2f} "
              f"{'' if rho is None else f'{rho:+.2f}':>6s}")
    print(f"good images' mean brightness {out['good_mean_brightness']:.1f}; wrote {path}")
    return 0


if __name__ == "__main__":
    run_script(main)
