"""Where the time of one 512x512 CMA-AE inference goes: torch profiler, 1 thread, float32,
NCHW and channels-last patches, unfused model (3 calls each after 2 warm-up calls).

    python benchmarks/profile_inference.py
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import common  # noqa: F401  (puts the repository on sys.path)
from defect_fast.detect import Detector
from defect_fast.models import build_model


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model("cmaae").eval()
    x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    for cl in (False, True):
        det = Detector(m, image_size=512, device="cpu", precision="float32", channels_last=cl, batch_size=64,
                       fuse=False)
        with torch.inference_mode():
            det(x)
            det(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    det(x)
        print(f"channels_last={cl}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
