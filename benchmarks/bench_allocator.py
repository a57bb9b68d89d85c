"""The tuned 512x512 CMA-AE call with glibc's own allocator settings and with the command line's.

:func:`defect_fast.allocator.keep_freed_memory` is process-wide and cannot be undone, so each
setting runs in its own child process, the two alternating (``--pairs`` times): each child times
``--calls`` batch-1 calls of the tuned Detector (after 5 warm-up calls) and counts the minor page
faults of those calls. Printed: each child's median, the paired ratio (command line's over
glibc's) and its median over the pairs.

    python benchmarks/bench_allocator.py --pairs 8      # writes results/allocator_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import RESULTS, command_line, device_info, write_results

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from defect_fast.allocator import keep_freed_memory
applied = keep_freed_memory()
from defect_fast.detect import Detector
from defect_fast.models import build_model
torch.manual_seed(0)
det = Detector(build_model("cmaae").eval(), image_size=512, device="cpu")
x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
calls = int(sys.argv[1])
with torch.inference_mode():
    for _ in range(5):
        det(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = []
    for _ in range(calls):
        t = time.perf_counter(); det(x); ts.append((time.perf_counter() - t) * 1e3)
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"allocator": applied, "median_ms": statistics.median(ts), "min_ms": min(ts),
                  "faults_per_call": (f1 - f0) / calls}))
"""


def child(setting: str, calls: int) -> dict:
    env = dict(os.environ)
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)
    if setting == "glibc":
        env["DEFECT_FAST_MALLOC"] = "default"
    else:
        env.pop("DEFECT_FAST_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(calls)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS / "allocator_cpu.json"))
    args = ap.parse_args()
    if args.pairs < 1 or args.calls < 1:
        ap.error("--pairs and --calls must be >= 1")
    info = device_info("cpu")
    rows = []
    for i in range(args.pairs):
        glibc, kept = child("glibc", args.calls), child("kept", args.calls)
        ratio = kept["median_ms"] / glibc["median_ms"]
        rows.append({"glibc": glibc, "kept": kept, "ratio_kept_over_glibc": round(ratio, 3)})
        print(f"pair {i + 1}: glibc {glibc['median_ms']:.2f} ms ({glibc['faults_per_call']:.0f} faults/call) | "
              f"kept {kept['median_ms']:.2f} ms ({kept['faults_per_call']:.0f} faults/call) | x{ratio:.3f}")
    ratios = [r["ratio_kept_over_glibc"] for r in rows]
    summary = {"ratio_median": round(statistics.median(ratios), 3),
               "glibc_median_ms": round(statistics.median(r["glibc"]["median_ms"] for r in rows), 2),
               "kept_median_ms": round(statistics.median(r["kept"]["median_ms"] for r in rows), 2),
               "paper_ms_per_image": 41.673}
    print(f"median over pairs: glibc {summary['glibc_median_ms']} ms, kept {summary['kept_median_ms']} ms, "
          f"ratio {summary['ratio_median']}")
    from pathlib import Path
    write_results(Path(args.out), {"info": info, "command": command_line(), "calls": args.calls, "rows": rows,
                                   **summary})


if __name__ == "__main__":
    main()
