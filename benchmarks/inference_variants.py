"""Which inference options pay on this machine: eager, feature reuse, channels-last, fused layers.

For CMA-AE and the AW-SSIM AE on random 512x512 images at batch 1 and 8, times the Detector with
``torch.utils.benchmark`` (median of at least 3 s of calls) in four variants and prints ms/image:

- eager: float32, NCHW, 512 patches per call, the MSFR map running the encoder on the input again;
- reuse: float32, NCHW, cache-sized chunks, the MSFR map taking the forward pass's features;
- reuse+cl: the same with channels-last patches;
- reuse+cl+fuse: the same on the fused inference copy (BN folded, single-position convolutions as
  matrix products, channels-last weights): the Detector's defaults.

    python benchmarks/inference_variants.py
"""
from __future__ import annotations

import torch
from torch.utils import benchmark

import common  # noqa: F401  (puts the repository on sys.path)
from defect_fast.detect import Detector
from defect_fast.models import build_model


def main() -> None:
    for name in ("cmaae", "awae"):
        torch.manual_seed(0)
        m = build_model(name).eval()
        chunk = 64 if name == "cmaae" else 16
        variants = {"eager": dict(channels_last=False, batch_size=512, reuse_features=False, fuse=False),
                    "reuse": dict(channels_last=False, batch_size=chunk, fuse=False),
                    "reuse+cl": dict(channels_last=True, batch_size=chunk, fuse=False),
                    "reuse+cl+fuse": dict(channels_last=True, batch_size=chunk, fuse=True)}
        for b in (1, 8):
            x = torch.randint(0, 256, (b, 3, 512, 512), dtype=torch.uint8)
            for k, kw in variants.items():
                det = Detector(m, image_size=512, device="cpu", precision="float32", **kw)
                with torch.inference_mode():
                    det(x)
                    t = benchmark.Timer("det(x)", globals={"det": det, "x": x}).blocked_autorange(min_run_time=3)
                print(f"{name} b{b} {k}: {t.median * 1000 / b:.1f} ms/image", flush=True)


if __name__ == "__main__":
    main()
