"""The GPU suite's step runner (``benchmarks/gpu_suite.sh``), run here on stand-in commands: how a
step's outcome is recorded, and that compute-sanitizer refusing the machine's GPU runtime is told
apart from a memory error it found. (CI also runs the whole suite's dry run.)"""
from __future__ import annotations

import os
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _step_function() -> str:
    """step() and the record() and pack() it calls, and after_build(), as gpu_suite.sh defines them."""
    text = SUITE.read_text()
    found = []
    for name in ("step", "record", "pack", "after_build"):
        m = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, flags=re.S | re.M)
        assert m, f"{name}() not found in gpu_suite.sh"
        found.append(m.group(0))
    return "\n".join(found)


def _fake(bin_dir: Path, name: str, output: str, rc: int) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\necho '{output}'\nexit {rc}\n")
    path.chmod(0o755)


def _run_steps(tmp_path: Path, fakes: dict[str, tuple[str, int]], calls: list[str],
               archive: Path | None = None, deadline: int = 600) -> list[list[str]]:
    """Run ``step`` for each call line with the fake commands on PATH; the rows of steps.tsv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, (output, rc) in fakes.items():
        _fake(bin_dir, name, output, rc)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "results").mkdir()
    # (under the suite's own shell settings: an unset variable it reads ends it)
    script = "\n".join(["set -uo pipefail", f'OUT="{out}"', "DRY=0", "PY=python3", f'ARCHIVE="{archive or ""}"',
                        f'STEPS_FILE="{out}/steps.tsv"', 'SUMMARY_PY=""', "START=$(date +%s)",
                        ': > "$STEPS_FILE"',
                        f"DEADLINE=$(( $(date +%s) + {deadline} ))", "MIN_STEP=15", _step_function(), *calls])
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True, text=True, timeout=60)
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


def test_sanitizer_refused_by_the_runtime_is_not_a_failed_step(tmp_path):
    rows = _run_steps(
        tmp_path,
        {"compute-sanitizer": ("========= Error: Device not supported", 1), "okcmd": ("fine", 0), "badcmd": ("boom", 3)},
        ["step memcheck 30 gpu compute-sanitizer --tool memcheck python3 smoke.py",
         "step other 30 gpu okcmd", "step broken 30 gpu badcmd"])
    assert [(r[0], r[1]) for r in rows] == [("memcheck", "unsupported"), ("other", "ok"), ("broken", "failed(rc=3)")]


def test_a_memory_error_the_sanitizer_finds_stays_a_failure(tmp_path):
    rows = _run_steps(tmp_path, {"compute-sanitizer": ("========= Invalid __global__ write of size 4 bytes", 1)},
                      ["step memcheck 30 gpu compute-sanitizer --tool memcheck python3 smoke.py"])
    assert rows[0][:2] == ["memcheck", "failed(rc=1)"]


def test_racecheck_tells_races_in_other_kernels_from_races_in_the_project_s(tmp_path):
    """racecheck looks at PyTorch's and cuBLAS's kernels too: a hazard it finds only there is said
    as such; one in a defect_fast:: kernel fails the step."""
    done = "gpu_op_smoke: all ops agree with the reference"
    theirs = ("========= Error: Race reported between Write access at 0x10 in Reduce.cuh:200:"
              "void at::native::reduce_kernel<512, 1>(float*)")
    ours = ("========= Error: Race reported between Write access at 0x10 in aw_ssim_kernel.cu:150:"
            "void defect_fast::aw_ssim::cuda::forward_kernel<float>(float const*)")
    crashed = "RuntimeError: CUDA error: an illegal memory access\n========= RACECHECK SUMMARY: 0 hazards displayed"
    for output, want in ((f"{done}\n{theirs}", "foreign-races"), (f"{done}\n{ours}", "failed(rc=1)"),
                         (crashed, "failed(rc=1)")):  # a crash is no foreign race
        case = tmp_path / str(len(list(tmp_path.iterdir())))
        case.mkdir()
        rows = _run_steps(case, {"compute-sanitizer": (output, 1)},
                          ["step racecheck 30 gpu compute-sanitizer --tool racecheck python3 smoke.py"])
        assert rows[0][:2] == ["racecheck", want]


@pytest.mark.parametrize("build,failed,kernels", [("okcmd", "0", "on"), ("badcmd", "1", "0"), ("sleep 5", "0", "on")])
def test_a_failed_build_switches_the_kernels_off_and_one_cut_off_at_its_limit_does_not(tmp_path, build, failed, kernels):
    """A build that failed would fail again in every later step, for minutes: the later steps run
    without the CUDA kernels. One cut off at its limit (here 1 s) has its compiled objects kept by
    ninja, and the next step's load goes on with them: switching the kernels off would throw that
    away and leave the rest of the suite without them."""
    _run_steps(tmp_path, {"okcmd": ("fine", 0), "badcmd": ("error: no such type", 1)},
               [f"step build 1 gpu {build}", "after_build",
                'echo "$BUILD_FAILED ${DEFECT_FAST_CUDA:-on}" > "$OUT/after_build"'])
    assert (tmp_path / "out" / "after_build").read_text().split() == [failed, kernels]


@pytest.mark.parametrize("more,steps,kernels", [("exit(1)", ["build", "build_more"], "0"),
                                                 ("exit(0)", ["build", "build_more"], "on")])
def test_a_build_cut_off_goes_on_in_a_step_of_its_own_whose_failure_switches_the_kernels_off(
        tmp_path, more, steps, kernels):
    """A build cut off at its limit, whose rest then failed, was compiled again, to fail again, by
    each later step: the rest now runs as build_more, and the suite's own block after it switches
    the kernels off when it fails."""
    block = re.search(r'^if \[ "\$BUILD_CUT" = 1 \]; then\n.*?^fi\n', SUITE.read_text(), flags=re.S | re.M)
    assert block, "the build_more block not found in gpu_suite.sh"
    build_py = tmp_path / "build_check.py"
    build_py.write_text(f"import sys\nsys.{more}\n")
    rows = _run_steps(tmp_path, {}, [f'BUILD_PY="{build_py}"', "step build 1 gpu sleep 5", "after_build",
                                     block.group(0), 'echo "$BUILD_FAILED ${DEFECT_FAST_CUDA:-on}" > "$OUT/after_build"'])
    assert [r[0] for r in rows] == steps and rows[0][1] == "timeout"
    assert (tmp_path / "out" / "after_build").read_text().split() == ["1" if kernels == "0" else "0", kernels]
    # the verdict: a build cut off and finished by build_more is no failed step; one whose rest failed is
    m = re.search(r"cat > \"\$SUMMARY_PY\" <<'EOF'\n(.*?)\nEOF\n", SUITE.read_text(), flags=re.S)
    (tmp_path / "summary.py").write_text(m.group(1))
    res = subprocess.run(["python3", str(tmp_path / "summary.py"), str(tmp_path / "out"), "0", "42"],
                         capture_output=True, text=True, timeout=60)
    verdict = res.stdout.strip().splitlines()[-2]
    assert (res.returncode, verdict.endswith("all steps ok")) == ((0, True) if kernels == "on" else (1, False)), res.stdout
    assert kernels == "on" or verdict.endswith("NOT ok: build, build_more")


def test_a_build_more_skipped_at_the_deadline_leaves_the_kernels_on(tmp_path):
    rows = _run_steps(tmp_path, {}, ['printf "build\ttimeout\t240\t-\t-\nbuild_more\tskipped\t0\t-\t-\n" >> "$STEPS_FILE"',
                                     "after_build", 'echo "$BUILD_FAILED ${DEFECT_FAST_CUDA:-on}" > "$OUT/after_build"'])
    assert [r[1] for r in rows] == ["timeout", "skipped"]
    assert (tmp_path / "out" / "after_build").read_text().split() == ["0", "on"]


def test_the_memory_check_runs_before_anything_is_timed():
    """The kernels have to compute the right values inside their buffers before their timings mean
    anything; the suite's deadline can cut its last steps, so memcheck may not be one of them."""
    order = [m.group(1) for m in re.finditer(r"^\s*(?:EXPECT=\S+ )?step (\w+) \d+ gpu ", SUITE.read_text(), flags=re.M)]
    timed = [n for n in ("inference", "bench_ssim", "train", "bench_ma", "bench_msfr") if n in order]
    assert timed and {"build", "tests_ops", "memcheck", "racecheck"} <= set(order)
    assert order.index("build") < order.index("tests_ops") < order.index("memcheck") < min(map(order.index, timed))


