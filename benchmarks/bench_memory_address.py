"""Native memory_address against the reference composition, measured in the same run.

CMA-AE sizes: C = 512 channels, N = 2000 memory items, shrink threshold 1/N, L1 renormalisation;
B = 512 queries (a training batch) for forward + backward, B = 64 (the latent grid of one
512 x 512 image) for inference. The backward pass gets gradients for both outputs (z_hat and
the weights, as with the entropy loss).

    python benchmarks/bench_memory_address.py --threads 1 2   # CPU, writes results/memory_address_cpu.json
    python benchmarks/bench_memory_address.py --device cuda   # writes results/memory_address_cuda.json

Both implementations perform the same matrix products (2 in the forward pass, 4 more in the
backward pass); "gemms_only" times those alone, which bounds the speedup any fusion of the rest
can give. NB: on a CPU shared with other busy processes, multi-threaded timings mostly measure
the waits at each parallel region's barrier (many more regions in the reference); the
single-thread rows are the ones to compare.
"""
from __future__ import annotations

import argparse

from common import op_rows, time_interleaved

import torch

from defect_fast.ops import _native, reference

C, N = 512, 2000
TRAIN_B, IMAGE_B = 512, 64


def make_inputs(B, dtype, device, seed=0):
    """z [B, C], memory [N, C] (requiring grad) and upstream gradients of both outputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g).to(device, dtype).requires_grad_(True)
    memory = torch.randn(N, C, generator=g).to(device, dtype).requires_grad_(True)
    grad_z_hat = torch.randn(B, C, generator=g).to(device, dtype)
    grad_weights = torch.randn(B, N, generator=g).to(device, dtype) * 1e-3
    return z, memory, grad_z_hat, grad_weights


def forward_backward(fn, z, memory, grad_z_hat, grad_weights):
    def run():
        z_hat, weights = fn(z, memory, 1.0 / N, 1.0, 1)
        torch.autograd.grad([z_hat, weights], [z, memory], [grad_z_hat, grad_weights])

    return run


def forward(fn, z, memory):
    def run():
        with torch.no_grad():
            fn(z, memory, 1.0 / N, 1.0, 1)

    return run


def gemms_only(z, memory, grad_z_hat, grad_weights, passes):
    """The matrix products both implementations perform (2 forward, 4 more backward): a floor."""
    z, memory = z.detach(), memory.detach()

    def run():
        with torch.no_grad():
            w = z @ memory.t()
            w @ memory
            if passes == 6:
                grad_z_hat @ memory.t()
                grad_weights @ memory
                grad_weights.t() @ z
                grad_weights.t() @ grad_z_hat

    return run


def run_cases(native, dtype, device, dtype_name, rounds, threads, cases):
    """Times the three cases with the current thread count; appends their records to ``cases``."""
    for name, B, make, passes in [
        ("forward+backward", TRAIN_B, lambda fn, x: forward_backward(fn, *x), 6),
        ("forward", IMAGE_B, lambda fn, x: forward(fn, x[0], x[1]), 2),
        ("forward", TRAIN_B, lambda fn, x: forward(fn, x[0], x[1]), 2),
    ]:
        inputs = make_inputs(B, dtype, device)
        fns = {"native": make(native, inputs), "reference": make(reference.memory_address, inputs), "gemms_only": gemms_only(*inputs, passes)}
        times = time_interleaved(fns, rounds=rounds, device=device)
        ratio = times["reference"]["median_ms"] / times["native"]["median_ms"]
        bound = times["reference"]["median_ms"] / times["gemms_only"]["median_ms"]
        print(
            f"{threads} thread(s) {name:17s} B={B:4d} N={N} C={C} {dtype_name}: native {times['native']['median_ms']:8.2f} ms  "
            f"reference {times['reference']['median_ms']:8.2f} ms  speedup x{ratio:.2f}  "
            f"({passes} GEMMs alone {times['gemms_only']['median_ms']:.2f} ms: at most x{bound:.2f})"
        )
        cases.append({"pass": name, "B": B, "N": N, "C": C, "dtype": dtype_name, "shrink_threshold": "1/N", "temperature": 1.0, "p": 1, **times, "threads": threads, "speedup": round(ratio, 3), "speedup_bound_by_gemms": round(bound, 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="torch thread counts to run with, e.g. 1 2 (default: torch's)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/memory_address_<device>.json)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or (args.threads and min(args.threads) < 1):
        parser.error("--rounds and --threads must be >= 1")

    module, reason = _native.load()
    if module is None:
        raise SystemExit(f"bench_memory_address: native extension unavailable: {reason}")
    from defect_fast.ops import _memory_address

    native = _memory_address.memory_address
    dtype = getattr(torch, args.dtype)
    device = args.device
    note = (
        "median of interleaved rounds; speedup = reference median / native median; gemms_only times the "
        "matrix products that both implementations perform (2 forward, 6 forward+backward), so "
        "speedup_bound_by_gemms = reference / gemms_only bounds what fusing the rest can give"
    )
    cases = op_rows("memory_address", device, note, args.out, write=not args.no_write)  # written after every case
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        run_cases(native, dtype, device, args.dtype, args.rounds, threads, cases)
    cases.finish()


if __name__ == "__main__":
    main()
