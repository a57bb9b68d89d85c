"""Exact rewrites of the tuned CPU paths, each timed against the code it replaced in one process.

The replaced code is rebuilt here (monkeypatched onto a second copy of the same objects), and old
and new run in alternating rounds (``common.time_interleaved``); the figure of each case is the
median over ``--repeats`` repetitions of the new/old time ratio, with its quartiles. Weights and
images are random (the cost does not depend on them; the trunk is the ImageNet AlexNet when
``$DEFECT_FAST_ALEXNET_WEIGHTS`` names it). Cases:

- ``stats``: the recommended inference (CMA-AE, perceptual map + context, 256 px, stride 32, Hann,
  batch 8) with the perceptual map's statistics in the default layout against them kept in the
  channels-last residual's layout (``PerceptualMap._stats_like``);
- ``stitch``: the same inference with ``F.fold`` stitching against ``data.patches.overlap_add``;
- ``trunk_weights``: the same with the trunk's kept weight copies in the default layout against
  channels-last copies;
- ``last_layer``: one 512x512 CMA-AE image (Table I pipeline, tuned) with the decoder's last layer
  in the 3x3 sub-pixel form against the 2x2 form;
- ``matrix_layers``: one 512x512 CMA-AE image (tuned) with the inference copy's own matrix-product
  modules for the 4x4 -> 1x1 and 1x1 -> 4x4 layers (a matrix laid out once, in (C, kh, kw) order)
  against the model's ``KernelSizedConv2d`` / ``PointConvTranspose2d``, which the copy now keeps;
- ``train``: CMA-AE training steps (batch 64, tuned as ``bench_train`` has it, which is what the
  trainer runs: bf16 and channels-last where the CPU has bf16, else float32 in NCHW; only the
  stage's trainable parameters require gradients) with plain convolutions for the 4x4 -> 1x1 and
  1x1 -> 4x4 layers and the default Adam against ``KernelSizedConv2d`` / ``PointConvTranspose2d``
  and the fused Adam, per stage;
- ``train_layout``: the same tuned training steps with those two layers' weights channels-last,
  like every other layer, against them in the default layout
  (``layers.keep_matrix_weights_contiguous``), per stage; skipped on a CPU without bf16, where
  the trainer keeps the whole model in NCHW.

Outputs are checked equal before timing: maps bit for bit for the inference cases, to 1e-3 where
a layer sums in another order (``last_layer``, ``matrix_layers``).

    python benchmarks/bench_replaced.py [--cases ...] [--repeats 8] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import RESULTS, command_line, device_info, time_interleaved, write_results

import defect_fast.detect as detect_module
from defect_fast.detect import Detector
from defect_fast.models import build_model
from defect_fast.train import train_dtype

CASES = ("stats", "stitch", "trunk_weights", "last_layer", "matrix_layers", "train", "train_layout")


def fold_overlap_add(patches, grid, patch, stride):
    """The stitching before ``overlap_add``: ``F.fold`` on the column layout."""
    gh, gw = grid
    n, c = patches.shape[0] // (gh * gw), patches.shape[1]
    cols = patches.reshape(n, gh * gw, c * patch * patch).transpose(1, 2)
    return F.fold(cols, output_size=((gh - 1) * stride + patch, (gw - 1) * stride + patch), kernel_size=patch,
                  stride=stride)


def plain_trunk_conv(self, i, h):
    """The trunk convolution before: weight copies cast to ``h``'s dtype only, in the default layout."""
    conv = self.convs[i]
    w, b = conv.weight, conv.bias
    if h.dtype != w.dtype:
        w, b = self._kept("_cast_weights_before", (i, h.dtype), (w, b), lambda: (w.to(h.dtype), b.to(h.dtype)))
    return F.relu(F.conv2d(h, w, b, conv.stride, conv.padding))


