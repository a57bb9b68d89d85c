"""Per-layer time and arithmetic rate of one tuned 512x512 inference, against the whole call.

Wraps every leaf module of the Detector's model copy (CMA-AE by default, the tuned options of
this machine) in a timer, runs ``--calls`` calls of one 512x512 image after ``--warmup`` calls, and
prints per layer the milliseconds per image, a mean over the calls (a layer the map runs a second time, on the
reconstruction, is summed over both), its multiply-adds (``torch.utils.flop_counter``, which
does not see the two products inside the fused memory op, ``mam``) and their rate, next to the
rate of a 2048^3 product in the layers' dtype timed between the whole calls. What the leaf
layers leave of the whole call is the rest of the pipeline: patches, the MSFR op, stitching,
normalisation, score, and the reshapes between layers (the sub-pixel layer's pixel shuffle).
Host timers around synchronous CPU work; on a GPU the device is synchronised around every
layer, so the layers' sum there is an upper bound, not the pipeline's time.

    python benchmarks/profile_layers.py [--model cmaae] [--calls 20] [--warmup 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import RESULTS, _sync, command_line, device_info, write_results

from bench_inference import PAPER_MS_PER_IMAGE, SIZE, square_product
from defect_fast.detect import PRECISIONS, Detector
from defect_fast.models import build_model


def layer_macs(det: Detector, image: torch.Tensor) -> dict[str, float]:
    """Multiply-adds per leaf-module name of the model copy for one call (flop counter / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        det._pipeline(image)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        prefix = f"{type(det.model).__name__}."
        if name.startswith(prefix):
            out[name[len(prefix):]] = sum(ops.values()) / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="cmaae")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/layers_<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    det = Detector(build_model(args.model), image_size=SIZE, device=device)
    image = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, list[float]] = defaultdict(list)
    leaves = {name: m for name, m in det.model.named_modules() if not list(m.children())}

    def timed(name, module):
        forward = module.forward

        def run(*a, **kw):
            _sync(args.device)
            t = time.perf_counter()
            out = forward(*a, **kw)
            _sync(args.device)
            times[name].append((time.perf_counter() - t) * 1e3)
            return out
        return run

    macs = layer_macs(det, image)
    n, gemm = square_product(device, PRECISIONS[det.precision])
    whole, gemm_ms = [], []
    with torch.inference_mode():
        for _ in range(args.warmup):
            det(image)
        for name, m in leaves.items():
            m.forward = timed(name, m)
        for _ in range(args.calls):  # the whole call and its layers in the same calls
            _sync(args.device)
            t = time.perf_counter()
            det(image)
            _sync(args.device)
            whole.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            gemm()
            _sync(args.device)
            gemm_ms.append((time.perf_counter() - t) * 1e3)
        for m in leaves.values():
            del m.forward  # the class's forward again
    peak = n**3 / (statistics.median(gemm_ms) * 1e-3)
    whole_ms = sum(whole) / args.calls  # a mean, as the layers' times are
    rows = []
    for name, ts in times.items():
        per_call = sum(ts) / args.calls  # all of a call's runs of the layer
        if per_call < 0.05:
            continue
        mac = macs.get(name, 0.0)
        rows.append({"layer": name, "kind": type(leaves[name]).__name__, "ms_per_image": round(per_call, 3),
                     "macs": mac, "macs_per_s": round(mac / (per_call * 1e-3)) if mac else None})
    layers_ms = sum(r["ms_per_image"] for r in rows)
    info = device_info(args.device)
    print(f"{info['cpu'] if device.type == 'cpu' else info.get('gpu')} | torch {info['torch']} | "
          f"threads {torch.get_num_threads()} | {args.model}, tuned {det.options()}")
    for r in rows:
        rate = f"{r['macs_per_s'] / 1e9:6.0f} G/s" if r["macs_per_s"] else ""
        print(f"  {r['layer']:24s} {r['kind']:22s} {r['ms_per_image']:8.3f} ms  {r['macs'] / 1e6:8.1f} M  {rate}")
    print(f"  layers {layers_ms:.2f} ms of {whole_ms:.2f} ms per image (the same calls); "
          f"{n}^3 {det.precision} product at {peak / 1e9:.0f} G multiply-adds/s; the paper's {PAPER_MS_PER_IMAGE} ms")
    write_results(args.out or RESULTS / f"layers_{device.type}.json",
                  {"info": info, "command": command_line(), "model": args.model, "options": det.options(),
                   "calls": args.calls, "whole_ms_per_image": round(whole_ms, 3), "layers_ms_per_image": round(layers_ms, 3),
                   "gemm_size": n, "gemm_macs_per_s": round(peak), "paper_ms_per_image": PAPER_MS_PER_IMAGE, "rows": rows})


if __name__ == "__main__":
    main()
