"""End-to-end inspection of 512x512 images with CMA-AE: patching, reconstruction, MSFR, stitching.

Times Detector.predict with the native ops against the same pipeline on the reference ops, in
alternating rounds of one run, and prints the ratio. The paper reports 41.673 ms per 512x512
image (an A100 GPU); that figure is quoted only beside a GPU measurement.

    python benchmarks/bench_inference.py [--device cpu|cuda] [--batch 1 8] [--rounds 10]
"""
from __future__ import annotations

import argparse
import os

import torch

from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast import ops
from defect_fast.detect import Detector
from defect_fast.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="cmaae")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model)
    det = Detector(model, image_size=512, device=args.device)
    native = ops.backend(args.device)
    results = {"info": device_info(args.device), "command": command_line(), "model": args.model,
               "map": det.map_kind, "native_backend": native, "rows": []}
    for b in args.batch:
        images = torch.randint(0, 256, (b, 3, 512, 512), dtype=torch.uint8)

        def run_native():
            os.environ.pop("DEFECT_FAST_BACKEND", None)
            det.predict(images)

        def run_reference():
            os.environ["DEFECT_FAST_BACKEND"] = "reference"
            det.predict(images)

        t = time_interleaved({"native": run_native, "reference": run_reference}, rounds=args.rounds, device=args.device)
        os.environ.pop("DEFECT_FAST_BACKEND", None)
        row = {"images": b, "native_ms_per_image": t["native"]["median_ms"] / b,
               "reference_ms_per_image": t["reference"]["median_ms"] / b,
               "speedup": t["reference"]["median_ms"] / t["native"]["median_ms"], "timings": t}
        results["rows"].append(row)
        print(f"{args.model} {b} image(s) 512x512 on {args.device} [{native}]: "
              f"{row['native_ms_per_image']:.1f} ms/image native, {row['reference_ms_per_image']:.1f} ms/image reference, "
              f"x{row['speedup']:.2f}")
    write_results(RESULTS / f"inference_{args.model}_{args.device.split(':')[0]}.json", results)


if __name__ == "__main__":
    main()