class SubPixel3x3(nn.Module):
    """The last layer's sub-pixel form before: a 3x3 convolution to 4 x C_out channels, pixel shuffle."""

    TAPS = {(0, 0): 3, (0, 1): 1, (1, 1): 2, (1, 2): 0}

    def __init__(self, m: nn.ConvTranspose2d):
        super().__init__()
        w = m.weight.detach()
        cin, cout = w.shape[:2]
        wc = w.new_zeros(cout, 2, 2, cin, 3, 3)
        for (a, r), kh in self.TAPS.items():
            for (b, c), kw in self.TAPS.items():
                wc[:, a, b, :, r, c] = w[:, :, kh, kw].t()
        self.conv = nn.Conv2d(cin, 4 * cout, 3, 1, 1, bias=m.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(wc.reshape(4 * cout, cin, 3, 3))
            if m.bias is not None:
                self.conv.bias.copy_(m.bias.detach().repeat_interleave(4))

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class DenseConv2d(nn.Module):
    """The inference copy's product for a kernel-sized input before: its own matrix, laid out once."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("matrix", conv.weight.detach().flatten(1).contiguous(), persistent=False)

    def forward(self, x):
        if tuple(x.shape[-2:]) != tuple(self.conv.kernel_size):
            return self.conv(x)
        return F.linear(x.flatten(1), self.matrix, self.conv.bias)[:, :, None, None]


class DenseConvTranspose2d(nn.Module):
    """The inference copy's product for a 1x1 input before (output in the default layout)."""

    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        self.conv = conv
        w = conv.weight.detach()
        self.register_buffer("matrix", w.reshape(w.shape[0], -1).contiguous(), persistent=False)

    def forward(self, x):
        if x.shape[-2:] != (1, 1):
            return self.conv(x)
        _cin, cout, kh, kw = self.conv.weight.shape
        out = torch.matmul(x.flatten(1), self.matrix).view(x.shape[0], cout, kh, kw)
        return out if self.conv.bias is None else out + self.conv.bias.view(1, -1, 1, 1)


def _plain(m: nn.Module) -> nn.Module:
    """The plain convolution module of a matrix-product layer's parameters."""
    from defect_fast.layers import KernelSizedConv2d, rebuilt_as

    return rebuilt_as(nn.Conv2d if isinstance(m, KernelSizedConv2d) else nn.ConvTranspose2d, m)


def recommended_pair(case: str) -> tuple[Detector, Detector, torch.Tensor]:
    """(old, new) Detectors of the recommended inference, and a batch of 8 images."""
    import bench_context

    from defect_fast.context import ImageContext
    from defect_fast.perceptual import PerceptualMap

    size, trunk = bench_context.SIZE, bench_context._trunk()
    g = torch.Generator().manual_seed(1)
    model = build_model("cmaae")
    ctx = ImageContext(size, trunk=trunk)
    fit_set = torch.rand(40, 3, size, size, generator=g) * 2 - 1
    ctx.fit(lambda: fit_set.split(20))
    pm = PerceptualMap(size, trunk=trunk, scales=(1, 2))
    plain = Detector(model, size, stride=32, blend="hann", smooth_sigma=4.0)
    with torch.no_grad():
        x = plain._to_model_input(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g))
        pm.fit([(x, plain._stitched_recon(x))])
    kw = dict(stride=32, blend="hann", smooth_sigma=4.0, map_kind="perceptual")
    new = Detector(model, size, perceptual=pm, context=ctx, **kw)
    old = Detector(model, size, perceptual=copy.deepcopy(pm), context=copy.deepcopy(ctx), **kw)
    if case == "stats":
        old.image_map._stats_like = lambda level, r: old.image_map.stats(level)
    elif case == "trunk_weights":
        for m in (old.image_map, old.context):
            m._trunk_conv = plain_trunk_conv.__get__(m)
    images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g)
    return old, new, images


def inference_fns(case: str):
    if case == "last_layer":
        model = build_model("cmaae")
        new, old = Detector(model, image_size=512), Detector(model, image_size=512)
        originals = dict(model.named_modules())
        for name, module in list(old.model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child).__name__ == "SubPixelConvTranspose2d":
                    replaced = SubPixel3x3(originals[f"{name}.{child_name}" if name else child_name].eval())
                    replaced.conv.weight.data = replaced.conv.weight.data.to(child.conv.weight.dtype).contiguous(
                        memory_format=torch.channels_last)
                    if replaced.conv.bias is not None:
                        replaced.conv.bias.data = replaced.conv.bias.data.to(child.conv.bias.dtype)
                    setattr(module, child_name, replaced)
        images = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        return (lambda: old(images)), (lambda: new(images)), "one 512x512 image"
    if case == "matrix_layers":
        from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d

        model = build_model("cmaae")
        new, old = Detector(model, image_size=512), Detector(model, image_size=512)
        for seq in list(old.model.encoder) + list(old.model.decoder):
            m = seq[0]
            if isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)):
                # as the copy was made before: the float32 matrix laid out, then cast with the weights
                dense = (DenseConv2d if isinstance(m, KernelSizedConv2d) else DenseConvTranspose2d)(_plain(m).float())
                dense.matrix = dense.matrix.to(m.weight.dtype)
                dense.conv.weight.data = dense.conv.weight.data.to(m.weight.dtype).contiguous(
                    memory_format=torch.channels_last)
                seq[0] = dense
        images = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        return (lambda: old(images)), (lambda: new(images)), "one 512x512 image"
    old, new, images = recommended_pair(case)
    if case == "stitch":
        def run_old():
            detect_module.overlap_add = fold_overlap_add
            try:
                return old.predict_batched(images, 8)
            finally:
                detect_module.overlap_add = new_overlap_add
        new_overlap_add = detect_module.overlap_add
        return run_old, (lambda: new.predict_batched(images, 8)), "8 images of 256x256"
    return (lambda: old.predict_batched(images, 8)), (lambda: new.predict_batched(images, 8)), "8 images of 256x256"


