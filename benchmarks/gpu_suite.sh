#!/usr/bin/env bash
# Everything a GPU must show, in one command of at most 9 minutes on one H100/H200, offline.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [--wheels DIR] [--archive FILE.tar.gz] OUTDIR
#
# Steps, in this order (each under its own timeout; the suite starts no step once fewer than 15 s
# are left before its deadline, 540 s after the start, or $SUITE_SECONDS):
#   env        python, torch, nvidia-smi, nvcc, CPU        -> OUTDIR/env.json
#   install    pip install --no-index --find-links WHEELS (only what is missing; no network)
#   build      the CUDA kernels (JIT, for the visible GPU) -> OUTDIR/build.json, logs/build.log
#   tests_ops  pytest -m cuda on the three ops' tests         -> OUTDIR/tests_cuda_ops.xml
#              (before the benchmarks: timings of a kernel that computes wrong values are no result)
#   memcheck   compute-sanitizer --tool memcheck  on benchmarks/gpu_op_smoke.py
#              (before the benchmarks too: an out-of-bounds access is no result either, and the
#              suite's deadline may leave no time for it at the end)
#   inference  benchmarks/bench_inference.py --device cuda       -> OUTDIR/results/inference_*.json
#   bench_ssim benchmarks/bench_aw_ssim.py --device cuda         -> OUTDIR/results/aw_ssim_cuda.json
#   train      benchmarks/bench_train.py --device cuda           -> OUTDIR/results/train_cuda.json
#   bench_ma, bench_msfr  benchmarks/bench_{memory_address,msfr}.py -> OUTDIR/results/*.json
#   tests      pytest -m cuda, the other tests                -> OUTDIR/tests_cuda.xml
#              (after the measurements the bars ask for: a suite cut short loses the later steps)
#   recommended benchmarks/bench_context.py --device cuda        -> OUTDIR/results/context_cuda.json
#              (the recommended run's inference: perceptual map + image context, with and without the row
#              profile, 256 px, batch 64)
#   inference_heur  the tuned inference with cuDNN's heuristics (--cudnn-benchmark off), batches 1
#              and 64 -> OUTDIR/results/inference_cuda_cudnn_heuristics.json, against `inference`
#   racecheck  compute-sanitizer --tool racecheck on benchmarks/gpu_op_smoke.py
#              (for both sanitizers: status "unsupported", not a failure, where the container
#              runtime refuses the tool the GPU: "Device not supported"; a memory error or race it
#              finds fails the step, "foreign-races" when racecheck names no kernel of this
#              project; racecheck last, since it is the slow one)
# The benchmarks write their JSON after every row (the recommended step after its inference
# timings, before its fits), so a step cut off at its limit keeps what it measured; a benchmark
# step that ends without its results file, or with rows it skipped, is not ok. OUTDIR must be new
# (an earlier suite's results would be summarised as this run's). suite.json is rewritten after
# every step. A failed CUDA build switches the kernels off for the later steps (DEFECT_FAST_CUDA=0);
# a build cut off at its limit does not: it goes on from the objects it compiled, in a step of its
# own (build_more), whose failure switches them off in turn.
# The suite writes OUTDIR/suite.json (every step's status, seconds, log) and a one-screen summary.
# --archive FILE.tar.gz also packs the whole OUTDIR (logs, results, suite.json) into that one file,
# after every step and at the end, whatever the steps did: what to copy back from a remote GPU
# machine that returns only a few files (a kill from outside keeps the steps before it). Give the
# machine's own limit on the command at least 580 s: the suite stops starting steps at 540 s; where
# less is left, set SUITE_SECONDS to that limit less 40 s. SUITE_SKIP="step step ..." (or commas)
# leaves those steps out, said as such in the summary (not a failure; a name that is no step is
# refused before anything runs): a second call on the same warm
# machine (its installed packages and compiled kernels still there) runs the steps the first did
# not reach, e.g. SUITE_SKIP="install build tests_ops memcheck inference". On a machine that returns what a command
# writes under $OUT (a handful of files at most), write OUTDIR elsewhere, new, and only the archive
# under $OUT (a rerun on the same warm machine then needs no new OUTDIR name either):
#   d=$(mktemp -d) && bash benchmarks/gpu_suite.sh --archive "$OUT/suite.tar.gz" "$d/suite"
#
# --dry-run (any machine, no GPU needed; CI runs it): executes the CPU parts at tiny sizes (the
# C++ kernels, the op smoke test on the CPU, the cuda tests' collection, each benchmark once on
# the CPU with one round, the inference benchmark at batches 1 and 2) and lists the GPU commands
# it would run. Well under 3 minutes once the C++ kernels are built.
#
# Offline kit. On a GPU image that already holds torch with CUDA (the H200 image this suite
# targets: Python 3.12, torch, numpy, scikit-learn, pytest, ninja, tqdm), the install step adds only what is
# missing, lpips and pytorch-msssim, with --no-deps, and never touches torch. Prepare them, and a
# copy of the AlexNet trunk file, on a machine with network and ../shared beside the checkout:
#   bash scripts/device_kit.sh              (-> .device/, about 10 MB, ignored by git)
# and carry .device with the checkout; the suite finds .device/wheels and the trunk file there.
# On a bare machine with no torch, prepare every wheel (same Python version and platform as the
# GPU machine) and pass --wheels DIR:
#   mkdir -p wheels
#   pip download --dest wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --index-url https://download.pytorch.org/whl/cu128 torch==<version in constraints.txt>
#   pip download --dest wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       numpy pillow scikit-learn tqdm ninja pytest pytorch-msssim
#   pip download --dest wheels --no-deps lpips==0.1.4      # installed with --no-deps (no torchvision)
# (torch's CUDA wheel pulls its nvidia-* runtime wheels into the same folder; about 3 GB.)
# Default WHEELS: $DEFECT_FAST_WHEELS, else ./.device/wheels, ./wheels, else ../shared/wheels.
# The CUDA build needs nvcc (CUDA_HOME or /usr/local/cuda); compute-sanitizer comes with it.
# AW-AE's LPIPS loss and the recommended step need the AlexNet trunk file: $DEFECT_FAST_ALEXNET_WEIGHTS,
# else ./.device/alexnet-features-imagenet.pth, else ../shared/weights/alexnet-features-imagenet.pth.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
WHEELS="${DEFECT_FAST_WHEELS:-}"
OUT=""
ARCHIVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --archive) ARCHIVE="$2"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -n "$OUT" ] && { echo "gpu_suite.sh: one OUTDIR only, got $OUT and $1" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] [--wheels DIR] OUTDIR" >&2; exit 2; }
# SUITE_SKIP's names must be steps of this script: a misspelt one ran its step (a build of minutes)
SUITE_SKIP=${SUITE_SKIP:-}
KNOWN_STEPS=" $(grep -oE '(^|[[:space:]])step [a-z_]+ [0-9]+ ' "$ROOT/benchmarks/gpu_suite.sh" | awk '!seen[$2]++ {print $2}' | tr '\n' ' ') "
for name in ${SUITE_SKIP//,/ }; do
  case $KNOWN_STEPS in
    *" $name "*) ;;
    *) echo "gpu_suite.sh: SUITE_SKIP names no step '$name' (the steps:$KNOWN_STEPS)" >&2; exit 2 ;;
  esac