def test_no_step_starts_with_less_than_15_seconds_left(tmp_path):
    rows = _run_steps(tmp_path, {"okcmd": ("fine", 0)}, ["step late 30 gpu okcmd"], deadline=10)
    assert rows[0][:2] == ["late", "skipped"] and "s left" in rows[0][4]
    assert not (tmp_path / "out" / "logs" / "late.log").exists()


def test_the_archive_is_packed_after_every_step(tmp_path):
    """With --archive the results are packed after each step, so a kill from outside the suite (the
    machine's own limit on the command) still leaves the steps before it to copy back."""
    import tarfile

    archive = tmp_path / "suite.tar.gz"
    _run_steps(tmp_path, {"okcmd": ("fine", 0)}, ["step first 30 gpu okcmd"], archive=archive)  # no final pack here
    with tarfile.open(archive) as tar:
        assert "out/logs/first.log" in tar.getnames() and "out/steps.tsv" in tar.getnames()
    assert not Path(str(archive) + ".part").exists()


def test_other_commands_printing_the_phrase_still_fail(tmp_path):
    rows = _run_steps(tmp_path, {"mytool": ("Device not supported", 2)}, ["step tool 30 gpu mytool"])
    assert rows[0][:2] == ["tool", "failed(rc=2)"]


@pytest.mark.parametrize("archive,why", [("kept.tar.gz", "exists; not replacing it"),
                                         ("out/inside.tgz", "must lie outside OUTDIR"),
                                         ("suite.zip", "name a .tar.gz or .tgz file")])
