#!/usr/bin/env bash
# CMA-AE's stage-two anomalies: GAAGA as the paper specifies it (--set synthesis=paper-exact: a
# natural-photo and a blurred normal square in every image, each half the image side) against
# GAAGA's defaults here (synthesis=paper: each image draws its patch kinds, sides 1/16..1/4) and
# the Perlin anomalies of the recommended command (synthesis=perlin). Each with the recommended
# command (--preset photos, seed 0, as placement.sh) and with the papers' settings (no preset).
# Restartable: a run whose model.pt exists is not trained again, an interrupted one is resumed, a
# results file that exists is kept.
#
# Results go to experiments/results/gaaga-rule, or to $RESULTS_DIR (experiments/README.md, "Rerunning
# a row"). Exit status 1 when any training or evaluation failed (the other runs go on).
#
#   [RESULTS_DIR=DIR] bash experiments/gaaga_rule.sh [DATA] [OUT]
set -uo pipefail
START=$PWD
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/magnetic-tile}
OUT=${2:-runs/gaaga-rule}
source experiments/lib.sh
RES=$(results_dir experiments/results/gaaga-rule)
mkdir -p "$OUT" "$RES"
failed=0

# (photos-perlin is placement.sh's cmaae-s0 run, the same command: last, as the reference)
for spec in "photos paper-exact" "photos paper" "papers paper-exact" "papers paper" "photos perlin"; do
  set -- $spec
  setting=$1 synthesis=$2 name=$1-$2 run=$OUT/$1-$2
  preset=()
  [ "$setting" = photos ] && preset=(--preset photos)
  train_or_resume "$run" --model cmaae --seed 0 --epochs 1 1 --image-size 256 --batch-size 64 \
    --checkpoint-every 100 --quiet "${preset[@]}" --set "synthesis=$synthesis" || { failed=1; continue; }
  evaluate "$run" "$name" || failed=1
done
exit $failed
