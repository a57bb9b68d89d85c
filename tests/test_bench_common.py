"""What a benchmark's results record about the CPU (``benchmarks/common.py``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
stepping\t: 8
"""


def test_cpu_id_reads_the_first_processor_and_tells_generations_apart():
    common = _common()
    assert common.cpu_id(CPUINFO) == {"vendor": "AuthenticAMD", "family": 26, "model": 2, "stepping": 1}
    # "model name" is not "model"; a CPU without the fields gives an empty record
    assert common.cpu_id("model name\t: Some CPU\n") == {}


def test_device_info_records_the_cpu_id_and_flags():
    info = _common().device_info("cpu")
    assert set(info["cpu_flags"]) >= {"avx512_bf16", "avx512_vnni", "amx_bf16"}
    assert isinstance(info["cpu_id"], dict)
