"""Native msfr against the reference composition, measured in the same run.

CMA-AE sizes: the encoder's scales 1-3 of B = 64 patches of 64 x 64 pixels, features
[64, 32, 32, 32], [64, 32, 32, 32], [64, 64, 16, 16], map 64 x 64, receptive-field-area weights
(the inference batch of anomaly-map computation). Also one whole 256 x 256 image (B = 1) for
the few-large-planes shape. Inference only, so everything runs under torch.no_grad().

    python benchmarks/bench_msfr.py                          # CPU, writes results/msfr_cpu.json
    python benchmarks/bench_msfr.py --device cuda            # writes results/msfr_cuda.json
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import comma_counts, op_rows, time_interleaved

import torch

from defect_fast.ops import _native, reference

# (name, feature shapes, out_size)
CASES = [
    ("patches", [(64, 32, 32, 32), (64, 32, 32, 32), (64, 64, 16, 16)], (64, 64)),
    ("image", [(1, 32, 128, 128), (1, 32, 128, 128), (1, 64, 64, 64)], (256, 256)),
]
# receptive-field areas of the first three encoder layers (k=3: stride 2, 1, 2)
WEIGHTS = reference.receptive_field_areas([(3, 2), (3, 1), (3, 2)])


def make_feats(shapes, dtype, device, seed=0):
    """feats_x, feats_r: one pair of random tensors per shape."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    rs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    return xs, rs


def runner(fn, xs, rs, out_size):
    def run():
        with torch.no_grad():
            fn(xs, rs, out_size, WEIGHTS)

    return run


def cpu_time_interleaved(fns, rounds):
    """Median process CPU time (ms) per call, alternating between the callables.

    At one thread this is the work of a call, much less sensitive than wall time to other
    processes competing for the cores.
    """
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            samples[name].append((time.process_time() - start) * 1e3)
    return {name: round(statistics.median(s), 3) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--threads", default="", help="comma-separated CPU thread counts to run (default: torch's)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/msfr_<device>.json)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    thread_counts = comma_counts(parser, "--threads", args.threads) if args.threads else [torch.get_num_threads()]
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    module, reason = _native.load()
    if module is None:
        raise SystemExit(f"bench_msfr: native extension unavailable: {reason}")
    from defect_fast.ops import _msfr

    dtype = getattr(torch, args.dtype)
    device = args.device
    note = (
        "median of interleaved rounds under torch.no_grad(); speedup = reference median / native median; "
        "cpu_time_ms (1 thread only): median process CPU time per call, less sensitive to other load; "
        "see machine.load_average for how busy the shared cores were"
    )
    cases = op_rows("msfr", device, note, args.out, write=not args.no_write)  # written after every case
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, shapes, out_size in CASES:
            xs, rs = make_feats(shapes, dtype, device)
            torch.testing.assert_close(_msfr.msfr(xs, rs, out_size, WEIGHTS), reference.msfr(xs, rs, out_size, WEIGHTS), rtol=1e-3, atol=1e-3)
            times = time_interleaved(
                {"native": runner(_msfr.msfr, xs, rs, out_size), "reference": runner(reference.msfr, xs, rs, out_size)},
                rounds=args.rounds,
                device=device,
            )
            ratio = times["reference"]["median_ms"] / times["native"]["median_ms"]
            line = (
                f"{name:8s} threads={threads} {args.dtype} {shapes} -> {out_size}: native {times['native']['median_ms']:8.3f} ms  "
                f"reference {times['reference']['median_ms']:8.3f} ms  speedup x{ratio:.2f}"
            )
            entry = {"case": name, "threads": threads, "feature_shapes": shapes, "out_size": list(out_size), "weights": WEIGHTS, "dtype": args.dtype, **times, "speedup": round(ratio, 3)}
            if threads == 1 and device == "cpu":
                cpu = cpu_time_interleaved({"native": runner(_msfr.msfr, xs, rs, out_size), "reference": runner(reference.msfr, xs, rs, out_size)}, args.rounds)
                entry["cpu_time_ms"] = cpu
                entry["cpu_time_speedup"] = round(cpu["reference"] / cpu["native"], 3)
                line += f"  (CPU time: native {cpu['native']:.3f} ms, reference {cpu['reference']:.3f} ms, x{entry['cpu_time_speedup']:.2f})"
            print(line)
            cases.append(entry)
    cases.finish()


if __name__ == "__main__":
    main()
