"""The exported pipeline where inspection software would run it, against the tuned Detector.

For each method, one 512x512 image per call (the latency a line sees), timed in alternating rounds
of one run on the CPU:

- tuned: the Detector's defaults for this CPU (bfloat16 where it has AVX512-BF16/AMX,
  channels-last, the fused inference copy, the native ops);
- onnxruntime: ``defect-fast export --format onnx`` of the same model (float32, the fused copy,
  the ops as their pure-PyTorch reference) in an onnxruntime CPU session with as many intra-op
  threads as torch has;
- torchscript: the ``--format torchscript`` file, loaded with ``torch.jit.load`` (what the C++
  runner in ``examples/cpp`` loads);
- torchscript_bf16: the ``--format torchscript --precision bfloat16`` file (the tuned graph with
  the ops as plain PyTorch), where the tuned path runs bf16 (a CPU with AVX512-BF16 or AMX);
- eager: the float32 pipeline of ``bench_inference.py`` (no fusion, no reuse, NCHW).

Prints ms per image, each path's time over the tuned one and the largest map difference to it.
Weights are random; the exported files go to a temporary folder.

    python benchmarks/bench_export.py [--models cmaae awae] [--rounds 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_inference import EAGER, PAPER_MS_PER_IMAGE, SIZE
from common import RESULTS, command_line, device_info, time_interleaved, write_results

from defect_fast.detect import Detector
from defect_fast.export import export_detector
from defect_fast.models import build_model, model_names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cmaae", "awae"], choices=model_names())
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/export_cpu.json)")
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    import onnxruntime as ort

    info = device_info("cpu")
    info["onnxruntime"] = ort.__version__
    threads = torch.get_num_threads()
    results = {"info": info, "command": command_line(), "image_size": SIZE, "threads": threads, "rows": []}
    print(f"{info['cpu']} | torch {info['torch']} | onnxruntime {ort.__version__} | threads {threads}")
    image = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = build_model(name)
            tuned = Detector(model, image_size=SIZE)
            eager = Detector(model, image_size=SIZE, **EAGER)
            plain = Detector(model, image_size=SIZE, precision="float32")  # what `defect-fast export` exports
            onnx_file = export_detector(plain, Path(tmp) / f"{name}.onnx", "onnx")
            ts_file = export_detector(plain, Path(tmp) / f"{name}.pt", "torchscript")
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
            scripted = torch.jit.load(str(ts_file))
            x = image.numpy()
            fns = {"tuned": lambda: tuned(image), "onnxruntime": lambda: session.run(None, {"images": x}),
                   "torchscript": lambda: scripted(image), "eager": lambda: eager(image)}
            if tuned.precision == "bfloat16":
                scripted_bf16 = torch.jit.load(str(export_detector(
                    Detector(model, image_size=SIZE, precision="bfloat16"), Path(tmp) / f"{name}_bf16.pt", "torchscript",
                    precision="bfloat16")))
                fns["torchscript_bf16"] = lambda: scripted_bf16(image)
            with torch.inference_mode():
                want = tuned(image)[0].numpy()
                maps = {path: (fn()[0] if path == "onnxruntime" else fn()[0].numpy()) for path, fn in fns.items()
                        if path != "tuned"}
                t = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, device="cpu")
            base = t["tuned"]["median_ms"]
            row = {"model": name, "tuned_options": tuned.options(), "tuned_ms_per_image": base,
                   "max_abs_map": float(np.abs(want).max()), "timings": t}
            print(f"{name}: tuned {base:.2f} ms/image ({tuned.precision})")
            for path, m in maps.items():
                ms = t[path]["median_ms"]
                row[f"{path}_ms_per_image"] = ms
                row[f"{path}_over_tuned"] = round(ms / base, 3)
                row[f"{path}_max_abs_map_difference"] = float(np.abs(m - want).max())
                print(f"  {path:16s} {ms:9.2f} ms/image  x{ms / base:.2f} the tuned time  "
                      f"max |map diff| {row[f'{path}_max_abs_map_difference']:.1e} of {row['max_abs_map']:.1e}")
            if name == "cmaae":
                row["paper_ms_per_image"] = PAPER_MS_PER_IMAGE
            results["rows"].append(row)
    write_results(args.out or RESULTS / "export_cpu.json", results)


if __name__ == "__main__":
    main()
