"""Probe (negative result): how far a run's map spreads a defect, and whether sharpening it pays.

    python3 experiments/map_sharpening_probe.py RUN [DATA] [--out FILE]   (about 4 min on 2 cores)

``experiments/pixel_auroc_breakdown.py`` found the normal pixels around strong defects scored far
above a typical "uneven" defect pixel (blowhole neighbours within 16 px at 13-23 spreads), worth
up to about two points of pooled pixel AUROC. This probe measures where that bleed comes from and
what removing it costs:

1. **The map's point spread**, on defect-free *training* images (not the test split): dark discs
   of radius 4, 8, 16 and 32 px (intensity times 0.5 or 0.8) pasted at random places, the run's
   map of the altered image minus its map of the clean one, averaged over rings around the disc
   centre. The half width is the radius where that difference falls to half its mean inside the
   disc; for the smallest, faintest disc it approximates the spread of a point.
2. **Erosion of the final map** (a k x k minimum filter: a pixel keeps the lowest value of the
   windows around it; if a position's value came from anything in its neighbourhood, a pixel
   is abnormal only if every neighbourhood around it is), at the window the spread gives
   (2 x half width + 1) and at a few others, every metric of ``evaluate`` with the image scores
   left as the run computes them (from the map before erosion).
3. The same erosion on one part of the map only: the context map, or the perceptual map, before
   they are added and smoothed.

Writes ``experiments/results/map-sharpening/<run name>.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.safety import dump_json_strict  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

RADII = (4, 8, 16, 32)
FACTORS = (0.5, 0.8)
RING = 2.0  # ring width (px) of the radial profile
METRICS = ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")


def radial_profile(diff: torch.Tensor, centres: torch.Tensor, step: float = RING, r_max: float = 80.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Maps [N,S,S] and one centre (y, x) per map -> (ring centres, mean of the maps over each
    ring); rings without a pixel are left out."""
    s = diff.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    r = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    edges = np.arange(0.0, r_max + step, step)
    rings = [(lo + step / 2, diff[(r >= lo) & (r < lo + step)]) for lo in edges[:-1]]
    rings = [(c, float(v.mean())) for c, v in rings if v.numel()]
    return np.asarray([c for c, _v in rings]), np.asarray([v for _c, v in rings])


def half_radius(radii: np.ndarray, profile: np.ndarray, level: float, beyond: float = 0.0) -> float | None:
    """The radius past ``beyond`` where ``profile`` first falls below ``level`` (linear between
    rings; None if it never does)."""
    for i in range(1, len(radii)):
        if radii[i] > beyond and profile[i] < level <= profile[i - 1]:
            t = (profile[i - 1] - level) / (profile[i - 1] - profile[i])
            return float(radii[i - 1] + t * (radii[i] - radii[i - 1]))
    return None


