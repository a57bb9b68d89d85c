#!/usr/bin/env bash
# The AE-SSIM baseline's anomaly map: 1 - SSIM (Bergmann et al. 2018, its own paper; the
# baseline's default) against the pixel residual (the baseline's map before), on the same
# weights: the papers' budget here (256 px, batches of 64, 2 epochs, seed 0), evaluated with each.
# Restartable: a trained run is not trained again, a results file that exists is kept.
#
#   [RESULTS_DIR=DIR] bash experiments/ae_ssim_map.sh [DATA] [OUT]
#
# Results go to experiments/results/ae-ssim-map, or to $RESULTS_DIR (experiments/README.md, "Rerunning a row").
set -uo pipefail
START=$PWD
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/magnetic-tile}
OUT=${2:-runs/ae-ssim-map}
source experiments/lib.sh
RES=$(results_dir experiments/results/ae-ssim-map)
mkdir -p "$OUT" "$RES"
run=$OUT/ae-ssim-s0
train_or_resume "$run" --model ae-ssim --seed 0 --epochs 2 --image-size 256 --batch-size 64 \
  --checkpoint-every 100 --quiet || exit 1
for map in ssim residual; do
  evaluate "$run" "$map" --map "$map" || exit 1
done
