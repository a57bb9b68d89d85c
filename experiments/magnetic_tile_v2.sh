#!/usr/bin/env bash
# The magnetic-tile comparison with the options that fix what the diagnosis showed (see
# experiments/README.md, "Detecting real defects"): the same budget as experiments/magnetic_tile.sh (256x256 images,
# batches of 64 patches, 1 + 1 epochs for two-stage models, 2 for one-stage ones), plus
#   --patch-sampling random --flips --lr-schedule cosine   (training patches anywhere, no seams)
#   --set synthesis=perlin                                (irregular synthetic anomalies, two-stage models)
#   --map perceptual                                      (AlexNet-trunk MSFR, defect-free statistics)
#   --infer-stride 32 --blend hann --smooth 4             (overlapping, seam-free inference)
# 10 % of train/good is held back (never trained on) for the thresholds.
# Rows -v2: the perceptual map with one level, fitted on half of the held-back images
# (--fit-on held-back --map-scales 1). Rows -v3: the defaults since, statistics from the training
# images and a two-level pyramid (--fit-on train --map-scales 1 2); the -v3-* ablations refit the
# statistics of the cmaae-v3 model (weights untouched) with one setting changed.
# Restartable: a run whose metrics JSON exists is skipped; an interrupted training is resumed (one
# killed before its first checkpoint starts again from its config.json).
#
#   [RESULTS_DIR=DIR] bash experiments/magnetic_tile_v2.sh [DATA] [OUT] [ROWS...]
#
# Metrics go to experiments/results/magnetic-tile/<name>.json, or to $RESULTS_DIR/<name>.json
# (experiments/README.md, "Rerunning a row"). ROWS are the names of the case list at the end; an
# unknown one stops the script before anything runs (exit status 2). Exit status 1 when any
# training, refit or evaluation failed, or a row's source runs are not in OUT (the other rows go
# on); Ctrl-C stops it (130).
set -uo pipefail
START=$PWD
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/magnetic-tile}
OUT=${2:-runs/magnetic-tile}
shift $(( $# < 2 ? $# : 2 ))  # (DATA alone: "shift 2" shifted nothing, and DATA was taken for a row)
source experiments/lib.sh  # DF, the AlexNet weights, results_dir, needs_resume (evaluate is this script's own, below)
RES=$(results_dir experiments/results/magnetic-tile)
mkdir -p "$OUT" "$RES"
DRY=  # set while the row names are checked: run, evaluate and refit then do nothing
COMMON=(--image-size 256 --batch-size 64 --checkpoint-every 100 --quiet)
NEW=(--patch-sampling random --flips --lr-schedule cosine --map perceptual --infer-stride 32 --blend hann --smooth 4)
V2=(--fit-on held-back --map-scales 1)

run() {  # name model seed epochs-per-stage... -- extra train args...
  [ -n "$DRY" ] && return
  local name=$1 model=$2 seed=$3; shift 3
  local epochs=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do epochs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  extra=("$@")
  [ -f "$RES/$name.json" ] && { echo "skip $name (done)"; return; }
  echo "== $name: $model seed $seed epochs ${epochs[*]} ${extra[*]}"
  # what the run is started with; a run stopped before its model file is resumed from its own
  # config.json or checkpoint (the same arguments, when this script started it)
  TRAIN_ARGV=("$DATA" --out "$OUT/$name" --model "$model" --seed "$seed" --epochs "${epochs[@]}" "${COMMON[@]}" "${extra[@]}")
  local t0=$(date +%s)
  if needs_resume "$OUT/$name"; then
    "${DF[@]}" train "$DATA" --out "$OUT/$name" --resume --quiet || { failed=1; return; }
  elif [ ! -f "$OUT/$name/model.pt" ]; then
    "${DF[@]}" train "${TRAIN_ARGV[@]}" || { failed=1; return; }
  fi
  local t1=$(date +%s)
  evaluate "$name" "$name" "$model" "$((t1 - t0))" "${epochs[*]} ${extra[*]}"
}

# evaluate JSON-NAME RUN-NAME MODEL TRAIN-SECONDS TRAIN-ARGS [EVALUATE-OPTIONS...]: $RES/JSON-NAME.json,
# with the record of the run (train_args: TRAIN-ARGS as the rows have it; train_argv: TRAIN_ARGV, the
# full arguments of the training, null for the rows that refit or re-map a trained run; refit_of:
# $REFIT_OF, the run a refit row copied), the package version and git commit; written atomically
# (experiments/results_file.py)
evaluate() {
  [ -n "$DRY" ] && return
  local name=$1 runname=$2 model=$3 secs=$4 targs=$5; shift 5
  [ -f "$RES/$name.json" ] && return
  [ -f "$OUT/$runname/model.pt" ] || { echo "$name: not done: $runname is not trained in $OUT (run its row first)" >&2; failed=1; return; }
  "${DF[@]}" evaluate "$OUT/$runname" "$DATA" --json "$RES/$name.tmp" --overwrite "$@" || { failed=1; return; }
  python3 - "$RES/$name.tmp" "$RES/$name.json" "$model" "$secs" "$targs" "$*" "$OUT/$runname" "${TRAIN_ARGV[@]}" <<'PY'
import json, os, platform, sys, torch
sys.path.insert(0, "experiments")
from results_file import provenance, write_text
src, dst, model, secs, targs, eargs, run, *train_argv = sys.argv[1:]
m = json.load(open(src))
state = torch.load(f"{run}/model.pt", map_location="cpu", weights_only=True)
from defect_fast.detect import cpu_flags, default_precision
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
bf16 = "+".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})) or "no bf16 instructions"
m.update(model=model, train_seconds=state.get("train_seconds"), finish_seconds=state.get("finish_seconds"),
         train_seconds_wall=int(secs) or None,
         train_args=targs, evaluate_args=eargs, hardware=f"{cpu} ({bf16}), {torch.get_num_threads()} threads, torch {torch.__version__}",
         train_precision=state.get("train_precision", "float32"), inference_precision=default_precision("cpu"),
         train_argv=train_argv or None, refit_of=os.environ.get("REFIT_OF") or None, **provenance())
