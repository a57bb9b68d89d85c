"""Variants of the perceptual map's statistics on one trained run, with its weights untouched.

Each probe refits the map's defect-free statistics on the run's training images (as
``--fit-on train``) and scores the dev test split after the run's own smoothing and image score
(``Detector.finish``), as the evaluated runs do:

- ``levels``: how the pyramid's level maps are combined (mean, the default; max; root mean
  square), for pyramids 1 2 and 1 2 4;
- ``whiten``: the per-position standardised residual z further whitened with the channel
  covariance of z pooled over positions and training images (per AlexNet layer, ridge eps x mean
  variance), z^T C^-1 z instead of |z|^2: the channel correlations of normal texture;
- ``centre``: the residual features of each image centred on their own spatial median per
  channel before the per-position statistics: a tile compared with itself (magnetic tile's
  "uneven" defects are a part of one tile ground differently from the rest).

The run's stitched reconstructions of the training and test images are computed once and kept
in ``--cache`` (default RUN/probe_recon.pt). Writes one JSON of rows (pixel AUROC, image AUROC,
AUPRO, per-class pixel AUROC, in points).

    python3 experiments/perceptual_probes.py RUN DATA [--probes levels whiten centre] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.data import load_test_set, load_train_images  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from defect_fast.perceptual import PerceptualMap  # noqa: E402
from defect_fast.runs import MODEL_FILE, load_model_state  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

BATCH = 16


def reconstructions(det: Detector, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([det._stitched_recon(det._to_model_input(c)) for c in images.split(BATCH)])


class CentredMap(PerceptualMap):
    """The perceptual map with each image's residual features centred on their spatial median."""

    def residual(self, x, recon, level=0, **trunk):
        e = super().residual(x, recon, level, **trunk)
        return e - e.flatten(2).median(2).values[:, :, None, None]


def level_maps(det: Detector, pm: PerceptualMap, images: torch.Tensor, recon: torch.Tensor, whiten=None) -> torch.Tensor:
    """[L, N, S, S]: each pyramid level's map (``whiten``: per level, per layer Cholesky factors
    applied to the standardised residual before the map's reduction)."""
    s, out = images.shape[-1], []
    with torch.no_grad():
        for k in range(0, len(images), BATCH):
            x, r, levels = det._to_model_input(images[k:k + BATCH]), recon[k:k + BATCH], []
            for lv in range(len(pm.scales)):
                z = pm.standardised(x, r, lv)
                if whiten is not None:
                    blocks, start = [], 0
                    for li, conv in enumerate(pm.convs):
                        zc = z[:, start:start + conv.out_channels]
                        blocks.append((zc.permute(0, 2, 3, 1) @ whiten[lv][li]).permute(0, 3, 1, 2))
                        start += conv.out_channels
                    z = torch.cat(blocks, 1)
                levels.append(pm.level_map(z, s)[:, 0])
            out.append(torch.stack(levels))
    return torch.cat(out, 1)


def whitening(det: Detector, pm: PerceptualMap, train: torch.Tensor, recon: torch.Tensor, eps: float) -> list[list[torch.Tensor]]:
    """Per level and layer, L with L L^T = (C + eps mean_var I)^-1, C the pooled covariance of z."""
    sums = [[None] * len(pm.convs) for _ in pm.scales]
    counts = [0] * len(pm.scales)
    with torch.no_grad():
        for k in range(0, len(train), BATCH):
            x, r = det._to_model_input(train[k:k + BATCH]), recon[k:k + BATCH]
            for lv in range(len(pm.scales)):
                z = pm.standardised(x, r, lv)
                z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
                start = 0
                for li, conv in enumerate(pm.convs):
                    zc = z[:, start:start + conv.out_channels]
                    sums[lv][li] = zc.T @ zc if sums[lv][li] is None else sums[lv][li] + zc.T @ zc
                    start += conv.out_channels
                counts[lv] += z.shape[0]
    out = []
    for lv in range(len(pm.scales)):
        per = []
        for li in range(len(pm.convs)):
            c = sums[lv][li] / counts[lv]
            c = c + eps * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
            per.append(torch.linalg.cholesky(torch.linalg.inv(c)).float())
        out.append(per)
    return out


def score(det: Detector, maps: torch.Tensor, test) -> dict:
    """Metrics of raw maps [N, S, S] after the run's own smoothing and image score (Detector.finish)."""
    maps, scores = det.finish(maps)
    m = evaluate(maps, test.masks, scores, test.labels, test.classes)
    row = {k: round(100 * m[k], 2) for k in ("pixel_auroc", "image_auroc", "aupro")}
    row["pixel_auroc_per_class"] = {c: round(100 * v["pixel_auroc"], 1) for c, v in m.get("per_class", {}).items()}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--probes", nargs="+", default=["levels", "whiten", "centre"], choices=["levels", "whiten", "centre"])
    ap.add_argument("--cache", type=Path, default=None, help="reconstructions cache (default RUN/probe_recon.pt)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default experiments/results/perceptual-probes/<run>.json)")
    args = ap.parse_args()
    state = load_model_state(args.run / MODEL_FILE)
    det = Detector.load(args.run, device="cpu")
    images, paths = load_train_images(args.data, det.image_size)
    held = {str(Path(p).resolve()) for p in state["held_back"]}
    train = images[[i for i, p in enumerate(paths) if str(Path(p).resolve()) not in held]]
    if len(train) != len(paths) - len(held):
        raise SystemExit(f"{args.data}: the run's held-back images are not all in its train/good folder")
    test = load_test_set(args.data, det.image_size)
    cache = args.cache or args.run / "probe_recon.pt"
    if cache.exists():
        rec = torch.load(cache, weights_only=True)
    else:
        rec = {"train": reconstructions(det, train), "test": reconstructions(det, test.images)}
        torch.save(rec, cache)
    if det.image_map is None:
        raise SystemExit(f"{args.run}: not a perceptual-map run (train with --map perceptual)")
    layers, prior = det.image_map.layers, det.image_map.prior
    rows: dict[str, dict] = {}

    def fitted(cls, scales):
        pm = cls(det.image_size, layers=layers, prior=prior, scales=scales)
        pm.fit((det._to_model_input(train[k:k + BATCH]), rec["train"][k:k + BATCH]) for k in range(0, len(train), BATCH))
        return pm

    def add(name, maps):
        rows[name] = score(det, maps, test)
        print(name, rows[name], flush=True)

    if "levels" in args.probes:
        for scales in ((1, 2), (1, 2, 4)):
            lm = level_maps(det, fitted(PerceptualMap, scales), test.images, rec["test"])
            tag = "".join(map(str, scales))
            add(f"pyramid {tag}, mean of levels (default)", lm.mean(0))
            add(f"pyramid {tag}, max of levels", lm.max(0).values)
            add(f"pyramid {tag}, root mean square of levels", lm.pow(2).mean(0).sqrt())
    if "whiten" in args.probes:
        pm = fitted(PerceptualMap, (1, 2))
        for eps in (0.01, 0.1):
            w = whitening(det, pm, train, rec["train"], eps)
            add(f"pyramid 12, whitened (eps {eps})", level_maps(det, pm, test.images, rec["test"], w).mean(0))
    if "centre" in args.probes:
        add("pyramid 12, each image centred on its median", level_maps(det, fitted(CentredMap, (1, 2)), test.images, rec["test"]).mean(0))
    out = args.out or ROOT / "experiments" / "results" / "perceptual-probes" / f"{args.run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out = write_text(out, json.dumps({"run": str(args.run), "command": "python3 " + " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(lambda _argv: main())
