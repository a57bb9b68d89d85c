"""Pixel AUROC over a test set's maps: defect_fast.metrics against scikit-learn, in the same run.

The magnetic-tile test split at the default image size: 294 maps of 512 x 512 (77 M pixels),
random float32 scores with a few defect pixels per map. Both give the exact area (every distinct
score a threshold, ties counted half); the rounds alternate between them.

    python benchmarks/bench_metrics.py [--maps 294] [--size 512] [--rounds 1] [--out FILE]
"""
from __future__ import annotations

import argparse

import torch
from sklearn.metrics import roc_auc_score

from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast.metrics import pixel_auroc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=294)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "metrics_cpu.json"))
    args = ap.parse_args()
    if min(args.maps, args.size, args.rounds) < 1:
        ap.error("--maps, --size and --rounds must be >= 1")
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(args.maps, args.size, args.size, dtype=torch.bool)
    side = max(1, args.size // 16)
    for i, (y, x) in enumerate(torch.randint(0, args.size - side + 1, (args.maps, 2), generator=g).tolist()):
        masks[i, y:y + side, x:x + side] = True
    maps = torch.rand(masks.shape, generator=g) + 0.5 * masks  # defects score higher on average
    flat_maps, flat_masks = maps.reshape(-1).numpy(), masks.reshape(-1).numpy()
    values = {}

    def ours():
        values["defect_fast"] = pixel_auroc(maps, masks)

    def sklearn():
        values["sklearn"] = float(roc_auc_score(flat_masks, flat_maps))

    t = time_interleaved({"defect_fast": ours, "sklearn": sklearn}, rounds=args.rounds, warmup=0)
    row = {"maps": args.maps, "size": args.size, "pixels": maps.numel(),
           "defect_fast_s": round(t["defect_fast"]["median_ms"] / 1e3, 2),
           "sklearn_s": round(t["sklearn"]["median_ms"] / 1e3, 2),
           "speedup": round(t["sklearn"]["median_ms"] / t["defect_fast"]["median_ms"], 2),
           "auroc": values, "abs_difference": abs(values["defect_fast"] - values["sklearn"]), "timings": t}
    print(f"{args.maps} maps of {args.size}^2 ({maps.numel() / 1e6:.0f} M pixels): defect_fast {row['defect_fast_s']} s, "
          f"sklearn roc_auc_score {row['sklearn_s']} s (x{row['speedup']}); AUROC {values['defect_fast']:.6f} vs "
          f"{values['sklearn']:.6f}")
    write_results(args.out, {"info": device_info("cpu"), "command": command_line(), "rows": [row]})


if __name__ == "__main__":
    main()