dst = write_text(dst, json.dumps(m, indent=2))
print(f"{dst}: pixel AUROC {m['pixel_auroc']:.4f} image AUROC {m['image_auroc']:.4f}")
PY
  local rc=$?
  rm -f "$RES/$name.tmp"
  [ $rc -eq 0 ] || failed=1
  return $rc
}

refit() {  # name source-run refit-options...: a copy of source-run with its map statistics refitted
  [ -n "$DRY" ] && return
  TRAIN_ARGV=()  # not trained here: the source run's training is in its own record
  local name=$1 src=$2; shift 2
  [ -f "$RES/$name.json" ] && { echo "skip $name (done)"; return; }
  # (a row whose source is missing did nothing, and the script ended with status 0)
  [ -f "$OUT/$src/model.pt" ] || { echo "$name: not done: $src is not trained in $OUT (run its row first)" >&2; failed=1; return; }
  rm -rf "$OUT/$name.tmp" && cp -r "$OUT/$src" "$OUT/$name.tmp" && rm -f "$OUT/$name.tmp/.defect_fast.lock" || { failed=1; return; }
  python3 experiments/refit_run.py "$OUT/$name.tmp" "$@" || { failed=1; return; }
  rm -rf "$OUT/$name" && mv "$OUT/$name.tmp" "$OUT/$name" || { failed=1; return; }
  REFIT_OF="$OUT/$src" evaluate "$name" "$name" "$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['model'])" "$OUT/$name/config.json")" 0 "refit $*"
}

