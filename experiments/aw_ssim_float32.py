"""How far AW-SSIM in float32 is from float64: on exactly flat images against texture, where a
variance is a rounding residue, and on magnetic-tile photographs (the note in
:func:`defect_fast.ops.reference.aw_ssim`).

    python3 experiments/aw_ssim_float32.py [--data ../shared/data/magnetic-tile]
                                           [--out experiments/results/aw-ssim-float32/errors.json]

Each case compares the map and score of the native op (``defect_fast.ops.aw_ssim``: the CPU
kernel where the build has it) and of the float32 reference with the float64 reference, window
11, weights 1, 1, 1 (sum), data range 1:
- flat: x one grey level, y uniform noise, 24x24;
- photos: the first 16 training photographs at 128 px, y each blurred by a 5x5 box, as read and
  brightened to [0.55, 1] (8-bit levels).
Seconds on the CPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from defect_fast import ops
from defect_fast.data import read_image
from defect_fast.data.io import list_images
from defect_fast.ops import reference as R
from results_file import run_script, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def errors(x: torch.Tensor, y: torch.Tensor, sigma: float) -> dict[str, float]:
    s = torch.full((x.shape[0],), sigma)
    e_score, e_map = R.aw_ssim(x.double(), y.double(), s.double(), data_range=1.0, return_map=True)
    out = {}
    for name, fn in (("native", ops.aw_ssim), ("reference32", R.aw_ssim)):
        score, m = fn(x.float(), y.float(), s, data_range=1.0, return_map=True)
        out[f"{name}_map"] = float((m.double() - e_map).abs().max())
        out[f"{name}_score"] = float((score.double() - e_score).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "magnetic-tile")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "aw-ssim-float32" / "errors.json")
    args = ap.parse_args()
    rows = []
    y = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    for grey in (0.3, 0.5, 0.6, 0.7, 200 / 255, 0.8, 0.9, 1.0):
        for sigma in (0.7, 1.5, 3.0):
            rows.append({"case": "flat", "grey": round(grey, 4), "sigma": sigma,
                         **errors(torch.full_like(y, grey), y, sigma)})
    paths = list_images(args.data / "train" / "good")[:16]
    x = torch.stack([read_image(p, 128, channels=1) for p in paths]).float() / 255
    for case, imgs in (("photos", x), ("photos brightened", torch.round((0.55 + 0.45 * x) * 255) / 255)):
        blurred = F.avg_pool2d(F.pad(imgs, (2, 2, 2, 2), mode="replicate"), 5, 1)
        for sigma in (0.7, 1.5, 3.0):
            rows.append({"case": case, "images": len(paths), "sigma": sigma, **errors(imgs, blurred, sigma)})
    for r in rows:
        print({k: (f"{v:.2e}" if isinstance(v, float) and k.endswith(("_map", "_score")) else v) for k, v in r.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = write_text(args.out, json.dumps({"command": "python3 experiments/aw_ssim_float32.py", "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(lambda _argv: main())
