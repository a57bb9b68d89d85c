"""Which inference options pay on this machine: eager, feature reuse, channels-last, fused layers.

For CMA-AE and the AW-SSIM AE on random 512x512 images at batch 1 and 8, times the Detector with
``torch.utils.benchmark`` (median of at least 3 s of calls) at torch's thread count
(``torch.get_num_threads()``, printed and recorded; the Timer's own default is one thread) in four
variants and prints ms/image:

- eager: float32, NCHW, 512 patches per call, the MSFR map running the encoder on the input again;
- reuse: float32, NCHW, cache-sized chunks, the MSFR map taking the forward pass's features;
- reuse+cl: the same with channels-last patches;
- reuse+cl+fuse: the same on the fused inference copy (BN folded, single-position convolutions as
  matrix products, channels-last weights): the Detector's defaults.

The figures go to a results JSON (``benchmarks/results/inference_variants_cpu.json`` by default)
with the machine (``common.device_info``) and the command.

    python benchmarks/inference_variants.py [--models cmaae awae] [--batches 1 8] [--min-run-time 3]
                                            [--out FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils import benchmark

from common import RESULTS, command_line, device_info, write_results
from defect_fast.detect import Detector
from defect_fast.models import build_model

MODELS = ("cmaae", "awae")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per call (default: 1 8)")
    ap.add_argument("--min-run-time", type=float, default=3.0,
                    help="seconds of calls per variant, at least (torch.utils.benchmark's blocked_autorange)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default benchmarks/results/inference_variants_cpu.json)")
    args = ap.parse_args()
    if min(args.batches) < 1:
        ap.error("--batches: every batch must be >= 1")
    if not args.min_run_time > 0:
        ap.error("--min-run-time must be > 0")
    threads = torch.get_num_threads()
    info = device_info("cpu")
    out_path = args.out or RESULTS / "inference_variants_cpu.json"
    results = {"info": info, "command": command_line(), "threads": threads, "image_size": 512,
               "min_run_time_s": args.min_run_time, "precision": "float32", "rows": []}
    print(f"{info['cpu']} | torch {info['torch']} | threads {threads}", flush=True)
    for name in args.models:
        torch.manual_seed(0)
        m = build_model(name).eval()
        chunk = 64 if name == "cmaae" else 16
        variants = {"eager": dict(channels_last=False, batch_size=512, reuse_features=False, fuse=False),
                    "reuse": dict(channels_last=False, batch_size=chunk, fuse=False),
                    "reuse+cl": dict(channels_last=True, batch_size=chunk, fuse=False),
                    "reuse+cl+fuse": dict(channels_last=True, batch_size=chunk, fuse=True)}
        for b in args.batches:
            x = torch.randint(0, 256, (b, 3, 512, 512), dtype=torch.uint8)
            for k, kw in variants.items():
                det = Detector(m, image_size=512, device="cpu", precision="float32", **kw)
                with torch.inference_mode():
                    det(x)
                    # the Timer runs its statement at num_threads (default 1): torch's own count here
                    t = benchmark.Timer("det(x)", globals={"det": det, "x": x},
                                        num_threads=threads).blocked_autorange(min_run_time=args.min_run_time)
                row = {"model": name, "batch": b, "variant": k, "options": kw,
                       "ms_per_image": round(t.median * 1000 / b, 2), "median_ms_per_call": round(t.median * 1000, 2),
                       "calls": len(t.times) * t.number_per_run}
                results["rows"].append(row)
                write_results(out_path, results, quiet=True)  # row by row: a run cut off keeps what it measured
                print(f"{name} b{b} {k}: {row['ms_per_image']:.1f} ms/image ({threads} threads)", flush=True)
    results["info"]["load_average_end"] = device_info("cpu").get("load_average")
    write_results(out_path, results)


if __name__ == "__main__":
    main()
