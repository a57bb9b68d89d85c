"""Where the time of one 512x512 CMA-AE inference goes: torch profiler table of the top ops.

Default: 1 thread, float32, NCHW and channels-last patches, unfused model (3 calls each after 2
warm-up calls). ``--tuned``: the Detector's defaults for this machine instead (bf16 on CPUs with
AVX512-BF16/AMX, channels-last, fused copy), ops grouped by input shape, so the copies and layers
that cost show with their shapes.

    python benchmarks/profile_inference.py [--tuned] [--threads N]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import common  # noqa: F401  (puts the repository on sys.path)
from defect_fast.detect import Detector
from defect_fast.models import build_model


def _profile(det: Detector, x: torch.Tensor, calls: int = 3):
    with torch.inference_mode():
        det(x)
        det(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                det(x)
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", action="store_true", help="the Detector's per-device defaults (one table)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1, or torch's with --tuned)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or (torch.get_num_threads() if args.tuned else 1))
    torch.manual_seed(0)
    m = build_model("cmaae").eval()
    x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    if args.tuned:
        det = Detector(m, image_size=512, device="cpu")
        print(f"tuned options {det.options()}, {torch.get_num_threads()} threads, 5 calls")
        prof = _profile(det, x, calls=5)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=22,
                                                                 max_name_column_width=28, max_shapes_column_width=90))
        return
    for cl in (False, True):
        det = Detector(m, image_size=512, device="cpu", precision="float32", channels_last=cl, batch_size=64,
                       fuse=False)
        prof = _profile(det, x)
        print(f"channels_last={cl}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
