"""Bad arguments to a benchmark are a one-line usage error naming the argument (exit status 2),
given before any model is built or timed, not a traceback after minutes of work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = [
    ("bench_train.py", ["--image-size", "100", "--models", "cmaae", "--steps", "1"], "--image-size"),
    ("bench_train.py", ["--image-size", "0", "--models", "cmaae", "--steps", "1"], "--image-size"),
    ("bench_aw_ssim.py", ["--batches", "64,", "--no-write"], "--batches"),
    ("bench_aw_ssim.py", ["--batches", "0", "--no-write"], "--batches"),
    ("bench_msfr.py", ["--threads", "0", "--no-write"], "--threads"),
    ("bench_memory_address.py", ["--threads", "0", "--no-write"], "--threads"),
    ("bench_context.py", ["--batch", "0"], "--batch"),
    ("bench_replaced.py", ["--repeats", "0", "--cases", "last_layer"], "--repeats"),
    ("bench_allocator.py", ["--pairs", "0"], "--pairs"),
    ("bench_inference.py", ["--models", "foo"], "--models"),
    ("bench_export.py", ["--models", "foo"], "--models"),
    ("inference_variants.py", ["--batches", "0"], "--batches"),
]


@pytest.mark.parametrize("script, args, option", CASES, ids=[f"{c[0]} {' '.join(c[1][:2])}" for c in CASES])
def test_bad_argument_is_a_usage_error(tmp_path, script, args, option):
    env = dict(os.environ, DEFECT_FAST_RESULTS_DIR=str(tmp_path))
    out = ["--no-write"] if "--no-write" in args else ["--out", str(tmp_path / "results.json")]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, *[a for a in out if a not in args]],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and option in last, proc.stderr
    assert proc.stdout == "" and not any(tmp_path.iterdir())  # nothing measured, nothing written
