"""Where on the image the placement's pixel AUROC is won or lost (experiments/placement.sh).

For each run given: pixel AUROC over all test pixels, over the 16-px border band and over the
interior; for a run whose map or context places the trunk's cells on their receptive fields'
centres, also with its maps stretched by 256/248 about the image centre (what the resize by size
alone does to conv2's grid at 256 px) and compressed by the inverse, and with its context's cells
put back by the resize ("cells"), its perceptual map unchanged. Writes one JSON.

    python3 experiments/placement_probe.py RUN [RUN ...] [--data DIR] --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_fast.context import grid_side  # noqa: E402
from defect_fast.data import load_test_set  # noqa: E402
from defect_fast.detect import Detector  # noqa: E402
from defect_fast.metrics import evaluate  # noqa: E402
from results_file import run_script, write_text  # noqa: E402

BORDER = 16


def scaled_about_centre(maps: torch.Tensor, factor: float) -> torch.Tensor:
    """maps [N, S, S] -> out(p) = maps(c + (p - c) * factor), bilinear, the edge held (factor < 1 stretches)."""
    s = maps.shape[-1]
    k = torch.arange(s, dtype=torch.float64)
    u = (2 * ((k - (s - 1) / 2) * factor + (s - 1) / 2) / (s - 1) - 1).float()
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def pixel_aurocs(maps: torch.Tensor, test) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    s = maps.shape[-1]
    border = torch.zeros(s, s, dtype=torch.bool)
    border[:BORDER] = border[-BORDER:] = True
    border[:, :BORDER] = border[:, -BORDER:] = True
    m, g = maps.numpy(), test.masks.numpy().astype(bool)
    out = {}
    for name, sel in (("border", border), ("interior", ~border)):
        keep = sel.numpy()
        out[f"pixel_auroc_{name}"] = round(100 * roc_auc_score(g[:, keep].ravel(), m[:, keep].ravel()), 2)
        out[f"defect_pixel_share_{name}"] = round(float(g[:, keep].sum() / g.sum()), 3)
    return out


def summary(maps: torch.Tensor, scores: torch.Tensor, test) -> dict[str, float]:
    r = evaluate(maps, test.masks, scores, test.labels, test.classes)
    return {"pixel_auroc": round(100 * r["pixel_auroc"], 2), "aupro": round(100 * r["aupro"], 2),
            "uneven_pixel_auroc": round(100 * r["per_class"]["uneven"]["pixel_auroc"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out, test = {"command": "python3 " + " ".join(sys.argv), "border_px": BORDER}, None
    for run in args.runs:
        det = Detector.load(run, device="cpu")
        if test is None:
            test = load_test_set(args.data, det.image_size, require_masks=False)
        with torch.inference_mode():
            res = det.predict_batched(test.images)
            r = {"placement": {"perceptual": getattr(det.image_map, "placement", None),
                               "context": getattr(det.context, "placement", None)},
                 **summary(res["maps"], res["scores"], test), **pixel_aurocs(res["maps"], test)}
            if "centres" in r["placement"].values():
                size = det.image_size
                conv2 = 8 * grid_side(size, 1)  # conv2's cells x their 8-px step (248 at 256 px)
                for name, factor in (("stretched", conv2 / size), ("compressed", size / conv2)):
                    r[name] = summary(scaled_about_centre(res["maps"], factor), res["scores"], test)
                if det.context is not None and det.context.placement == "centres":
                    det.context.placement = "cells"
                    res = det.predict_batched(test.images)
                    r["context_cells"] = summary(res["maps"], res["scores"], test)
        out[run] = r
        print(run, json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    run_script(lambda _argv: main())