row() {  # ROW: the runs of one row name; status 2 for a name not in the list
  case $1 in
    cmaae-v2)    run cmaae-v2 cmaae 0 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    cmaae-v2-s1) run cmaae-v2-s1 cmaae 1 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    cmaae-v2-s2) run cmaae-v2-s2 cmaae 2 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    awae-v2)     run awae-v2 awae 0 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    awae-v2-s1)  run awae-v2-s1 awae 1 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    awae-v2-s2)  run awae-v2-s2 awae 2 1 1 -- "${NEW[@]}" "${V2[@]}" --set synthesis=perlin ;;
    cmaae-v3)    run cmaae-v3 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    cmaae-v3-s1) run cmaae-v3-s1 cmaae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    cmaae-v3-s2) run cmaae-v3-s2 cmaae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    awae-v3)     run awae-v3 awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    awae-v3-s1)  run awae-v3-s1 awae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    awae-v3-s2)  run awae-v3-s2 awae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    cmaae-v3-e5) run cmaae-v3-e5 cmaae 0 5 5 -- "${NEW[@]}" --set synthesis=perlin ;;  # 5x the epochs
    # learning curve in the normal stage (stage 2 kept at one epoch)
    cmaae-v3-e2) run cmaae-v3-e2 cmaae 0 2 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    cmaae-v3-e4) run cmaae-v3-e4 cmaae 0 4 1 -- "${NEW[@]}" --set synthesis=perlin ;;
    # bottleneck width (Table I: 512), same budget as cmaae-v3
    cmaae-v3-latent128)  run cmaae-v3-latent128 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --set latent=128 ;;
    cmaae-v3-latent2048) run cmaae-v3-latent2048 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --set latent=2048 ;;
    # the paper's batch of 512 patches: the same patches (1 + 1 epochs, 8x fewer steps), and the same
    # number of normal-stage steps as cmaae-v3 (8 + 1 epochs)
    cmaae-v3-b512)    run cmaae-v3-b512 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --batch-size 512 ;;
    cmaae-v3-b512-e8) run cmaae-v3-b512-e8 cmaae 0 8 1 -- "${NEW[@]}" --set synthesis=perlin --batch-size 512 ;;
    # training precision (a CPU with AVX512-BF16 or AMX): the cmaae-v3 / awae-v3 runs in float32 and in
    # bfloat16 on the same machine (the -v3 rows above come from a CPU without bf16 instructions)
    cmaae-v3-f32-same-cpu) run cmaae-v3-f32-same-cpu cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision float32 ;;
    cmaae-v3-bf16)         run cmaae-v3-bf16 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision bfloat16 ;;
    cmaae-v3-f32-same-cpu-s1) run cmaae-v3-f32-same-cpu-s1 cmaae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision float32 ;;
    cmaae-v3-f32-same-cpu-s2) run cmaae-v3-f32-same-cpu-s2 cmaae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision float32 ;;
    cmaae-v3-bf16-s1)      run cmaae-v3-bf16-s1 cmaae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision bfloat16 ;;
    cmaae-v3-bf16-s2)      run cmaae-v3-bf16-s2 cmaae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision bfloat16 ;;
    awae-v3-f32-same-cpu)  run awae-v3-f32-same-cpu awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision float32 ;;
    awae-v3-bf16)          run awae-v3-bf16 awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --precision bfloat16 ;;
    # the image context score (--context, defect_fast/context.py): rows -v4 train with it
    # (bfloat16 where the CPU has it: --precision auto); the -context rows refit the bf16 runs above with it
    cmaae-v4)    run cmaae-v4 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    cmaae-v4-s1) run cmaae-v4-s1 cmaae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    cmaae-v4-s2) run cmaae-v4-s2 cmaae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    awae-v4)     run awae-v4 awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    awae-v4-s1)  run awae-v4-s1 awae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    awae-v4-s2)  run awae-v4-s2 awae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    # the same AW-SSIM AE rows after the SSIM-family losses took their images shifted to [0, 2]
    # (the luminance term needs intensities from 0); the rows above were trained before that
    awae-v4-lum)    run awae-v4-lum awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context ;;
    awae-paper-lum) run awae-paper-lum awae 0 1 1 ;;
    v3-bf16-context)
      refit cmaae-v3-bf16-context cmaae-v3-bf16 --context
      refit cmaae-v3-bf16-s1-context cmaae-v3-bf16-s1 --context
      refit cmaae-v3-bf16-s2-context cmaae-v3-bf16-s2 --context
      refit awae-v3-bf16-context awae-v3-bf16 --context ;;
    v3-f32-context)  # the float32 runs of the same CPU, with the context (what a CPU without bf16 trains)
      refit cmaae-v3-f32-same-cpu-context cmaae-v3-f32-same-cpu --context
      refit cmaae-v3-f32-same-cpu-s1-context cmaae-v3-f32-same-cpu-s1 --context
      refit cmaae-v3-f32-same-cpu-s2-context cmaae-v3-f32-same-cpu-s2 --context
      refit awae-v3-f32-same-cpu-context awae-v3-f32-same-cpu --context ;;
    cmaae-v3-ablations)
      refit cmaae-v3-one-scale cmaae-v3 --map-scales 1
      refit cmaae-v3-fit-held-back cmaae-v3 --fit-on held-back
      refit cmaae-v3-three-scales cmaae-v3 --map-scales 1 2 4 ;;
    # the same trained models with the paper's maps (ablation of the map alone)
    cmaae-v2-maps)
      TRAIN_ARGV=()
      evaluate cmaae-v2-msfr-overlap cmaae-v2 cmaae 0 "" --map msfr
      evaluate cmaae-v2-msfr-tiles cmaae-v2 cmaae 0 "" --map msfr --stride 64 --blend none --smooth 0
      evaluate awae-v2-residual-overlap awae-v2 awae 0 "" --map residual ;;
    ae-l2-v2)    run ae-l2-v2 ae-l2 0 2 -- "${NEW[@]}" ;;
    memae-v2)    run memae-v2 memae 0 2 -- "${NEW[@]}" ;;
    ae-ssim-v2)  run ae-ssim-v2 ae-ssim 0 2 -- "${NEW[@]}" ;;
    # the baselines with everything the v4 rows have (one stage, 2 epochs, the same map and context)
    ae-l2-v4)    run ae-l2-v4 ae-l2 0 2 -- "${NEW[@]}" --context ;;
    memae-v4)    run memae-v4 memae 0 2 -- "${NEW[@]}" --context ;;
    ae-ssim-v4)  run ae-ssim-v4 ae-ssim 0 2 -- "${NEW[@]}" --context ;;
    # the band profile (--context-profile rows; defect_fast/context.py, "Profile"): the v4 options plus it;
    # the -no-profile rows refit the same weights without it (the v4 rows of the CPU these ran on)
    cmaae-v5)    run cmaae-v5 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    cmaae-v5-s1) run cmaae-v5-s1 cmaae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    cmaae-v5-s2) run cmaae-v5-s2 cmaae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    awae-v5)     run awae-v5 awae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    awae-v5-s1)  run awae-v5-s1 awae 1 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    awae-v5-s2)  run awae-v5-s2 awae 2 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows ;;
    memae-v5)    run memae-v5 memae 0 2 -- "${NEW[@]}" --context --context-profile rows ;;
    v5-no-profile)
      refit cmaae-v5-no-profile cmaae-v5 --context-profile none
      refit cmaae-v5-s1-no-profile cmaae-v5-s1 --context-profile none
      refit cmaae-v5-s2-no-profile cmaae-v5-s2 --context-profile none
      refit awae-v5-no-profile awae-v5 --context-profile none
      refit awae-v5-s1-no-profile awae-v5-s1 --context-profile none
      refit awae-v5-s2-no-profile awae-v5-s2 --context-profile none
      refit memae-v5-no-profile memae-v5 --context-profile none ;;
    cmaae-v5-f32) run cmaae-v5-f32 cmaae 0 1 1 -- "${NEW[@]}" --set synthesis=perlin --context --context-profile rows --precision float32 ;;
    v5-columns)  # the profile along the streaks instead of across them: the picture says it should not help
      refit cmaae-v5-columns cmaae-v5 --context-profile columns ;;
    # v6: the recommended command (--preset photos: the v5 options with --context-profile auto, which
    # takes rows here), whose image score takes its top values from the map without the band profile
    # (defect_fast/context.py); training is that of the v5 rows, so v5 and v6 share their weights
    # (--no-level-brightness: the preset since v7 levels the brightness)
    cmaae-v6)    run cmaae-v6 cmaae 0 1 1 -- --preset photos --no-level-brightness ;;
    cmaae-v6-s1) run cmaae-v6-s1 cmaae 1 1 1 -- --preset photos --no-level-brightness ;;
    cmaae-v6-s2) run cmaae-v6-s2 cmaae 2 1 1 -- --preset photos --no-level-brightness ;;
    awae-v6)     run awae-v6 awae 0 1 1 -- --preset photos --no-level-brightness ;;
    awae-v6-s1)  run awae-v6-s1 awae 1 1 1 -- --preset photos --no-level-brightness ;;
    awae-v6-s2)  run awae-v6-s2 awae 2 1 1 -- --preset photos --no-level-brightness ;;
    memae-v6)    run memae-v6 memae 0 2 -- --preset photos --no-level-brightness ;;
    cmaae-v6-f32) run cmaae-v6-f32 cmaae 0 1 1 -- --preset photos --no-level-brightness --precision float32 ;;
    # v7: the recommended command (--preset photos: the v6 options with --level-brightness, which
    # scales every image to the training images' mean brightness before the AlexNet trunk of the map
    # and the context; defect_fast/perceptual.py, "Brightness"); training is that of the v6 rows
    cmaae-v7)    run cmaae-v7 cmaae 0 1 1 -- --preset photos ;;
    cmaae-v7-s1) run cmaae-v7-s1 cmaae 1 1 1 -- --preset photos ;;
    cmaae-v7-s2) run cmaae-v7-s2 cmaae 2 1 1 -- --preset photos ;;
    awae-v7)     run awae-v7 awae 0 1 1 -- --preset photos ;;
    awae-v7-s1)  run awae-v7-s1 awae 1 1 1 -- --preset photos ;;
    awae-v7-s2)  run awae-v7-s2 awae 2 1 1 -- --preset photos ;;
    memae-v7)    run memae-v7 memae 0 2 -- --preset photos ;;
    cmaae-v7-f32) run cmaae-v7-f32 cmaae 0 1 1 -- --preset photos --precision float32 ;;
    # the preset at the package's default image size (512 px): the same steps of 64-px patches,
    # maps and statistics on four times the pixels (the resolution control of native_scale_probe.py)
    cmaae-v7-512) run cmaae-v7-512 cmaae 0 1 1 -- --preset photos --image-size 512 ;;
    # the v7 weights refitted without the band profile (v4's options, levelled): the AUPRO the profile costs now
    v7-no-profile)
      refit cmaae-v7-no-profile cmaae-v7 --context-profile none
      refit cmaae-v7-s1-no-profile cmaae-v7-s1 --context-profile none
      refit cmaae-v7-s2-no-profile cmaae-v7-s2 --context-profile none ;;
    # the v7 weights refitted with the context score alone as the image score (maps unchanged)
    v7-context-score)
      refit cmaae-v7-context-score cmaae-v7 --image-score context
      refit cmaae-v7-s1-context-score cmaae-v7-s1 --image-score context
      refit cmaae-v7-s2-context-score cmaae-v7-s2 --image-score context
      refit awae-v7-context-score awae-v7 --image-score context ;;
    # the v7 weights with this version's context fit: the band profile reads conv1 through its
    # pool geometry instead of a bilinear resize that skipped some of its rows (v8)
    v8)
      refit cmaae-v8 cmaae-v7
      refit cmaae-v8-s1 cmaae-v7-s1
      refit cmaae-v8-s2 cmaae-v7-s2
      refit awae-v8 awae-v7
      refit awae-v8-s1 awae-v7-s1
      refit awae-v8-s2 awae-v7-s2
      refit memae-v8 memae-v7 ;;
    *) return 2 ;;
  esac
}

ROWS=${*:-"cmaae-v2 awae-v2 cmaae-v2-maps cmaae-v2-s1 cmaae-v2-s2 awae-v2-s1 awae-v2-s2 ae-l2-v2 memae-v2 ae-ssim-v2"}
DRY=1
for r in $ROWS; do
  row "$r"
  [ $? -eq 2 ] && { echo "magnetic_tile_v2.sh: unknown row '$r' (the row names are the case list at the end of the script)" >&2; exit 2; }
done
DRY=
failed=0  # set by run, refit and evaluate when a training, refit or evaluation fails (the other rows go on)
for r in $ROWS; do
  row "$r"
done
[ $failed -eq 0 ] || echo "magnetic_tile_v2.sh: a training, refit or evaluation failed (above); the rows that finished are written" >&2
exit $failed