done
# an earlier suite's results there would be summarised as this run's
if [ -e "$OUT/steps.tsv" ] || [ -n "$(ls -A "$OUT/results" 2>/dev/null)" ]; then
  echo "gpu_suite.sh: $OUT holds an earlier suite's output; give a new OUTDIR" >&2; exit 2
fi
mkdir -p "$OUT/logs" "$OUT/results" || { echo "gpu_suite.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
if [ -n "$ARCHIVE" ]; then
  case "$ARCHIVE" in *.tar.gz|*.tgz) ;; *) echo "gpu_suite.sh: --archive $ARCHIVE: name a .tar.gz or .tgz file" >&2; exit 2 ;; esac
  [ -e "$ARCHIVE" ] || [ -e "$ARCHIVE.part" ] && { echo "gpu_suite.sh: --archive $ARCHIVE exists; not replacing it" >&2; exit 2; }
  mkdir -p "$(dirname "$ARCHIVE")" || { echo "gpu_suite.sh: cannot create the folder of $ARCHIVE" >&2; exit 2; }
  ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")"
  case "$ARCHIVE" in "$OUT"/*) echo "gpu_suite.sh: --archive $ARCHIVE must lie outside OUTDIR" >&2; exit 2 ;; esac
fi
if [ -z "$WHEELS" ]; then
  for d in "$ROOT/.device/wheels" "$ROOT/wheels" "$ROOT/../shared/wheels"; do [ -d "$d" ] && { WHEELS=$d; break; }; done
fi

PY=${PYTHON:-python3}
SITE=${DEFECT_FAST_SITE:-${TMPDIR:-/tmp}/defect_fast_site}   # where the install step puts missing packages
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export DEFECT_FAST_RESULTS_DIR="$OUT/results"   # benchmarks write here, not into benchmarks/results/
export DEFECT_FAST_JIT=1                         # build from this checkout's csrc/, not an installed _C
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_NO_INDEX=1                            # the suite never reaches the network
export PYTHONUNBUFFERED=1                        # a step cut off at its limit keeps what it printed
# the CUDA toolkit the build compiles against: torch takes two folders above `which nvcc`, which is
# wrong where nvcc on PATH is a wrapper script (/usr/local/bin/nvcc -> /usr/local, no headers there)
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" "$(sed -n 's|^exec \(/.*\)/bin/nvcc .*|\1|p' "$(command -v nvcc)" 2>/dev/null | head -n 1)" /usr/local/cuda /usr/local/cuda-*; do
    [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ] && { export CUDA_HOME="$d"; break; }
  done
fi
if [ -z "${DEFECT_FAST_ALEXNET_WEIGHTS:-}" ]; then
  for f in "$ROOT/.device/alexnet-features-imagenet.pth" "$ROOT/../shared/weights/alexnet-features-imagenet.pth"; do
    [ -f "$f" ] && { export DEFECT_FAST_ALEXNET_WEIGHTS="$f"; break; }
  done
fi

START=$(date +%s)
DEADLINE=$((START + ${SUITE_SECONDS:-540}))      # 9 minutes for everything
MIN_STEP=15                                      # no step is started with less time left
STEPS_FILE="$OUT/steps.tsv"
: > "$STEPS_FILE"
SUMMARY_PY="$OUT/logs/summary.py"   # suite.json after every step, and the summary at the end
cat > "$SUMMARY_PY" <<'EOF'
import glob, json, os, sys
out, dry, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
json_only = len(sys.argv) > 4 and sys.argv[4] == "json"
steps = []
for line in open(os.path.join(out, "steps.tsv"), errors="replace"):
    fields = line.rstrip("\n").split("\t", 4)  # a line a command's tab or newline broke: kept as it reads
    name, status, secs, log, cmd = (fields + [""] * 5)[:5]
    steps.append({"step": name, "status": status or "unreadable", "seconds": int(secs) if secs.isdigit() else 0,
                  "log": log, "command": cmd})
def load(path):
    """A results file's payload, or the line saying why it cannot be read (a step killed while it
    wrote, a full disk): one unreadable file must not cost the summary and its verdict."""
    try:
        with open(path) as fh:
            return json.load(fh), None
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
env = load(os.path.join(out, "env.json"))[0] if os.path.exists(os.path.join(out, "env.json")) else {}
env = env if isinstance(env, dict) else {}
suite = {"dry_run": dry, "seconds": seconds, "env": env, "steps": steps,
         "results": sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "results", "*.json")))}
with open(os.path.join(out, ".suite.json.tmp"), "w") as fh:
    json.dump(suite, fh, indent=2)
os.replace(os.path.join(out, ".suite.json.tmp"), os.path.join(out, "suite.json"))
if json_only:
    sys.exit(0)

print("=" * 78)
print(f"gpu_suite {'DRY RUN' if dry else ''} in {seconds} s on {env.get('gpu') or env.get('cpu', '?')} (torch {env.get('torch', '?')})")
for s in steps:
    print(f"  {s['step']:14s} {s['status']:16s} {s['seconds']:4d} s")
def rows(payload):
    found = (payload.get("rows") or payload.get("cases") or []) if isinstance(payload, dict) else []
    return list(found.values()) if isinstance(found, dict) else found if isinstance(found, list) else []
for path in suite["results"]:
    payload, why = load(os.path.join(out, path))
    name = os.path.basename(path)
    lines = [f"    {why}"] if why else []
    for r in rows(payload)[:8]:
        if not isinstance(r, dict):
            continue
        keys = [k for k in r if any(t in k for t in ("speedup", "per_s", "ms_per_image", "ratio"))]
        # the ratios first, then the tuned side's figures (what the targets are about), then the rest
        keys.sort(key=lambda k: ("speedup" not in k, "tuned" not in k))
        if isinstance(r.get("native"), dict) and "median_ms" in r["native"]:
            r = dict(r, native_ms=r["native"]["median_ms"])
            keys.insert(0, "native_ms")
        label = " ".join(f"{k}={r[k]}" for k in ("model", "stage", "case", "pass", "batch", "images", "B", "N", "C", "dtype") if k in r)
        vals = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], (int, float)) else f"{k}={r[k]}" for k in keys[:4])
        lines.append(f"    {label} {vals}".rstrip())
    if isinstance(payload, dict) and isinstance(payload.get("ms_per_image"), dict):
        lines.append("    ms/image " + " ".join(f"{k}={v}" for k, v in payload["ms_per_image"].items()))
    print(f"  {name}")
    print("\n".join(lines) if lines else "    (see file)")
if not dry:
    print("  targets: CMA-AE 512x512 <= 1 ms/image at batch 1 (paper: 41.673 ms on an A100), >= 5000 images/s at 64;")
    print("           AW-SSIM fwd+bwd >= 5x reference and >= 3x pytorch-msssim; training >= 100000 patches/s (CMA-AE, 2048)")
bad = [s["step"] for s in steps if s["status"] not in ("ok", "listed", "unsupported", "absent", "foreign-races", "left-out")]
if "build" in bad and any(s["step"] == "build_more" and s["status"] == "ok" for s in steps):
    bad.remove("build")  # cut off at its limit, and finished in build_more
    print("  build: cut off at its limit, finished by build_more")
foreign = [s["step"] for s in steps if s["status"] == "foreign-races"]
if foreign:
    print(f"  {', '.join(foreign)}: hazards reported only in kernels outside defect_fast (PyTorch, cuBLAS); see the log")
refused = [s["step"] for s in steps if s["status"] == "unsupported"]
absent = [s["step"] for s in steps if s["status"] == "absent"]
if refused:
    print(f"  not checked: {', '.join(refused)} (compute-sanitizer does not support this machine's GPU runtime; see the logs)")
if absent:
    print(f"  not checked: {', '.join(absent)} (no compute-sanitizer on this machine)")
listed = [s["step"] for s in steps if s["status"] == "listed"]
left_out = [s["step"] for s in steps if s["status"] == "left-out"]
if left_out:
    print(f"  left out (SUITE_SKIP): {', '.join(left_out)}")
verdict = ("NOT ok: " + ", ".join(bad) if bad else
           f"the steps run are ok; not run here: {', '.join(listed + left_out)}" if listed or left_out else "all steps ok")
print(f"  suite.json: {os.path.join(out, 'suite.json')}; {verdict}")
print("=" * 78)
sys.exit(1 if bad else 0)
EOF

# step NAME BUDGET_S MODE CMD...   MODE: gpu (dry run lists it) | cpu (dry run executes it)
step() {
  local name=$1 budget=$2 mode=$3
  shift 3
  local log="$OUT/logs/$name.log"
  local skip=${SUITE_SKIP:-}
  case " ${skip//,/ } " in  # a second call on a warm machine: the steps an earlier call has shown
    *" $name "*)
      printf '%s\tleft-out\t0\t%s\t%s\n' "$name" "$log" "$*" >> "$STEPS_FILE"
      echo "  [left out]     $name: in SUITE_SKIP"
      return 0 ;;
  esac
  if [ "$DRY" = 1 ] && [ "$mode" = gpu ]; then
    printf '%s\tlisted\t0\t%s\t%s\n' "$name" "$log" "$*" >> "$STEPS_FILE"
    printf '  [gpu, not run] %-10s (%3ss) %s\n' "$name" "$budget" "$*"
    return 0
  fi
  local now left
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt "$MIN_STEP" ]; then  # a step started with a few seconds left is a sure timeout
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$log" "past the suite deadline ($left s left)" >> "$STEPS_FILE"
    echo "  [skipped]      $name: past the suite deadline ($left s left)"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$(basename "$1")" = compute-sanitizer ] && ! command -v "$1" >/dev/null; then  # not a kernel failure: not checked
    printf '%s\tabsent\t0\t%s\t%s\n' "$name" "$log" "$*" >> "$STEPS_FILE"
    echo "  [absent]       $name: no compute-sanitizer at $1"
    record
    return 0
  fi
  printf '  [run]          %-10s (<=%3ss) %s\n' "$name" "$budget" "$*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed(rc=$rc)" ;;
  esac
  # compute-sanitizer refuses the GPU under some container runtimes (gVisor: "Device not supported",
  # then error 999 at the first allocation): the machine cannot run the check, which says nothing
  # about the kernels; reported as such, not as a failed step
  if [ "$rc" != 0 ] && [ "$(basename "$1")" = compute-sanitizer ] && grep -q "Device not supported" "$log"; then
    status=unsupported
  fi
  # racecheck looks at every kernel, PyTorch's and cuBLAS's too: hazards it reports only outside
  # this project's kernels (none of its reports names defect_fast::) are said as such, not as ours;
  # only when the smoke test itself ran through (its last line) and a race was reported (the
  # summary line "0 hazards displayed" is always there, also after a crash)
  if [ "$name" = racecheck ] && [ "$status" = "failed(rc=1)" ] && grep -q "all ops agree with the reference" "$log" \
      && grep -qE "Race reported|hazard detected" "$log" \
      && ! grep -E "Race reported|hazard detected|access at" "$log" | grep -q "defect_fast"; then
    status=foreign-races
  fi
  # EXPECT=FILE (results/FILE): a step that ended well without its results file, or whose file
  # lists rows it skipped (a missing weights file, memory), did not show what it was for
  if [ "$status" = ok ] && [ -n "${EXPECT:-}" ]; then
    if [ ! -f "$OUT/results/$EXPECT" ]; then
      status="failed(no $EXPECT)"
    elif ! "$PY" -c 'import json, sys; sys.exit(1 if json.load(open(sys.argv[1])).get("skipped") else 0)' \
        "$OUT/results/$EXPECT" 2>/dev/null; then
      status="incomplete(skipped rows)"
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" "$*" >> "$STEPS_FILE"
  [ "$status" = ok ] || { echo "                 -> $status; last lines of $log:"; tail -n 5 "$log" | sed 's/^/                    /'; }
  record
  return 0
}

# OUTDIR/suite.json (and the --archive) after every step: a suite stopped from outside keeps it
record() {
  [ -f "$SUMMARY_PY" ] && "$PY" "$SUMMARY_PY" "$OUT" "$DRY" "$(( $(date +%s) - START ))" json >/dev/null 2>&1
  pack
}

# --archive: packed again after every step (a temporary file renamed over it), so a kill from
# outside the suite still leaves the steps before it to copy back
pack() {
  [ -n "$ARCHIVE" ] || return 0
  tar -czf "$ARCHIVE.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

echo "gpu_suite: $( [ "$DRY" = 1 ] && echo 'DRY RUN (CPU parts run, GPU parts listed)' || echo 'GPU run') -> $OUT"

# ---- env ---------------------------------------------------------------------------------
step env 30 cpu "$PY" - "$OUT/env.json" <<'EOF'
import json, os, platform, shutil, subprocess, sys
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"
info = {"python": platform.python_version(), "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
except ImportError as exc:
    info["torch"] = f"not importable: {exc}"
info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "absent"
info["nvcc"] = run(["nvcc", "--version"]).splitlines()[-1] if shutil.which("nvcc") else "absent"
info["nvcc_path"], info["cuda_home"] = shutil.which("nvcc"), os.environ.get("CUDA_HOME")  # what the build compiles with
info["compute_sanitizer"] = shutil.which("compute-sanitizer") or "absent"
cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")] if os.path.exists("/proc/cpuinfo") else []
info["cpu"] = cpu[0] if cpu else platform.processor()
info["load_average"] = list(os.getloadavg())
info["inherited_torch_cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")  # the build uses the visible GPU's
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

# ---- install (offline) ---------------------------------------------------------------------
# With torch + CUDA already importable (a GPU image), only the missing packages go in, each with
# --no-deps into $SITE (on PYTHONPATH above), and torch is never touched: its version there need
# not be the one constraints.txt pins for this repository's CPU machines. Without it, everything
# comes from the wheels folder under constraints.txt.
MISSING_PY="$OUT/logs/missing.py"
cat > "$MISSING_PY" <<'PY'
import importlib.util as u
needed = {"numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn", "tqdm": "tqdm", "ninja": "ninja",
          "pytest": "pytest", "pytorch_msssim": "pytorch-msssim==1.0.0", "lpips": "lpips==0.1.4"}
print(" ".join(pip for mod, pip in needed.items() if u.find_spec(mod) is None))
PY
FULL_INSTALL=(bash -c 'set -e; "$0" -m pip install --no-index --find-links "$1" -c constraints.txt torch numpy pillow scikit-learn tqdm ninja pytest pytorch-msssim; "$0" -m pip install --no-index --find-links "$1" --no-deps lpips==0.1.4' "$PY" "${WHEELS:-<no wheels folder>}")
if [[ " ${SUITE_SKIP//,/ } " == *" install "* ]]; then  # (its branches below write their own line)
  step install 0 cpu true
elif timeout 60 "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  read -r -a MISSING <<< "$("$PY" "$MISSING_PY")"
  if [ "${#MISSING[@]}" -eq 0 ]; then
    printf 'install\tok\t0\t-\talready installed (torch with CUDA imports)\n' >> "$STEPS_FILE"
    echo "  [ok]           install: torch with CUDA and the test dependencies already import"
  elif [ -z "$WHEELS" ]; then
    printf 'install\tfailed(no wheels)\t0\t-\tmissing: %s\n' "${MISSING[*]}" >> "$STEPS_FILE"
    echo "  [failed]       install: missing ${MISSING[*]} and no wheels folder (bash scripts/device_kit.sh, carry .device)"
  else
    # one at a time: a wheel that is not there fails its own install, not the others'
    step install 60 cpu bash -c 'rc=0; for p in "${@:3}"; do "$0" -m pip install -q --no-index --no-deps --find-links "$1" --target "$2" "$p" || rc=1; done; exit $rc' \
      "$PY" "$WHEELS" "$SITE" "${MISSING[@]}"
  fi
elif [ "$DRY" = 1 ]; then
  step install 60 gpu "${FULL_INSTALL[@]}"
elif [ -z "$WHEELS" ]; then
  printf 'install\tfailed(no wheels)\t0\t-\tno wheels folder\n' >> "$STEPS_FILE"
  echo "  [failed]       install: no wheels folder (--wheels DIR, \$DEFECT_FAST_WHEELS, ./.device/wheels, ./wheels or ../shared/wheels)"
else
  step install 90 gpu "${FULL_INSTALL[@]}"
fi

# ---- build ---------------------------------------------------------------------------------
BUILD_PY="$OUT/logs/build_check.py"
cat > "$BUILD_PY" <<'PY'
import json, sys, time
t = time.perf_counter()
from defect_fast.ops import _native
module, reason = _native.load()
info = {"loaded": module is not None, "reason": reason, "cuda": _native.has_cuda(), "cuda_reason": _native.cuda_reason(),
        "seconds": round(time.perf_counter() - t, 1)}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
sys.exit(0 if module is not None and (info["cuda"] or sys.argv[2] == "cpu") else 1)
PY
if [ "$DRY" = 1 ]; then
  step build_cpu 170 cpu "$PY" "$BUILD_PY" "$OUT/build.json" cpu
fi
# the kernels for the GPU that is here: an inherited TORCH_CUDA_ARCH_LIST (recorded in env.json)
# may name architectures this nvcc no longer builds, or many it need not
[ "$DRY" = 1 ] || unset TORCH_CUDA_ARCH_LIST
# the compiler's output in logs/build.log (a build cut off at its limit leaves no error log of its own)
step build 240 gpu env DEFECT_FAST_VERBOSE_BUILD=1 "$PY" "$BUILD_PY" "$OUT/build.json" cuda
# after the build step (its status in steps.tsv, or build_more's after it): BUILD_FAILED=1, and
# the kernels off for the later steps, when it failed; a build cut off at its limit is continued
# (ninja keeps the objects it compiled), so the kernels stay on: BUILD_CUT=1
after_build() {
  BUILD_FAILED=0 BUILD_CUT=0
  [ "$DRY" = 1 ] && return 0
  case "$(awk -F '\t' '$1 == "build" || $1 == "build_more" {s = $2} END {print s}' "$STEPS_FILE")" in
    ok|left-out) ;;  # (left out: built by an earlier call on this machine, or by the first step that needs it)
    timeout|skipped) BUILD_CUT=1  # (skipped: build_more at the deadline, as is every later step)
      echo "  [note]         the CUDA build ran past its limit: the next step's build goes on with it" ;;
    *) BUILD_FAILED=1
       export DEFECT_FAST_CUDA=0   # every later process would compile the failing kernels again, for minutes
       echo "  [note]         the CUDA build failed: later steps run without the CUDA kernels (DEFECT_FAST_CUDA=0)" ;;
  esac
}
after_build
# a build cut off goes on in a step of its own: one that then fails switches the kernels off here,
# where in the later steps each would compile them again, to fail again
if [ "$BUILD_CUT" = 1 ]; then
  step build_more 120 gpu env DEFECT_FAST_VERBOSE_BUILD=1 "$PY" "$BUILD_PY" "$OUT/build.json" cuda
  after_build
fi

# ---- the ops' own CUDA tests, before anything is timed on the kernels ------------------------
OP_TESTS=(tests/test_ops_aw_ssim.py tests/test_ops_memory_address.py tests/test_ops_msfr.py)
if [ "$BUILD_FAILED" = 1 ]; then  # every test would skip: not an ok
  printf 'tests_ops\tskipped\t0\t-\tthe CUDA build failed: no kernels to test\n' >> "$STEPS_FILE"
  echo "  [skipped]      tests_ops: the CUDA build failed, no kernels to test"
else
  step tests_ops 60 gpu "$PY" -m pytest -v -p no:cacheprovider -m cuda --junitxml="$OUT/tests_cuda_ops.xml" "${OP_TESTS[@]}"
fi

# ---- memcheck on the ops' smoke test, also before anything is timed --------------------------
if [ "$DRY" = 1 ]; then
  step op_smoke_cpu 60 cpu "$PY" benchmarks/gpu_op_smoke.py --device cpu
fi
# on PATH, else beside nvcc (the build finds nvcc through CUDA_HOME even when PATH lacks it)
SANITIZER=$(command -v compute-sanitizer || for f in "${CUDA_HOME:-/usr/local/cuda}"/{bin,compute-sanitizer}/compute-sanitizer; do
  [ -x "$f" ] && { echo "$f"; break; }; done)
SANITIZER=${SANITIZER:-${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer}
step memcheck 60 gpu "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu_op_smoke.py --device cuda

# ---- benchmarks ----------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  EXPECT=memory_address_cpu.json step bench_ma_cpu 30 cpu "$PY" benchmarks/bench_memory_address.py --device cpu --rounds 1
  EXPECT=aw_ssim_cpu.json step bench_ssim_cpu 30 cpu "$PY" benchmarks/bench_aw_ssim.py --device cpu --batches 4 --rounds 1
  EXPECT=msfr_cpu.json step bench_msfr_cpu 30 cpu "$PY" benchmarks/bench_msfr.py --device cpu --rounds 1
  EXPECT=train_cpu.json step train_cpu 60 cpu "$PY" benchmarks/bench_train.py --device cpu --models cmaae --batch 4 --steps 1 --warmup 0 --image-size 128
  EXPECT=inference_cpu.json step inference_cpu 90 cpu "$PY" benchmarks/bench_inference.py --device cpu --batch 1 2 --rounds 1
  EXPECT=context_cpu.json step recommended_cpu 120 cpu "$PY" benchmarks/bench_context.py --device cpu --batch 2 --rounds 1 --fit-images 20
fi
# in the order of what the bars ask first: the 512x512 inference, AW-SSIM, training throughput, the
# other two ops; then the cuda tests, the recommended run's inference and racecheck (a suite cut
# short by its deadline loses the last steps)
EXPECT=inference_cuda.json step inference 75 gpu "$PY" benchmarks/bench_inference.py --device cuda ${INFERENCE_ARGS:---batch 1 8 64 --rounds 10}
EXPECT=aw_ssim_cuda.json step bench_ssim 50 gpu "$PY" benchmarks/bench_aw_ssim.py --device cuda --batches 64,512 --rounds 10
EXPECT=train_cuda.json step train 100 gpu "$PY" benchmarks/bench_train.py --device cuda --batch 2048 --steps 5
EXPECT=memory_address_cuda.json step bench_ma 40 gpu "$PY" benchmarks/bench_memory_address.py --device cuda --rounds 20
EXPECT=msfr_cuda.json step bench_msfr 40 gpu "$PY" benchmarks/bench_msfr.py --device cuda --rounds 20

# ---- tests ---------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  step tests_collect 60 cpu "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests/
fi
# -v: each test's line is in the log as it ends (the XML is written only when pytest finishes)
step tests 120 gpu "$PY" -m pytest -v -p no:cacheprovider -m cuda --continue-on-collection-errors --junitxml="$OUT/tests_cuda.xml" \
  "${OP_TESTS[@]/#/--ignore=}" tests/

# ---- the recommended run's inference, cuDNN's heuristics ------------------------------------
EXPECT=context_cuda.json step recommended 70 gpu "$PY" benchmarks/bench_context.py --device cuda --batch 64 --rounds 10 --fit-images 100
# the tuned path with cuDNN's heuristics instead of its timed search (the Detector's cudnn_benchmark
# default on CUDA): a separate process, since cuDNN keeps the first plan it finds for a shape
EXPECT=inference_cuda_cudnn_heuristics.json step inference_heur 45 gpu "$PY" benchmarks/bench_inference.py --device cuda --batch 1 64 --rounds 5 \
  --cudnn-benchmark off --out "$DEFECT_FAST_RESULTS_DIR/inference_cuda_cudnn_heuristics.json"

# ---- racecheck (last: the slow sanitizer takes no time from the measurements) ----------------
step racecheck 60 gpu "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" benchmarks/gpu_op_smoke.py --device cuda

# ---- summary -------------------------------------------------------------------------------
"$PY" "$SUMMARY_PY" "$OUT" "$DRY" "$(( $(date +%s) - START ))"
RC=$?
if [ -n "$ARCHIVE" ]; then
  pack && echo "gpu_suite: packed $OUT into $ARCHIVE" || { echo "gpu_suite: could not pack $OUT into $ARCHIVE" >&2; RC=1; }
fi
exit $RC
