"""Peak memory of steps whose memory grows with the images: the pixel metrics,
``Detector.predict`` on large frames and a short training run. Each prints the peak resident
memory the call adds.

- ``metrics``: ``defect_fast.metrics.evaluate`` over random float32 maps with a defect region on
  half of them, in bytes per pixel over the maps and masks it is given (the rest of evaluate's
  memory is the images, 3 bytes a pixel, the masks, 1, and the maps, 4).
- ``predict``: ``Detector.predict`` of a list of random uint8 frames (H x W x 3 arrays) with an
  untrained CMA-AE at 128 px, against the size of the maps it returns (float32 at each frame's
  own size).
- ``train``: ``defect-fast train`` (CMA-AE, 5 + 5 steps of 32 patches) on ``--images`` random
  grey-texture PNGs at ``--size``, written to a temporary folder first, against the images' own
  size in memory (uint8, 3 bytes a pixel).

A sampling thread reads the process's resident size every millisecond (Linux /proc); a figure
is the rise over the size before the call.

    python benchmarks/memory.py metrics [--maps 300] [--size 512] [--out FILE]
    python benchmarks/memory.py predict [--frames 8] [--size 2048] [--out FILE]
    python benchmarks/memory.py train [--images 400] [--size 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import threading
import time
import warnings

import numpy as np
import torch

from common import RESULTS, command_line, device_info, write_results


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_added(fn) -> tuple[int, float, object]:
    """(peak resident bytes ``fn()`` added, its seconds, its result)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.001)

    time.sleep(0.05)
    before = resident()
    peak[0] = before
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    time.sleep(0.01)
    done.set()
    sampler.join()
    return peak[0] - before, seconds, result


def metrics_row(n: int, s: int) -> dict:
    from defect_fast.metrics import evaluate

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(n, s, s, generator=g)
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    masks[n // 2:, s // 5:s // 5 + s // 12, s // 5:s // 5 + s // 8] = True
    labels = (torch.arange(n) >= n // 2).long()
    classes = ["good" if y == 0 else "defect" for y in labels.tolist()]
    added, seconds, metrics = peak_added(lambda: evaluate(maps, masks, maps.flatten(1).amax(1), labels, classes))
    pixels = maps.numel()
    print(f"{n} maps of {s}^2 ({pixels / 1e6:.0f} M pixels): evaluate added {added / 2**20:.0f} MiB at its peak, "
          f"{added / pixels:.2f} bytes a pixel, in {seconds:.1f} s")
    return {"case": "metrics", "maps": n, "size": s, "pixels": pixels, "peak_added_bytes": added,
            "peak_added_bytes_per_pixel": round(added / pixels, 2), "seconds": round(seconds, 2),
            "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"]}


def predict_row(n: int, s: int) -> dict:
    from defect_fast.detect import Detector
    from defect_fast.models import build_model

    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20).eval(), image_size=128)
    frames = [np.random.default_rng(i).integers(0, 256, (s, s, 3), dtype=np.uint8) for i in range(n)]
    with warnings.catch_warnings():  # an untrained model: no thresholds to draw regions at
        warnings.simplefilter("ignore")
        det.predict(frames[:1])  # first-call set-up (workspace, native ops) not counted
        added, seconds, res = peak_added(lambda: det.predict(frames))
    returned = res["maps"].numel() * 4
    print(f"{n} frames of {s}^2: predict added {added / 2**20:.0f} MiB at its peak for {returned / 2**20:.0f} MiB of "
          f"maps returned ({added / returned:.2f} x), in {seconds:.1f} s")
    return {"case": "predict", "frames": n, "size": s, "peak_added_bytes": added, "returned_bytes": returned,
            "peak_over_returned": round(added / returned, 2), "seconds": round(seconds, 2)}


def train_row(n: int, s: int) -> dict:
    import tempfile
    from pathlib import Path

    from PIL import Image

    from defect_fast.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "data" / "train" / "good"
        good.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n):  # a smooth random texture (not blank, not constant)
            small = rng.integers(60, 200, (s // 8, s // 8), dtype=np.uint8)
            Image.fromarray(small).resize((s, s), Image.BILINEAR).save(good / f"{i:04d}.png", compress_level=1)
        argv = ["train", str(Path(tmp) / "data"), "--out", str(Path(tmp) / "run"), "--image-size", str(s),
                "--batch-size", "32", "--max-steps", "5", "5", "--quiet"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            added, seconds, status = peak_added(lambda: cli_main(argv))
    if status != 0:
        raise SystemExit(f"train exited {status}")
    held = 3 * s * s * n
    print(f"train on {n} images of {s}^2: added {added / 2**20:.0f} MiB at its peak, {added / held:.2f} x the images "
          f"({held / 2**20:.0f} MiB as uint8), in {seconds:.1f} s")
    return {"case": "train", "images": n, "size": s, "peak_added_bytes": added, "images_bytes": held,
            "peak_over_images": round(added / held, 2), "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=("metrics", "predict", "train"))
    ap.add_argument("--maps", type=int, default=300, help="metrics: maps (default 300)")
    ap.add_argument("--frames", type=int, default=8, help="predict: frames (default 8)")
    ap.add_argument("--images", type=int, default=400, help="train: images (default 400)")
    ap.add_argument("--size", type=int, default=None,
                    help="map side (metrics, default 512), frame side (predict, default 2048) or image side (train, default 512)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/memory_CASE_cpu.json)")
    args = ap.parse_args()
    size = args.size or (2048 if args.case == "predict" else 512)
    if min(args.maps, args.frames, size) < 2:
        ap.error("--maps, --frames and --size must be >= 2")
    if args.case == "train" and (args.images < 20 or size % 64):  # the model's patches tile the image
        ap.error("train: --images must be >= 20 and --size a multiple of 64")
    row = (metrics_row(args.maps, size) if args.case == "metrics" else predict_row(args.frames, size)
           if args.case == "predict" else train_row(args.images, size))
    out = args.out or str(RESULTS / f"memory_{args.case}_cpu.json")
    write_results(out, {"info": device_info("cpu"), "command": command_line(), "rows": [row]})


if __name__ == "__main__":
    main()
