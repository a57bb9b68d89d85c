"""The layers that ``defect_fast.fuse`` rewrites, each against its original, on one 512x512 image's patches.

Runs the model once on 64 random patches (CMA-AE, one 512x512 image; channels-last input and
weights, as the Detector's tuned path feeds them), records the input of every convolution that
:func:`defect_fast.fuse.fuse_for_inference` replaces (a matrix product, or the plain convolution
a stride-1 transposed convolution equals), and times original and replacement on that input in
alternating rounds. Every stride-2 4x4 transposed convolution is also timed against its sub-pixel
form (:class:`defect_fast.fuse.SubPixelConvTranspose2d`: a 2x2 convolution, a pixel shuffle and a crop),
which the inference copy uses only with at most 4 output channels, where this benchmark found it
faster. The model's own matrix-product layers (:mod:`defect_fast.layers`, what the fuse turns plain
single-position layers into) are timed against the plain convolution modules they stand for.
Batch norm folding is not part of these figures. ``--precision bfloat16``: weights and
inputs in bf16, as the Detector runs on CPUs with AVX512-BF16/AMX.

    python benchmarks/bench_fuse_layers.py [--model cmaae] [--threads 1] [--rounds 20]
        [--precision float32|bfloat16] [--out FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast.fuse import SubPixelConvTranspose2d, _dense, subpixel_candidate
from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d, rebuilt_as
from defect_fast.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cmaae")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/fuse_layers_cpu.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval().to(memory_format=torch.channels_last)
    patches_per_image = (512 // model.patch_size) ** 2
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].detach())  # returns None: the output stays as it is
        return hook

    hooks = [m.register_forward_hook(keep_input(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    x = torch.rand(patches_per_image, 3, model.patch_size, model.patch_size).mul(2).sub(1)
    with torch.inference_mode():
        model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    info = device_info("cpu")
    dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    results = {"info": info, "command": command_line(), "model": args.model, "patches": patches_per_image,
               "threads": args.threads, "precision": args.precision, "rows": []}
    print(f"{info['cpu']} | torch {info['torch']} | threads {args.threads} | {args.model}, {patches_per_image} patches")
    modules = dict(model.named_modules())
    with torch.no_grad():
        cases = []
        for name, inp in inputs.items():
            original = modules[name]
            if isinstance(original, (KernelSizedConv2d, PointConvTranspose2d)):
                # already the product: time it against the plain module of the same parameters
                plain = rebuilt_as(nn.Conv2d if isinstance(original, KernelSizedConv2d) else nn.ConvTranspose2d, original)
                original = plain.to(memory_format=torch.channels_last)
            replacement = _dense(original)
            if replacement is not original:
                cases.append((name, original, replacement, inp))
            if subpixel_candidate(original) and not isinstance(replacement, SubPixelConvTranspose2d):
                cases.append((name, original, SubPixelConvTranspose2d(original), inp))
        for name, original, replacement, inp in cases:
            original = original.to(dtype)
            replacement = replacement.to(dtype).to(memory_format=torch.channels_last)
            inp = inp.to(dtype)
            with torch.inference_mode():
                diff = float((replacement(inp) - original(inp)).abs().max())
                t = time_interleaved({"original": lambda: original(inp), "fused": lambda: replacement(inp)},
                                     rounds=args.rounds, warmup=2, device="cpu")
            o_ms, f_ms = t["original"]["median_ms"], t["fused"]["median_ms"]
            row = {"layer": name, "original": type(original).__name__, "replacement": type(replacement).__name__,
                   "input_shape": list(inp.shape), "original_ms": round(o_ms, 3), "fused_ms": round(f_ms, 3),
                   "speedup": round(o_ms / f_ms, 3), "max_abs_difference": diff}
            results["rows"].append(row)
            print(f"  {name:14s} {row['original']:16s} -> {row['replacement']:20s} input {tuple(inp.shape)}: "
                  f"{o_ms:8.2f} -> {f_ms:8.2f} ms (x{row['speedup']:.2f}), max |diff| {diff:.1e}")
    write_results(args.out or RESULTS / "fuse_layers_cpu.json", results)


if __name__ == "__main__":
    main()
