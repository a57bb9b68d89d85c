"""End-to-end inspection of 512x512 images: the eager float32 pipeline against the tuned Detector.

For each method (CMA-AE, AW-SSIM AE) and each batch size, times in alternating rounds of one run

- eager: ``Detector(precision="float32", channels_last=False, batch_size=512, reuse_features=False,
  fuse=False)``
  called through ``predict_batched`` 8 images at a time (the pipeline before the tuned path: the
  MSFR map runs the encoder on the input a second time), and
- tuned: the Detector's defaults for the device (``precision``/``channels_last``/``batch_size``
  "auto", see :mod:`defect_fast.detect`), called with the whole batch, plus ``cuda_graphs`` on
  CUDA,
- with ``--compile`` also compiled: the tuned Detector with ``compile=True`` (torch.compile),
  timed in the same rounds; the row records its time and compiled/tuned,

and prints per-image latency, images/s and the ratio eager/tuned (how many times faster the tuned
path is). Each side's pipeline takes :meth:`Detector.images_per_call` images per call, recorded
per row: on a GPU the whole batch; on a CPU the tuned Detector's ``batch_size`` holds one 512-px
image (larger calls were slower there), so its batches of 8 and 64 make the calls batch 1
makes, while the eager one takes 8 images per call. The batch speedups are thus of the two
pipelines as a caller gets them, and part of them is the eager pipeline's larger calls. For
batches above 1 the tuned path at batch 1 is timed in the same rounds too, on the same images
one per call, and the per-image time over it is printed (batches timed minutes apart differ by
the machine's drift): what a caller pays per image for asking for a batch.
Both start from uint8 images on the device and end with float32 maps and scores on the host.
The CMA-AE paper reports 41.673 ms per 512x512 image on an A100; the ratio to it is printed
beside every tuned CMA-AE figure (a CPU number is not an A100 number: compare with care).

The compute floor: the multiply-adds of one tuned call per image (convolutions and matrix
products, counted by ``torch.utils.flop_counter``; the two products inside the fused memory
addressing op are not seen by the counter) over the multiply-adds per second of a large square
matrix product in the tuned path's dtype, timed in the same rounds (2048 on a CPU, 8192 on a
GPU). No pipeline of this network runs faster than that on the machine; the tuned time over it
says how much is left outside the arithmetic.

The process's C allocator is set as the command line sets it
(:func:`defect_fast.allocator.keep_freed_memory`, recorded as "allocator"; ``DEFECT_FAST_MALLOC=default``
keeps glibc's own settings; ``benchmarks/bench_allocator.py`` compares the two).

    python benchmarks/bench_inference.py [--device cpu|cuda] [--batch 1 8 64] [--rounds 10]
        [--models cmaae awae] [--threads N] [--compile] [--no-cuda-graphs] [--out FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast import ops
from defect_fast.allocator import keep_freed_memory
from defect_fast.precision import cudnn_benchmark
from defect_fast.detect import PRECISIONS, Detector, cpu_threads
from defect_fast.models import build_model, model_names

PAPER_MS_PER_IMAGE = 41.673  # CMA-AE paper, 512x512 image, NVIDIA A100
SIZE = 512
EAGER = {"precision": "float32", "channels_last": False, "batch_size": 512, "reuse_features": False, "fuse": False}
EAGER_IMAGES_PER_CALL = 8


def macs_per_image(det: Detector, image: torch.Tensor) -> float:
    """Multiply-adds of one call of ``det`` on ``image`` [1,3,S,S] that the flop counter sees."""
    counter = FlopCounterMode(display=False)
    # under the Detector's own cuDNN setting: cuDNN keeps the first plan it finds for a shape, so a
    # probe outside it would fix heuristic plans for the batch-1 shapes the timed calls then reuse
    with torch.inference_mode(), counter, cudnn_benchmark(det.cudnn_benchmark and image.is_cuda):
        det._pipeline(image)  # not through a CUDA graph: a replay dispatches no ops to count
    return counter.get_total_flops() / 2


def square_product(device: torch.device, dtype: torch.dtype):
    """(n, a callable multiplying two n x n matrices of ``dtype`` on ``device``)."""
    n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return n, lambda: torch.mm(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="images per timed call")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each timed callable per batch, after "
                    "the call of each path that compares their maps")
    ap.add_argument("--models", nargs="+", default=["cmaae", "awae"], choices=model_names())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of both paths (default: torch's); on a "
                    "CPU shared with busy processes 1 can beat the core count")
    ap.add_argument("--compile", action="store_true", help="also time the tuned path with torch.compile, in the "
                    "same rounds")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="tuned path without CUDA graphs (CUDA only)")
    ap.add_argument("--cudnn-benchmark", choices=("auto", "on", "off"), default="auto",
                    help="tuned path's cuDNN algorithm search (Detector option cudnn_benchmark); cuDNN keeps the "
                    "first plan it finds for a shape in a process, so compare on and off in separate runs")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/inference_<device>.json)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if min(args.batch) < 1 or args.rounds < 1 or args.warmup < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--batch, --rounds, --warmup and --threads must be >= 1")

    allocator = keep_freed_memory()  # as the command line sets it (DEFECT_FAST_MALLOC=default: glibc's own)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    info = device_info(args.device)
    results = {"info": info, "command": command_line(), "native_backend": ops.backend(args.device), "allocator": allocator,
               "paper_ms_per_image": PAPER_MS_PER_IMAGE, "image_size": SIZE, "threads": args.threads,
               "eager": dict(EAGER, images_per_call=EAGER_IMAGES_PER_CALL), "rows": []}
    print(f"{info.get('gpu') or info['cpu']} | torch {info['torch']} | threads {info['torch_threads']} | "
          f"load {info.get('load_average')} | ops {results['native_backend']}")
    out_path = args.out or RESULTS / f"inference_{device.type}.json"
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name)
        # cuDNN's algorithm search as the tuned side has it: "auto" turned it on for the eager side too
        eager = Detector(model, image_size=SIZE, device=device, threads=args.threads,
                         cudnn_benchmark={"auto": "auto", "on": True, "off": False}[args.cudnn_benchmark], **EAGER)
        tuned_options = dict(image_size=SIZE, device=device, threads=args.threads, cuda_graphs=on_gpu and not args.no_cuda_graphs,
                             cudnn_benchmark={"auto": "auto", "on": True, "off": False}[args.cudnn_benchmark])
        tuned = Detector(model, **tuned_options)
        compiled = Detector(model, compile=True, **tuned_options) if args.compile else None
        results.setdefault("tuned", {})[name] = tuned.options()
        results["eager"]["cudnn_benchmark"] = eager.options()["cudnn_benchmark"]
        print(f"{name}: map {tuned.map_kind}, tuned options {tuned.options()}")
        probe = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        macs = macs_per_image(tuned, probe.to(device))
        n, product = square_product(device, PRECISIONS[tuned.precision])

        def gemm(product=product):  # at the Detectors' thread count (--threads): the peak they can reach
            with cpu_threads(args.threads):
                product()
        for b in args.batch:
            images = torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(b)).to(device)
            outs = {"eager": eager.predict_batched(images, EAGER_IMAGES_PER_CALL), "tuned": tuned.predict_batched(images, b)}
            diff = float((outs["eager"]["maps"] - outs["tuned"]["maps"]).abs().max())
            scale = float(outs["eager"]["maps"].abs().max())
            fns = {"eager": lambda: eager.predict_batched(images, EAGER_IMAGES_PER_CALL),
                   "tuned": lambda: tuned.predict_batched(images, b)}
            compiled_diff = None
            if compiled is not None:  # compiled here, outside the timed rounds
                compiled_diff = float((compiled.predict_batched(images, b)["maps"] - outs["tuned"]["maps"]).abs().max())
                fns["compiled"] = lambda: compiled.predict_batched(images, b)
            if b > 1:  # batch 1 in the same rounds: the per-image comparison with batch 1 is free of drift
                # the same images, one per call: timing images[:1] alone compared a call on one
                # cached image with calls that stream all b images (batch 64 read 1.08 x batch 1
                # from that, 0.95-1.0 with every image once per round)
                def one_by_one(images=images, b=b):
                    for i in range(b):
                        tuned.predict_batched(images[i:i + 1], 1)

                fns["tuned_batch1"] = one_by_one
            fns["gemm"] = gemm  # the arithmetic peak, in the same rounds
            # every callable warmed once more (the comparison above called eager and tuned only)
            t = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, device=args.device)
            e_ms, t_ms = t["eager"]["median_ms"] / b, t["tuned"]["median_ms"] / b
            row = {"model": name, "map": tuned.map_kind, "images": b,
                   "eager_images_per_call": min(b, eager.images_per_call(EAGER_IMAGES_PER_CALL)),
                   "tuned_images_per_call": min(b, tuned.images_per_call(b)),
                   "eager_ms_per_image": round(e_ms, 3), "tuned_ms_per_image": round(t_ms, 3),
                   "eager_images_per_s": round(1e3 / e_ms, 2), "tuned_images_per_s": round(1e3 / t_ms, 2),
                   "speedup_tuned_over_eager": round(e_ms / t_ms, 3),
                   "max_abs_map_difference": diff, "max_abs_map": scale, "timings": t}
            peak = n**3 / (t["gemm"]["median_ms"] * 1e-3)
            floor_ms = macs / peak * 1e3
            row.update({"macs_per_image": macs, "gemm_size": n, "gemm_dtype": tuned.precision,
                        "gemm_macs_per_s_same_rounds": round(peak), "compute_floor_ms_per_image": round(floor_ms, 3),
                        "tuned_over_floor": round(t_ms / floor_ms, 3)})
            if b > 1:
                b1_ms = t["tuned_batch1"]["median_ms"] / b
                row["tuned_batch1_ms_same_rounds"] = round(b1_ms, 3)
                row["per_image_over_batch1_same_rounds"] = round(t_ms / b1_ms, 3)
            if compiled is not None:
                c_ms = t["compiled"]["median_ms"] / b
                row.update({"compiled_ms_per_image": round(c_ms, 3), "compiled_over_tuned": round(c_ms / t_ms, 3),
                            "compiled_max_abs_map_difference_to_tuned": compiled_diff})
            if name == "cmaae" and b == 1:  # the paper's figure is one image's latency, not a batch's throughput
                row["paper_ms_over_tuned_ms"] = round(PAPER_MS_PER_IMAGE / t_ms, 3)
            results["rows"].append(row)
            write_results(out_path, results, quiet=True)  # row by row: a step cut off keeps what it measured
            paper = (f", paper {PAPER_MS_PER_IMAGE} ms (A100) / tuned = {row['paper_ms_over_tuned_ms']:.2f}"
                     if "paper_ms_over_tuned_ms" in row else "")
            print(f"  batch {b:3d}: eager {e_ms:9.2f} ms/image {row['eager_images_per_s']:9.2f} img/s | "
                  f"tuned {t_ms:9.2f} ms/image {row['tuned_images_per_s']:9.2f} img/s | x{row['speedup_tuned_over_eager']:.2f}"
                  f" | max |map diff| {diff:.2e} of {scale:.2e}{paper}")
            print(f"             images per pipeline call: eager {row['eager_images_per_call']}, "
                  f"tuned {row['tuned_images_per_call']}")
            print(f"             compute floor {floor_ms:.2f} ms/image ({macs / 1e9:.2f} G multiply-adds at "
                  f"{peak / 1e9:.0f} G/s, {n}^3 {tuned.precision} product): tuned = {row['tuned_over_floor']:.2f} x floor")
            if b > 1:
                print(f"             per image / batch 1 timed in the same rounds ({b1_ms:.2f} ms): "
                      f"{row['per_image_over_batch1_same_rounds']:.3f}")
            if compiled is not None:
                print(f"             compiled (torch.compile) {row['compiled_ms_per_image']:.2f} ms/image: compiled / "
                      f"tuned = {row['compiled_over_tuned']:.3f} (max |map diff| to tuned {compiled_diff:.2e})")
    info["load_average_end"] = device_info(args.device).get("load_average")
    write_results(out_path, results)


if __name__ == "__main__":
    main()
