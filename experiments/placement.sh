#!/usr/bin/env bash
# Where the perceptual map and the image context put the AlexNet feature cells on the image
# (defect_fast/perceptual.py, PLACEMENTS): "cells", a resize by size alone (the default), against
# "centres", each cell on its receptive field's centre, paired on the same weights. The runs are
# the recommended command's (--preset photos, as the v7 rows of magnetic_tile_v2.sh): CMA-AE
# seeds 0-2, the AW-SSIM AE and MemAE seed 0, trained with the default and evaluated; then a copy
# of each with its statistics and thresholds refitted with --placement centres
# (experiments/refit_run.py; the weights untouched), evaluated.
# Restartable: a run whose model.pt exists is not trained again, an interrupted one is resumed, a
# results file that exists is kept.
#
# Results go to experiments/results/placement, or to $RESULTS_DIR (experiments/README.md, "Rerunning
# a row"). Exit status 1 when any training, refit or evaluation failed (the other runs go on).
#
#   [RESULTS_DIR=DIR] bash experiments/placement.sh [DATA] [OUT]
set -uo pipefail
START=$PWD
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/magnetic-tile}
OUT=${2:-runs/placement}
source experiments/lib.sh
RES=$(results_dir experiments/results/placement)
mkdir -p "$OUT" "$RES"
failed=0

for spec in "cmaae 0 1 1" "cmaae 1 1 1" "cmaae 2 1 1" "awae 0 1 1" "memae 0 2"; do
  set -- $spec
  model=$1 seed=$2
  shift 2
  name=$model-s$seed run=$OUT/$model-s$seed
  train_or_resume "$run" --model "$model" --seed "$seed" --epochs "$@" --image-size 256 --batch-size 64 \
    --checkpoint-every 100 --quiet --preset photos || { failed=1; continue; }
  evaluate "$run" "$name-cells" || failed=1
  if [ ! -f "$OUT/$name-centres/model.pt" ]; then
    rm -rf "$OUT/$name-centres.tmp" && cp -r "$run" "$OUT/$name-centres.tmp" && rm -f "$OUT/$name-centres.tmp/.defect_fast.lock" || { failed=1; continue; }
    python3 experiments/refit_run.py "$OUT/$name-centres.tmp" --placement centres || { failed=1; continue; }
    rm -rf "$OUT/$name-centres" && mv "$OUT/$name-centres.tmp" "$OUT/$name-centres" || { failed=1; continue; }
  fi
  evaluate "$OUT/$name-centres" "$name-centres" || failed=1  # record: the weights' training (TRAIN_ARGV)
done

# summary.json: made again from every pair in $RES, replaced whole (atomically) on each run
python3 - "$RES" <<'PY' || failed=1
import json, pathlib, sys
sys.path.insert(0, "experiments")
from results_file import replace_text
res = pathlib.Path(sys.argv[1])
rows = []
for cells in sorted(res.glob("*-cells.json")):
    centres = cells.with_name(cells.name.replace("-cells", "-centres"))
    if not centres.exists():
        continue
    a, b = json.loads(cells.read_text()), json.loads(centres.read_text())
    keys = ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max")
    rows.append({"run": cells.name[:-len("-cells.json")], **{k: [round(100 * a[k], 2), round(100 * b[k], 2)] for k in keys},
                 "uneven_pixel_auroc": [round(100 * a["per_class"]["uneven"]["pixel_auroc"], 2),
                                        round(100 * b["per_class"]["uneven"]["pixel_auroc"], 2)]})
    print(rows[-1]["run"], " ".join(f"{k} {v[0]:.2f} -> {v[1]:.2f}" for k, v in rows[-1].items() if k != "run"))
replace_text(res / "summary.json", json.dumps({"cells -> centres": rows}, indent=1) + "\n")
PY
exit $failed
