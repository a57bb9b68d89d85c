"""What a benchmark's results record about the CPU (``benchmarks/common.py``)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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


def test_results_never_replace_a_file_written_before_the_run(tmp_path, capsys):
    """A rerun of a benchmark with its default output (a committed results file) keeps that file
    and writes beside it; the run's own later writes (row by row) replace its own file."""
    common = _common()
    old = tmp_path / "msfr_cpu.json"
    old.write_text('{"committed": true}\n')
    common.write_results(old, {"rows": [1]}, quiet=True)
    assert old.read_text() == '{"committed": true}\n'
    assert "holds earlier results, kept" in capsys.readouterr().err
    mine = tmp_path / "msfr_cpu-2.json"
    assert json.loads(mine.read_text()) == {"rows": [1]}
    common.write_results(old, {"rows": [1, 2]})
    assert json.loads(mine.read_text()) == {"rows": [1, 2]} and old.read_text() == '{"committed": true}\n'
    assert f"wrote {mine}" in capsys.readouterr().out
    fresh = tmp_path / "new.json"
    common.write_results(fresh, {"rows": [1]}, quiet=True)
    common.write_results(fresh, {"rows": [1, 2]}, quiet=True)
    assert json.loads(fresh.read_text()) == {"rows": [1, 2]} and not (tmp_path / "new-2.json").exists()


def test_watch_scan_benchmark_runs(tmp_path):
    """The benchmark calls the watcher's private scanning steps: it breaks when they change."""
    out = tmp_path / "scan.json"
    subprocess.run([sys.executable, str(COMMON.parent / "bench_watch_scan.py"), "--files", "20", "--rounds", "2",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["files"] for r in rows] == [20] and rows[0]["listing_ms"] > 0 and rows[0]["event_ms"] > 0


def _bench_train():
    sys.path.insert(0, str(COMMON.parent))  # bench_train imports common by name
    try:
        spec = importlib.util.spec_from_file_location("bench_train", COMMON.parent / "bench_train.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(COMMON.parent))


def test_bench_train_tuned_side_follows_the_trainer():
    """The tuned side runs what Trainer runs: channels_last only with a reduced-precision dtype
    (float32 stays NCHW), fused Adam, and only the stage's trainable parameters require gradients
    (CMA-AE's memory is frozen in the synthetic stage), on the eager side too."""
    import torch

    bench_train = _bench_train()
    for precision in (None, torch.bfloat16):
        tuned = bench_train.Workload("cmaae", 1, 4, 64, "cpu", True, precision)
        w = tuned.model.encoder[1][0].weight
        assert w.is_contiguous() == (precision is None)
        assert tuned.memory_format == (torch.contiguous_format if precision is None else torch.channels_last)
        assert tuned.opt.defaults["fused"] is True
    eager = bench_train.Workload("cmaae", 1, 4, 64, "cpu", False, torch.bfloat16)
    assert eager.precision is None and eager.model.encoder[1][0].weight.is_contiguous()
    assert not eager.opt.defaults["fused"]
    for w in (tuned, eager):
        memory = w.model.mam.memory
        assert not memory.requires_grad
        assert all(p.requires_grad for p in w.model.trainable_parameters(1))
        w.step()
        assert memory.grad is None
    normal = bench_train.Workload("cmaae", 0, 4, 64, "cpu", True, None)
    assert normal.model.mam.memory.requires_grad


def test_two_runs_starting_together_never_share_a_results_file(tmp_path, monkeypatch):
    """Each process claims its file by creating it: two runs whose first writes overlapped both
    took x.json (and one's rename of a shared temporary failed)."""
    from defect_fast import safety

    a = safety.write_results_text(tmp_path / "x.json", "{}\n")
    monkeypatch.setattr(safety, "_RESULTS_FILES", {})  # another process's record
    b = safety.write_results_text(tmp_path / "x.json", "{}\n")
    assert {a.name, b.name} == {"x.json", "x-2.json"}


def test_a_writer_stopped_in_its_first_write_leaves_no_file_under_the_name(tmp_path, monkeypatch):
    """The name was claimed by creating it empty before the results were written: a stop (a
    SIGTERM, a full disk) left an empty x.json that the GPU suite's summary and the next run took
    for results."""
    from defect_fast import safety

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    try:
        safety.write_results_text(tmp_path / "x.json", "{}\n")
    except OSError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []
