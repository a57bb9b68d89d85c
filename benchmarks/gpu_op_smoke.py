"""Small runs of the three fused ops, forward and backward, for compute-sanitizer.

Every native kernel is launched at least once per dtype on odd sizes that hit the tile edges
(aw_ssim: 16x16 tiles plus halo; memory_address: row passes with partial warps; msfr: uneven
scales), and the results are compared with the reference so that a kernel that reads garbage
also fails here, not only under the sanitizer. Exit status 0 when all agree.

The references run, and the comparisons are made, on the CPU in float64, and the backward passes
get their output gradients directly (no loss reduced on the device): under racecheck the device
runs this project's kernels and little else, not PyTorch's own reductions.

    compute-sanitizer --tool memcheck python3 benchmarks/gpu_op_smoke.py --device cuda
    python3 benchmarks/gpu_op_smoke.py --device cpu      # the same checks on the CPU kernels
"""
from __future__ import annotations

import argparse
import os
import sys

# Every tensor its own allocation, before torch is imported: the caching allocator carves small
# tensors out of 2 MiB segments, where a read or write past a tensor's end lands in a neighbour
# and memcheck, which sees only the segment, stays silent.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import common  # noqa: E402,F401 - puts the checkout on sys.path

import torch

from defect_fast.ops import _native, reference


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> bool:
    """Within ``tol`` of the expected tensor's own largest magnitude (a scale floored at 1 passed
    all-zero gradients, whose values are 1e-2, in half precision), and not all zero itself."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    ok = err <= tol * scale and scale > 0
    print(f"  {name:40s} max err {err:.2e} of {scale:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    module, reason = _native.load()
    if module is None:
        print(f"gpu_op_smoke: native extension unavailable: {reason}")
        return 2
    if args.device.startswith("cuda") and not _native.has_cuda():
        print(f"gpu_op_smoke: the extension has no CUDA kernels: {_native.cuda_reason()}")
        return 2
    from defect_fast.ops import _aw_ssim, _memory_address, _msfr

    dev = args.device
    dtypes = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if dev.startswith("cuda") else [])
    ok = True
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        # the inputs' rounding is shared (the references read them as rounded); what is left is the
        # rounding of the computation and of the outputs: about 1e-6 in float32, 7e-4 in float16 and
        # 5e-3 in bfloat16 of a tensor's largest value, a tenth of these tolerances
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        print(f"{dtype}")
        # memory_address: B=5, N=37, C=19 (partial warps), shrinkage on.
        z = torch.randn(5, 19, generator=g).to(dev, dtype).requires_grad_(True)
        m = torch.randn(37, 19, generator=g).to(dev, dtype).requires_grad_(True)
        zh, w = _memory_address.memory_address(z, m, 1 / 37, 1.0, 1)
        gz, gm = torch.autograd.grad([zh, w], [z, m], [torch.ones_like(zh), 2 * w.detach()])  # of sum(zh) + sum(w^2)
        z64, m64 = (t.detach().cpu().double().requires_grad_(True) for t in (z, m))
        rzh, rw = reference.memory_address(z64, m64, 1 / 37, 1.0, 1)
        rgz, rgm = torch.autograd.grad(rzh.sum() + rw.pow(2).sum(), [z64, m64])
        ok &= check("memory_address z_hat", zh, rzh, tol) & check("memory_address grad_z", gz, rgz, tol)
        ok &= check("memory_address grad_memory", gm, rgm, tol)
        # aw_ssim: 2x3x21x37 (two tile columns plus a partial one), window 7, map returned.
        x = torch.rand(2, 3, 21, 37, generator=g).to(dev, dtype).requires_grad_(True)
        y = torch.rand(2, 3, 21, 37, generator=g).to(dev, dtype).requires_grad_(True)
        sigma = torch.tensor([1.0, 2.5], device=dev)
        s, smap = _aw_ssim.aw_ssim(x, y, sigma, 1.0, 1.0, 1.0, 7, "sum", 1.0, True)
        gx, gy = torch.autograd.grad([s, smap], [x, y], [torch.ones_like(s), torch.full_like(smap, 1 / smap.numel())])
        x64, y64 = (t.detach().cpu().double().requires_grad_(True) for t in (x, y))
        rs, rmap = reference.aw_ssim(x64, y64, sigma.cpu().double(), 1.0, 1.0, 1.0, 7, "sum", 1.0, True)
        rgx, rgy = torch.autograd.grad(rs.sum() + rmap.mean(), [x64, y64])
        ok &= check("aw_ssim score", s, rs, tol) & check("aw_ssim map", smap, rmap, tol)
        ok &= check("aw_ssim grad_x", gx, rgx, tol) & check("aw_ssim grad_y", gy, rgy, tol)
        # msfr: three uneven scales to a 29x31 map.
        shapes = [(2, 5, 17, 19), (2, 7, 9, 10), (2, 11, 5, 5)]
        fx = [torch.randn(sh, generator=g).to(dev, dtype) for sh in shapes]
        fr = [torch.randn(sh, generator=g).to(dev, dtype) for sh in shapes]
        with torch.no_grad():
            out = _msfr.msfr(fx, fr, (29, 31), [1.0, 4.0, 9.0])
            ref = reference.msfr([t.cpu().double() for t in fx], [t.cpu().double() for t in fr], (29, 31), [1.0, 4.0, 9.0])
        ok &= check("msfr map", out, ref, tol)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print("gpu_op_smoke:", "all ops agree with the reference" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
