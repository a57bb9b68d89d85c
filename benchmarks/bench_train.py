"""Training throughput: patches/s per stage (normal, synthetic) for CMA-AE and AW-AE, eager vs tuned.

One training step = batch preparation on the training device (normal stage: patches cut from
resident images; synthetic stage: the model's own anomaly synthesis, GAAGA or ADGA, on whole
images, then the patches) + forward + ``model.loss`` + backward + Adam step. Steps of the two
modes alternate in one run (benchmarks/common.py), and the ratio is the ratio of the medians.
As in ``defect-fast train``, the random draws (which images, the anomalies' parameters) are small
tensors made by a CPU generator and moved; the pixel work runs on the training device, where
the training images stay (:mod:`defect_fast.train`).

- eager: float32, contiguous (NCHW) tensors, the default Adam.
- tuned: what ``defect-fast train --precision auto`` runs (:class:`defect_fast.train.Trainer`):
  the autocast dtype it picks (:func:`defect_fast.train.train_dtype`), bfloat16 on GPUs that
  have it and on CPUs with AVX512-BF16 or AMX (oneDNN's bfloat16 kernels), and with it a
  channels_last model and inputs (the matrix-product layers' weights in the default layout,
  ``keep_matrix_weights_contiguous``); elsewhere float32 in NCHW, as the trainer keeps it there.
  Adam's fused kernel where the trainer takes it (float parameters on the CPU or CUDA) and, on
  CUDA, cuDNN's timed algorithm search (the eager steps run other dtypes and layouts, so the plans
  cuDNN keeps per shape are not shared).

Both sides freeze what the stage does not train, as the trainer does: only
``model.trainable_parameters(stage)`` require gradients (CMA-AE's memory is frozen in the
synthetic stage, and no step computes its gradient).

Images are random (uniform noise, smoothed) and so are the synthesis sources: throughput does not
depend on the pictures, and the benchmark needs no files or network. The process's C allocator
is set as the command line sets it (:func:`defect_fast.allocator.keep_freed_memory`, recorded
as "allocator"; results files written before it was set ran glibc's own settings).

    python benchmarks/bench_train.py [--device cpu|cuda] [--models cmaae awae] [--batch 16]
                                     [--steps 3] [--out benchmarks/results/train_cpu.json]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, ROOT, command_line, device_info, time_interleaved, write_results

from defect_fast.allocator import keep_freed_memory
from defect_fast.data.patches import extract_patches
from defect_fast.precision import cudnn_benchmark
from defect_fast.train import freeze_for_stage, stage_adam, train_dtype, train_layout
from defect_fast.models import build_model


def tuned_precision(device: str) -> torch.dtype | None:
    """What ``defect-fast train --precision auto`` trains in on ``device`` (None: float32)."""
    return train_dtype("auto", torch.device(device))


def smooth_noise(n: int, size: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: upsampled noise, some structure at several scales."""
    coarse = torch.rand(n, 3, max(size // 8, 2), max(size // 8, 2), generator=generator)
    fine = torch.rand(n, 3, size, size, generator=generator)
    img = 0.7 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + 0.3 * fine
    return (img * 2 - 1).to(device)


def default_lpips_weights() -> str | None:
    """AW-AE's synthetic stage needs LPIPS's AlexNet trunk: $DEFECT_FAST_ALEXNET_WEIGHTS, else the
    shared copy beside the checkout (../shared/weights/alexnet-features-imagenet.pth), else None."""
    env = os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS")
    if env:
        return env
    shared = ROOT.parent / "shared" / "weights" / "alexnet-features-imagenet.pth"
    return str(shared) if shared.is_file() else None


class Workload:
    """A model, its optimizer and the resident images of one benchmark case (one mode)."""

    def __init__(self, name: str, stage: int, batch: int, image_size: int, device: str, tuned: bool,
                 precision: torch.dtype | None, lpips_weights: str | None = None, seed: int = 0):
        torch.manual_seed(seed)
        kwargs = {"lpips_weights": lpips_weights} if (name == "awae" and lpips_weights) else {}
        self.model = build_model(name, **kwargs).to(device)
        self.stage, self.batch, self.device = stage, batch, device
        self.stage_name = self.model.stages[stage]
        self.patch = self.model.patch_size
        if image_size % self.patch:
            raise ValueError(f"bench_train: --image-size {image_size} is not a multiple of {name}'s patch {self.patch}")
        self.per_image = (image_size // self.patch) ** 2
        self.images_per_step = math.ceil(batch / self.per_image)
        gen = torch.Generator().manual_seed(seed)
        self.images = smooth_noise(max(self.images_per_step, 4), image_size, gen, device)
        self.sources = smooth_noise(4, image_size, gen, device)
        self.gen = torch.Generator().manual_seed(seed)  # draws on the CPU, pixel work on the device, as training does
        self.cpu_gen = torch.Generator().manual_seed(seed + 1)
        self.search = tuned and device.startswith("cuda")  # cudnn_benchmark, as defect_fast.train has it on CUDA
        self.precision = precision if tuned else None
        # channels_last only with a reduced-precision dtype, as Trainer.__init__ and Trainer.run decide
        self.memory_format = torch.channels_last if self.precision is not None else torch.contiguous_format
        self.model = train_layout(self.model, self.precision)
        if hasattr(self.model, "begin_epoch"):
            self.model.begin_epoch(stage, 0)
        params = freeze_for_stage(self.model, stage)  # both sides: frozen parameters compute no gradient
        # tuned: Adam as defect_fast.train builds it (fused where it can); eager: the default implementation
        self.opt = stage_adam(params, lr=1e-4) if tuned else torch.optim.Adam(params, lr=1e-4)
        if self.stage_name == "synthetic":
            self.synth = self.model.synthesize  # the model's own: GAAGA for CMA-AE, ADGA for the AW-SSIM AE

    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) patches [batch, 3, P, P] made on the device."""
        idx = torch.randint(0, self.images.shape[0], (self.images_per_step,), generator=self.cpu_gen).to(self.device)
        clean = self.images[idx]
        if self.stage_name == "synthetic":
            dirty, _mask = self.synth(clean, self.sources, self.gen)
            x = extract_patches(dirty, self.patch)[: self.batch]
            y = extract_patches(clean, self.patch)[: self.batch]
        else:
            x = y = extract_patches(clean, self.patch)[: self.batch]
        return x.contiguous(memory_format=self.memory_format), y.contiguous(memory_format=self.memory_format)

    def step(self) -> float:
        x, y = self.make_batch()
        self.opt.zero_grad(set_to_none=True)
        with cudnn_benchmark(self.search):
            with torch.autocast(self.device.split(":")[0], dtype=self.precision or torch.bfloat16,
                                enabled=self.precision is not None):
                out = self.model(x)
                loss, _parts = self.model.loss(out, y, self.stage)
            loss.backward()
        self.opt.step()
        return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["cmaae", "awae"], choices=["cmaae", "awae"])
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="patches per step (default: 2048 on CUDA, 16 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: 10 on CUDA, 3 on the CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--stages", nargs="+", default=["normal", "synthetic"], choices=["normal", "synthetic"])
    ap.add_argument("--lpips-weights", default=default_lpips_weights(),
                    help="AlexNet trunk file for AW-AE's LPIPS loss (default: $DEFECT_FAST_ALEXNET_WEIGHTS or ../shared/weights/)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/train_<device>.json)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    batches = args.batch or ([2048] if cuda else [16])
    steps = args.steps or (10 if cuda else 3)
    if min(batches) < 1 or steps < 1:
        ap.error("--batch and --steps must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    probes = {name: build_model(name) for name in args.models}  # untrained, for their patch sizes and stages
    for name, probe in probes.items():
        patch = probe.patch_size
        if args.image_size < patch or args.image_size % patch:
            ap.error(f"--image-size {args.image_size}: {name} cuts {patch}-px patches; give a multiple of {patch}")
    precision = tuned_precision(args.device)
    allocator = keep_freed_memory()  # as `defect-fast train` sets it (DEFECT_FAST_MALLOC=default: glibc's own)
    info = device_info(args.device)
    results = {
        "info": info, "command": command_line(), "allocator": allocator,
        "modes": {"eager": "float32, NCHW, default Adam",
                  "tuned": (f"channels_last, {str(precision).removeprefix('torch.')} autocast, fused Adam" if precision
                            else "float32, NCHW (no bf16 instructions: the trainer's layout), fused Adam")},
        "image_size": args.image_size, "steps": steps, "warmup": args.warmup, "rows": [], "skipped": [],
    }
    out_path = args.out or RESULTS / f"train_{args.device.split(':')[0]}.json"
    for name in args.models:
        for batch in batches:
            for stage_name in args.stages:
                if stage_name not in probes[name].stages:
                    continue
                stage = probes[name].stages.index(stage_name)
                try:
                    eager = Workload(name, stage, batch, args.image_size, args.device, False, precision, args.lpips_weights)
                    tuned = Workload(name, stage, batch, args.image_size, args.device, True, precision, args.lpips_weights)
                    eager.step()  # the first step builds lazily loaded parts (LPIPS): fail here, not mid-timing
                    tuned.step()  # and the same untimed step for the other side
                    t0 = time.perf_counter()
                    t = time_interleaved({"eager": eager.step, "tuned": tuned.step}, rounds=steps, warmup=args.warmup,
                                         device=args.device)
                except (FileNotFoundError, torch.cuda.OutOfMemoryError) as exc:  # this case only: the rows measured stay
                    why = (str(exc) if isinstance(exc, FileNotFoundError)
                           else f"out of GPU memory: {str(exc).splitlines()[0]}")
                    results["skipped"].append({"model": name, "stage": stage_name, "batch": batch, "reason": why})
                    print(f"{name} {stage_name} batch {batch}: skipped ({why})", flush=True)
                    eager = tuned = None
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                row = {"model": name, "stage": stage_name, "batch": batch,
                       "eager_patches_per_s": round(batch / (t["eager"]["median_ms"] / 1e3), 1),
                       "tuned_patches_per_s": round(batch / (t["tuned"]["median_ms"] / 1e3), 1),
                       "speedup": round(t["eager"]["median_ms"] / t["tuned"]["median_ms"], 3),
                       "final_loss": {"eager": eager.step(), "tuned": tuned.step()},
                       "timings": t, "wall_s": round(time.perf_counter() - t0, 1)}
                results["rows"].append(row)
                write_results(out_path, results, quiet=True)  # row by row: a step cut off keeps what it measured
                print(f"{name} {stage_name:9s} batch {batch:5d} on {args.device}: eager {row['eager_patches_per_s']:9.1f} "
                      f"patches/s, tuned {row['tuned_patches_per_s']:9.1f} patches/s, x{row['speedup']:.2f}", flush=True)
    results["info"]["load_average_end"] = device_info(args.device).get("load_average")
    write_results(out_path, results)


if __name__ == "__main__":
    main()
