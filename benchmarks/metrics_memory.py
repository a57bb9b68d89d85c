"""Memory of the pixel metrics: the peak resident memory ``defect_fast.metrics.evaluate`` adds
over the maps and masks it is given, in bytes per pixel (the rest of evaluate's memory is the
images, 3 bytes a pixel, the masks, 1, and the maps, 4).

A sampling thread reads the process's resident size every millisecond (Linux /proc); the figure
is the rise over the size before the call, divided by the pixels. Random float32 maps with a
defect region on half of them, as ``bench_metrics.py`` makes them.

    python benchmarks/metrics_memory.py [--maps 300] [--size 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from common import RESULTS, command_line, device_info, write_results

from defect_fast.metrics import evaluate


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "metrics_memory_cpu.json"))
    args = ap.parse_args()
    if min(args.maps, args.size) < 2:
        ap.error("--maps and --size must be >= 2")
    g = torch.Generator().manual_seed(0)
    n, s = args.maps, args.size
    maps = torch.rand(n, s, s, generator=g)
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    masks[n // 2:, s // 5:s // 5 + s // 12, s // 5:s // 5 + s // 8] = True
    labels = (torch.arange(n) >= n // 2).long()
    classes = ["good" if y == 0 else "defect" for y in labels.tolist()]
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
    metrics = evaluate(maps, masks, maps.flatten(1).amax(1), labels, classes)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    pixels = maps.numel()
    row = {"maps": n, "size": s, "pixels": pixels, "peak_added_bytes": peak[0] - before,
           "peak_added_bytes_per_pixel": round((peak[0] - before) / pixels, 2), "seconds": round(seconds, 2),
           "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"]}
    print(f"{n} maps of {s}^2 ({pixels / 1e6:.0f} M pixels): evaluate added {(peak[0] - before) / 2**20:.0f} MiB at its "
          f"peak, {row['peak_added_bytes_per_pixel']} bytes a pixel, in {seconds:.1f} s")
    write_results(args.out, {"info": device_info("cpu"), "command": command_line(), "rows": [row]})


if __name__ == "__main__":
    main()
