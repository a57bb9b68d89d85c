"""Runs :func:`defect_fast.watch.watch` in a child process for tests/test_watch.py.

    python tests/_watch_worker.py IN_DIR OUT_DIR [--once] [--model ae-l2|stub] [--delay S]

``--model ae-l2`` judges with an untrained ``ae-l2`` network on 64x64 images (the residual map),
``stub`` with the distance of each pixel from mid-grey; only the bookkeeping is under test.
``--delay`` sleeps that long per image inside the predict call, so a kill can land mid-batch.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defect_fast.calibration import ModelInfo  # noqa: E402
from defect_fast.watch import watch  # noqa: E402

SIZE = 64


def make_predict(model_name: str, delay: float):
    if model_name == "ae-l2":
        from defect_fast.models import build_model

        torch.manual_seed(0)
        model = build_model("ae-l2").eval()
        assert model.patch_size == SIZE

    @torch.no_grad()
    def predict(images: torch.Tensor) -> dict:
        x = images.float() / 127.5 - 1.0
        recon = model(x)["recon"] if model_name == "ae-l2" else torch.zeros_like(x)
        maps = (x - recon).pow(2).mean(dim=1)
        time.sleep(delay * images.shape[0])
        return {"maps": maps, "scores": maps.flatten(1).max(dim=1).values, "recon": recon}

    return predict


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    p.add_argument("--once", action="store_true")
    p.add_argument("--model", default="ae-l2", choices=("ae-l2", "stub"))
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--poll", type=float, default=0.1)
    p.add_argument("--settle", type=float, default=0.3)
    a = p.parse_args()
    torch.set_num_threads(1)
    info = ModelInfo(SIZE, name=a.model, version="test-1", image_threshold=0.5, pixel_threshold=0.8)
    watch(make_predict(a.model, a.delay), info, a.in_dir, a.out_dir, once=a.once, batch_size=a.batch_size,
          poll_interval=a.poll, settle=a.settle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
