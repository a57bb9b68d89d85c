"""Shared helpers of the benchmarks: device description, interleaved timing, results files.

Timings of the native op and of the reference are taken in alternating rounds of the same run,
so that load from other processes on the machine hits both alike; the ratio is the ratio of
the medians.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# $DEFECT_FAST_RESULTS_DIR redirects every benchmark's default results file (gpu_suite.sh uses it).
RESULTS = Path(os.environ.get("DEFECT_FAST_RESULTS_DIR") or ROOT / "benchmarks" / "results")
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from defect_fast.precision import cpu_flags, cpu_model  # noqa: E402
from defect_fast.safety import write_results_text  # noqa: E402

#: The CPU features a result records (reduced-precision throughput depends on them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_id(cpuinfo: str | None = None) -> dict:
    """Vendor, family, model and stepping from /proc/cpuinfo (empty elsewhere). A virtual machine
    may name only the brand ("AMD EPYC"), and two generations under one name differ about 2 x in
    bf16 throughput: these numbers tell them apart (AMD family 25 is Zen 3/4, 26 is Zen 5)."""
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping"}
    out: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in keys and keys[key] not in out:
            value = value.strip()
            out[keys[key]] = int(value) if value.isdigit() else value
        elif not key and out:  # the first processor's block ends
            break
    return out


def device_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    flags = cpu_flags()
    info["cpu_flags"] = {f: f in flags for f in CPU_FLAGS}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        # what "float32" computes there: cuDNN convolutions use TF32 unless this is False
        info["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 10, warmup: int = 2, device: str = "cpu") -> dict[str, dict]:
    """Times each callable once per round, alternating between them; returns ms statistics."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": round(statistics.median(s), 3), "min_ms": round(min(s), 3), "rounds": len(s)}
        for name, s in samples.items()
    }


def comma_counts(parser, option: str, text: str) -> list[int]:
    """``text``, comma-separated whole numbers >= 1 (``--batches 64,512``), as ints; anything else
    (``64,``, ``0``, ``x``) is a usage error naming ``option``, before the benchmark does any work."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{option} {text!r}: expected whole numbers >= 1, separated by commas (e.g. 64,512)")
    return values


def command_line() -> str:
    """The command that produced the results (for the JSON)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def op_rows(op: str, device: str, note: str, out: str | Path | None, write: bool = True) -> "RowsFile":
    """The rows file of an op benchmark: its payload (the op, the command, the machine, the native
    build as :func:`defect_fast.ops._native.build_info` reads it, and ``note``), written to
    ``out`` or ``results/<op>_<device type>.json`` after every case (nowhere without ``write``)."""
    from defect_fast.ops import _native

    payload = {"op": op, "command": command_line(), "machine": device_info(device),
               "build": {k: v for k, v in (_native.build_info() or {}).items() if k != "ops"}, "note": note}
    return RowsFile(None if not write else (out or RESULTS / f"{op}_{device.split(':')[0]}.json"), payload)


class RowsFile(list):
    """The rows of a results payload (``payload[key]``), written to ``path`` after every append, so
    that a benchmark stopped at its time limit keeps what it measured; ``path`` None: nothing is
    written. ``finish()`` writes the last time and says where."""

    def __init__(self, path: Path | None, payload: dict, key: str = "cases"):
        super().__init__()
        self.path, self.payload, self.key = path, payload, key

    def append(self, row) -> None:
        super().append(row)
        if self.path is not None:
            write_results(self.path, {**self.payload, self.key: list(self)}, quiet=True)

    def finish(self) -> None:
        if self.path is not None:
            write_results(self.path, {**self.payload, self.key: list(self)})


def write_results(path: Path, payload: dict, quiet: bool = False) -> None:
    """``payload`` as JSON at ``path``, replaced whole (a temporary file renamed over it): a
    benchmark that writes after every row leaves a readable file wherever it is stopped.

    A file that was there before this process first wrote to ``path`` (another run's results, a
    committed one) is never replaced: the results go to a numbered file beside it, named on
    stderr (:func:`defect_fast.safety.write_results_text`)."""
    path = write_results_text(path, json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
