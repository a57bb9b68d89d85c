"""Native aw_ssim against the reference composition and pytorch_msssim, measured in the same run.

Training sizes of the AW-SSIM two-stage AE: B patches of 3 x 128 x 128, window 11, one sigma per
patch (a ramp over the batch, as the paper's sigma schedule gives). Cases, forward + backward
(the gradient of the summed score with respect to the reconstruction x):

- "sum" (AW-SSIM, alpha, beta, gamma = 0.5, 0.3, 0.2): native vs reference.aw_ssim;
- "product" at 1, 1, 1 with sigma 1.5 (standard SSIM): native vs pytorch_msssim.ssim.

Rounds alternate between the implementations, so load from other processes hits both alike; the
speedup is the ratio of medians. Process CPU time per call is recorded too (less sensitive to
other processes on a shared machine than wall time).

    python benchmarks/bench_aw_ssim.py                      # B = 64 and 512, writes results/aw_ssim_cpu.json
    python benchmarks/bench_aw_ssim.py --batches 64 --no-write   # a quick run
    python benchmarks/bench_aw_ssim.py --device cuda        # writes results/aw_ssim_cuda.json
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import comma_counts, op_rows

import torch

from defect_fast.ops import _native, reference

C, H, W, WINDOW = 3, 128, 128, 11
AW_WEIGHTS = (0.5, 0.3, 0.2)


def make_inputs(B, dtype, device, seed=0):
    """Reconstruction x (requiring grad), target y in [0, 1] and sigma [B] in [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, C, H, W, generator=g)
    x = (0.7 * y + 0.3 * torch.rand(B, C, H, W, generator=g)).to(device, dtype).requires_grad_(True)
    sigma = torch.linspace(1.0, 3.0, B).to(device, dtype)
    return x, y.to(device, dtype), sigma


def forward_backward(score_fn, x):
    def run():
        score = score_fn()
        (grad,) = torch.autograd.grad(score.sum(), [x])
        return grad

    return run


def time_interleaved(fns, rounds, device, warmup=1):
    """Wall and process CPU time (ms) per call, each callable once per round, alternating."""

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append((time.perf_counter() - w0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {
        name: {
            "median_ms": round(statistics.median(wall[name]), 2),
            "min_ms": round(min(wall[name]), 2),
            "cpu_time_median_ms": round(statistics.median(cpu[name]), 2),
            "rounds": rounds,
        }
        for name in fns
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--batches", default="64,512", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/aw_ssim_<device>.json)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    batches = comma_counts(parser, "--batches", args.batches)
    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--rounds and --threads must be >= 1")

    module, reason = _native.load()
    if module is None:
        raise SystemExit(f"bench_aw_ssim: native extension unavailable: {reason}")
    from defect_fast.ops import _aw_ssim

    try:  # its comparison only: the one with the reference needs nothing else
        import pytorch_msssim
    except ImportError as exc:
        pytorch_msssim = None
        missing = f"pytorch_msssim is not installed ({exc}): the comparison with it is not run"
        print(f"bench_aw_ssim: {missing}")

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device
    note = (
        "median of interleaved rounds; speedup = other median / native median (wall time); "
        "speedup_cpu_time uses the process CPU time per call (all threads), less sensitive to other "
        "load on shared cores; see machine.load_average for how busy they were"
    )
    cases = op_rows("aw_ssim", device, note, args.out, write=not args.no_write)  # written after every case
    if pytorch_msssim is None:
        cases.payload["skipped"] = [missing]
    for B in batches:
        x, y, sigma = make_inputs(B, dtype, device)
        sigma15 = torch.full_like(sigma, 1.5)
        a, b, c = AW_WEIGHTS
        comparisons = [
            (
                "sum (AW-SSIM) vs reference",
                {"alpha": a, "beta": b, "gamma": c, "combine": "sum", "sigma": "linspace(1, 3, B)"},
                forward_backward(lambda: _aw_ssim.aw_ssim(x, y, sigma, a, b, c, WINDOW, "sum"), x),
                "reference",
                forward_backward(lambda: reference.aw_ssim(x, y, sigma, a, b, c, WINDOW, "sum"), x),
            ),
            (
                "product 1,1,1 (SSIM) vs pytorch_msssim",
                {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "combine": "product", "sigma": 1.5},
                forward_backward(lambda: _aw_ssim.aw_ssim(x, y, sigma15, 1.0, 1.0, 1.0, WINDOW, "product"), x),
                "pytorch_msssim",
                forward_backward(
                    lambda: pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win_size=WINDOW, win_sigma=1.5), x
                ),
            ),
        ]
        if pytorch_msssim is None:
            comparisons = comparisons[:1]
        for title, params, native_fn, other_name, other_fn in comparisons:
            times = time_interleaved({"native": native_fn, other_name: other_fn}, rounds=args.rounds, device=device)
            ratio = times[other_name]["median_ms"] / times["native"]["median_ms"]
            cpu_ratio = times[other_name]["cpu_time_median_ms"] / max(times["native"]["cpu_time_median_ms"], 1e-9)
            print(
                f"forward+backward B={B:4d} {C}x{H}x{W} {args.dtype} {title:38s}: native {times['native']['median_ms']:9.1f} ms"
                f"  {other_name} {times[other_name]['median_ms']:9.1f} ms  speedup x{ratio:.2f} (CPU time x{cpu_ratio:.2f})"
            )
            cases.append(
                {
                    "pass": "forward+backward",
                    "case": title,
                    "B": B,
                    "shape": [B, C, H, W],
                    "window": WINDOW,
                    "dtype": args.dtype,
                    **params,
                    **times,
                    "speedup": round(ratio, 3),
                    "speedup_cpu_time": round(cpu_ratio, 3),
                }
            )
        del x, y, sigma
    cases.finish()


if __name__ == "__main__":
    main()