def train_fns(stage: int):
    from bench_train import Workload

    from defect_fast.train import freeze_for_stage
    from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d

    precision = train_dtype("auto", torch.device("cpu"))  # what training uses here: bf16 on AVX512-BF16/AMX CPUs
    new = Workload("cmaae", stage, 64, 256, "cpu", True, precision)
    old = Workload("cmaae", stage, 64, 256, "cpu", True, precision)
    for seq in list(old.model.encoder) + list(old.model.decoder):
        m = seq[0]
        if isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)):
            seq[0] = _plain(m).to(memory_format=old.memory_format)  # the layout of the other layers
    # the default implementation, over the replaced modules' parameters, frozen as the trainer freezes them
    old.opt = torch.optim.Adam(freeze_for_stage(old.model, stage), lr=1e-4)
    return old.step, new.step


def train_layout_fns(stage: int):
    from bench_train import Workload

    from defect_fast.train import freeze_for_stage, stage_adam

    precision = train_dtype("auto", torch.device("cpu"))
    new = Workload("cmaae", stage, 64, 256, "cpu", True, precision)
    old = Workload("cmaae", stage, 64, 256, "cpu", True, precision)
    old.model.to(memory_format=torch.channels_last)  # every 4-D weight channels-last, as before
    old.opt = stage_adam(freeze_for_stage(old.model, stage), lr=1e-4)
    return old.step, new.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--repeats", type=int, default=8, help="alternating timings per case (3 rounds each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/replaced_cpu.json)")
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = device_info("cpu")
    res = {"info": info, "command": command_line(), "threads": args.threads, "repeats": args.repeats, "rows": []}
    print(f"{info['cpu']} | torch {info['torch']} | threads {args.threads}")
    for case in args.cases:
        if case == "train_layout" and train_dtype("auto", torch.device("cpu")) is None:
            why = "no bf16 on this CPU: the trainer keeps the model in NCHW float32, no channels-last weights to compare"
            res.setdefault("skipped", []).append({"case": case, "reason": why})
            print(f"  {case}: skipped ({why})")
            continue
        if case in ("train", "train_layout"):
            fns = train_fns if case == "train" else train_layout_fns
            variants = [(f"{case} stage {s}", *fns(s), "64 patches") for s in (0, 1)]
        else:
            variants = [(case, *inference_fns(case))]
        for name, old, new, unit in variants:
            with torch.inference_mode(not case.startswith("train")):
                if not case.startswith("train"):
                    a, b = old(), new()
                    a, b = (a["maps"], b["maps"]) if isinstance(a, dict) else (a[0], b[0])
                    if not torch.equal(a, b) and not (case in ("last_layer", "matrix_layers") and torch.allclose(a, b, atol=1e-3, rtol=1e-3)):
                        raise SystemExit(f"bench_replaced: {name}: old and new maps differ")
                ratios, ms = [], []
                for _ in range(args.repeats):
                    t = time_interleaved({"old": old, "new": new}, rounds=3, warmup=1, device="cpu")
                    ratios.append(t["new"]["median_ms"] / t["old"]["median_ms"])
                    ms.append((t["old"]["median_ms"], t["new"]["median_ms"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row = {"case": name, "per_call": unit, "ratio_new_over_old": round(statistics.median(ratios), 3),
                   "quartiles": [round(q[0], 3), round(q[2], 3)], "old_ms_median": round(statistics.median(o for o, _ in ms), 2),
                   "new_ms_median": round(statistics.median(n for _, n in ms), 2), "ratios": [round(r, 3) for r in ratios]}
            res["rows"].append(row)
            print(f"  {name:16s} ({unit}): old {row['old_ms_median']:8.2f} ms, new {row['new_ms_median']:8.2f} ms, "
                  f"time ratio new/old {row['ratio_new_over_old']:.3f} (quartiles {row['quartiles'][0]:.3f}-{row['quartiles'][1]:.3f})")
    write_results(args.out or RESULTS / "replaced_cpu.json", res)


if __name__ == "__main__":
    main()