def erode(maps: torch.Tensor, k: int) -> torch.Tensor:
    """k x k minimum filter of maps [N,S,S] (k odd; 1: unchanged), edges padded with the map's own values."""
    if k <= 1:
        return maps
    if k % 2 == 0:
        raise ValueError(f"k must be odd, got {k}")
    padded = F.pad(maps.unsqueeze(1), (k // 2,) * 4, mode="replicate")
    return -F.max_pool2d(-padded, k, 1)[:, 0]


def run_maps(det: Detector, images: torch.Tensor, per_batch: int = 8) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([det(images[i:i + per_batch])[0] for i in range(0, len(images), per_batch)])


def spread(det: Detector, images: torch.Tensor, seed: int = 0) -> list[dict]:
    """Step 1 of the module docstring on defect-free uint8 images [N,3,S,S]."""
    s = det.image_size
    g = torch.Generator().manual_seed(seed)
    clean = run_maps(det, images)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    rows = []
    for r0 in RADII:
        for factor in FACTORS:
            margin = r0 + 16
            centres = torch.randint(margin, s - margin, (len(images), 2), generator=g).float()
            disc = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) <= r0 * r0
            altered = torch.where(disc[:, None], images.float() * factor, images.float()).round().to(torch.uint8)
            diff = run_maps(det, altered) - clean
            radii, prof = radial_profile(diff, centres)
            inside = float(diff[disc].mean())
            hr = half_radius(radii, prof, inside / 2, beyond=r0 / 2)
            rows.append({"radius": r0, "factor": factor, "mean_inside": inside,
                         "half_radius": hr, "beyond_edge": None if hr is None else hr - r0,
                         "profile": {f"{r:.0f}": float(v) for r, v in zip(radii[::2], prof[::2])}})
            print(f"disc r={r0:2d} x{factor}: mean inside {inside:8.2f} spreads, half of it at "
                  f"{'-' if hr is None else f'{hr:.1f}'} px", flush=True)
    return rows


def parts(det: Detector, images: torch.Tensor, per_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(perceptual part, context part) of the run's maps, in the units they are added in, before smoothing."""
    base, ctx_maps = [], []
    with torch.inference_mode():
        for i in range(0, len(images), per_batch):
            x = det._to_model_input(images[i:i + per_batch])
            raw, feats = det._maps_and_context(x, det.context)
            z = (raw - det.norm_mean) / det.norm_std
            base.append((z - det.context.base_mean) / det.context.base_std)
            ctx_maps.append(det.context.map(feats, det.image_size))
    return torch.cat(base), torch.cat(ctx_maps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (or model.pt) with an image context")
    p.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--spots", type=int, default=24, help="training images the discs are pasted on (default 24)")
    p.add_argument("--windows", type=int, nargs="+", default=[9, 17, 33, 49], help="erosion windows besides the measured one")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    det = Detector.load(args.run, device="cpu")
    if det.context is None:
        p.error(f"{args.run}: this probe needs a run with an image context (--context)")
    train, _paths = load_train_images(args.data, det.image_size)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.spots]
    rows = spread(det, train[pick])
    point = next(r for r in rows if r["radius"] == min(RADII) and r["factor"] == max(FACTORS))
    if point["half_radius"] is None:
        raise SystemExit("the map's response to the smallest disc never fell to half: no spread to measure")
    k_psf = 2 * int(round(point["half_radius"])) + 1

    test = load_test_set(args.data, det.image_size)
    labels = test.labels
    with torch.inference_mode():
        res = det.predict_batched(test.images)
    maps, scores = res["maps"].float(), res["scores"]
    base, ctx_map = parts(det, test.images)

    def metrics(m: torch.Tensor) -> dict:
        r = evaluate(m, test.masks, scores, labels, test.classes)
        out = {k: float(r[k]) for k in METRICS}
        out["per_class"] = {str(c): {k: float(v[k]) for k in ("pixel_auroc", "aupro")}
                            for c, v in r["per_class"].items() if c != "good"}
        return out

    blur = (lambda m: det.blur @ m @ det.blur.T) if det.smooth_sigma > 0 else (lambda m: m)
    erosion = {}
    for k in sorted({1, k_psf, *args.windows}):
        erosion[str(k)] = metrics(erode(maps, k))
        e = erosion[str(k)]
        print(f"erode {k:3d}: pixel AUROC {100 * e['pixel_auroc']:.2f}  AUPRO {100 * e['aupro']:.2f}  "
              f"F1-max {100 * e['pixel_f1_max']:.2f}", flush=True)
    one_part = {"context": metrics(blur(base + erode(ctx_map, k_psf))),
                "perceptual": metrics(blur(erode(base, k_psf) + ctx_map))}
    for name, e in one_part.items():
        print(f"erode {k_psf} the {name} part only: pixel AUROC {100 * e['pixel_auroc']:.2f}  "
              f"AUPRO {100 * e['aupro']:.2f}", flush=True)
    out = {"run": str(args.run), "data": str(args.data), "spread": rows, "point_half_radius": point["half_radius"],
           "window_from_spread": k_psf, "erode_final_map": erosion, f"erode_one_part_{k_psf}": one_part,
           "seconds": time.perf_counter() - t0,
           "command": "python3 experiments/map_sharpening_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    name = args.run.name if args.run.is_dir() else args.run.parent.name
    path = args.out or ROOT / "experiments" / "results" / "map-sharpening" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = write_text(path, dump_json_strict(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_script(main)