def test_archive_option_refuses_before_running_anything(tmp_path, archive, why):
    (tmp_path / "kept.tar.gz").write_bytes(b"someone's file")
    r = subprocess.run(["bash", str(SUITE), "--dry-run", "--archive", str(tmp_path / archive), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr and "--archive" in r.stderr
    assert (tmp_path / "kept.tar.gz").read_bytes() == b"someone's file"
    assert not (tmp_path / "out" / "steps.tsv").exists()


def test_a_benchmark_that_ends_without_its_results_or_with_skipped_rows_is_not_ok(tmp_path):
    """bench_train turns a missing weights file or an out-of-memory batch into a skipped row and
    exits 0: the summary said "all steps ok" over a file without the rows the step was for."""
    rows = _run_steps(
        tmp_path, {"writes": ("fine", 0), "silent": ("fine", 0)},
        ['writes; echo \'{"rows": [], "skipped": [{"model": "awae"}]}\' > "$OUT/results/train.json"',
         "EXPECT=train.json step train 30 gpu writes", "EXPECT=none.json step quiet 30 gpu silent",
         'echo \'{"rows": [1]}\' > "$OUT/results/full.json"', "EXPECT=full.json step full 30 gpu writes"])
    assert [(r[0], r[1]) for r in rows] == [("train", "incomplete(skipped rows)"), ("quiet", "failed(no none.json)"),
                                            ("full", "ok")]


def test_a_missing_sanitizer_is_not_checked_rather_than_failed(tmp_path):
    rows = _run_steps(tmp_path, {}, ["step memcheck 30 gpu /nowhere/bin/compute-sanitizer --tool memcheck python3 x.py"])
    assert rows[0][:2] == ["memcheck", "absent"]


def test_an_outdir_with_an_earlier_suite_s_output_is_refused(tmp_path):
    (tmp_path / "out" / "results").mkdir(parents=True)
    (tmp_path / "out" / "results" / "train_cuda.json").write_text("{}")
    r = subprocess.run(["bash", str(SUITE), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "holds an earlier suite's output" in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["results", "train_cuda.json"]


def test_an_unreadable_results_file_does_not_cost_the_summary(tmp_path):
    """The summary loaded every results file without a guard: one left empty or cut short (a step
    killed while it wrote, a full disk) ended it with a traceback, before the verdict line."""
    text = SUITE.read_text()
    m = re.search(r"cat > \"\$SUMMARY_PY\" <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    assert m, "the summary script not found in gpu_suite.sh"
    summary = tmp_path / "summary.py"
    summary.write_text(m.group(1))
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "steps.tsv").write_text("inference\tok\t12\tlog\tcmd\ntrain\tok\t30\tlog\tcmd\n")
    (out / "env.json").write_text('{"gpu": "Fake GPU", "torch": "2.13.0"}')
    (out / "results" / "inference_cuda.json").write_text("")
    (out / "results" / "train_cuda.json").write_text('{"rows": [{"model": "cmaae", "speedup": 2.5}]}')
    res = subprocess.run(["python3", str(summary), str(out), "0", "42"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "inference_cuda.json\n    unreadable: JSONDecodeError" in res.stdout
    assert "model=cmaae speedup=2.5" in res.stdout and "all steps ok" in res.stdout


def test_a_broken_steps_line_or_rows_of_another_shape_do_not_cost_the_summary(tmp_path):
    """A steps line a command's tab or newline broke (fewer fields, seconds not a number) and a
    results file whose rows are a dict ended the summary with a traceback; suite.json, written
    by the same script, then stopped being updated."""
    text = SUITE.read_text()
    m = re.search(r"cat > \"\$SUMMARY_PY\" <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    summary = tmp_path / "summary.py"
    summary.write_text(m.group(1))
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "steps.tsv").write_text("inference\tok\t12\tlog\tpython3 x --args 'a\nb'\ntrain\tok\tlots\n")
    (out / "results" / "train_cuda.json").write_text('{"rows": {"cmaae": {"model": "cmaae", "speedup": 2.5}}}')
    res = subprocess.run(["python3", str(summary), str(out), "0", "42"], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    assert "model=cmaae speedup=2.5" in res.stdout and "NOT ok: b'" in res.stdout  # the broken line is no ok step
    steps = json.loads((out / "suite.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["inference", "b'", "train"] and steps[2]["seconds"] == 0


def test_steps_in_suite_skip_are_left_out_said_and_no_failure(tmp_path):
    """A second call on a warm machine had to run every step again, the first call's too, where one
    suite takes nearly all of a session's device time: SUITE_SKIP leaves steps out, said as such;
    a build left out keeps the kernels on (built before, or by the first step that needs them)."""
    rows = _run_steps(tmp_path, {"okcmd": ("fine", 0), "badcmd": ("boom", 3)},
                      ['SUITE_SKIP="build,memcheck other"', "step build 30 gpu badcmd", "after_build",
                       'echo "$BUILD_FAILED ${DEFECT_FAST_CUDA:-on}" > "$OUT/after_build"',
                       "step memcheck 30 gpu badcmd", "step other 30 gpu badcmd", "step inference 30 gpu okcmd"])
    assert [(r[0], r[1]) for r in rows] == [("build", "left-out"), ("memcheck", "left-out"), ("other", "left-out"),
                                            ("inference", "ok")]
    assert (tmp_path / "out" / "after_build").read_text().split() == ["0", "on"]
    m = re.search(r"cat > \"\$SUMMARY_PY\" <<'EOF'\n(.*?)\nEOF\n", SUITE.read_text(), flags=re.S)
    summary = tmp_path / "summary.py"
    summary.write_text(m.group(1))
    res = subprocess.run(["python3", str(summary), str(tmp_path / "out"), "0", "42"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "left out (SUITE_SKIP): build, memcheck, other" in res.stdout
    assert "the steps run are ok; not run here: build, memcheck, other" in res.stdout


def test_suite_skip_names_steps_of_the_suite_and_leaves_out_the_install_too(tmp_path):
    """A misspelt name in SUITE_SKIP was ignored and its step ran (a build of minutes on a device);
    the install's own branches (no CUDA torch, no wheels) wrote a failure whatever SUITE_SKIP said."""
    names = sorted(set(re.findall(r"(?:^|\s)step ([a-z_]+) [0-9]+ ", SUITE.read_text())))
    assert {"install", "build", "memcheck", "tests_collect"} <= set(names)
    env = dict(os.environ, SUITE_SKIP="env tests-collect")
    r = subprocess.run(["bash", str(SUITE), "--dry-run", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "SUITE_SKIP names no step 'tests-collect'" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()
    env = dict(os.environ, SUITE_SKIP=",".join(names), DEFECT_FAST_WHEELS="")
    r = subprocess.run(["bash", str(SUITE), str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [line.split("\t")[:2] for line in (tmp_path / "b" / "steps.tsv").read_text().splitlines()]
    assert rows and all(status == "left-out" for _name, status in rows), rows
    assert ["install", "left-out"] in rows
