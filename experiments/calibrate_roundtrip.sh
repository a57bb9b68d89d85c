#!/bin/bash
# `calibrate RUN --with-held-back` on a finished run gives back its stored thresholds: the same
# held-back images, scored again by the loaded Detector (other batches than training's), set them.
# Writes experiments/results/calibrate-roundtrip/<name>.json (or $RESULTS_DIR/<name>.json:
# experiments/README.md, "Rerunning a row"): the stored and the recalibrated image and pixel
# thresholds and their relative differences. Restartable: a finished name is skipped.
#
#   [RESULTS_DIR=DIR] bash experiments/calibrate_roundtrip.sh RUN [NAME]     # RUN: a run trained with held-back images
set -uo pipefail
START=$PWD
cd "$(dirname "$0")/.."
RUN=${1:?usage: calibrate_roundtrip.sh RUN [NAME]}
NAME=${2:-$(basename "$RUN")}
source experiments/lib.sh
RES=$(results_dir experiments/results/calibrate-roundtrip)
mkdir -p "$RES"
[ -f "$RES/$NAME.json" ] && { echo "skip $NAME (done)"; exit 0; }
OUT=$(mktemp -d)/calibrated
trap 'rm -rf "$(dirname "$OUT")"' EXIT
"${DF[@]}" calibrate "$RUN" --with-held-back --out "$OUT" || exit 1
python3 - "$OUT/calibration.json" "$RES/$NAME.json" "$RUN" "$NAME" <<'PY' || exit 1
import json, sys
from pathlib import Path

sys.path.insert(0, "experiments")
from results_file import provenance, write_text

cal, out, run, name = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
config = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").is_file() else {}
doc = {"run": run, "command": f"bash experiments/calibrate_roundtrip.sh {run} {name}",
       "trained_with": {k: config.get(k) for k in ("model", "seed", "image_size", "epochs", "map", "context",
                                                  "level_brightness", "model_kwargs")}}
for key in ("image_threshold", "pixel_threshold"):
    before, after = cal["before"][key], cal["after"][key]
    doc[key] = {"stored": before, "recalibrated": after, "relative_difference": abs(after - before) / abs(before)}
doc["n_images"] = {"stored": cal["before"]["n_images"], "recalibrated": cal["after"]["n_images"]}
doc.update(provenance())
write_text(out, json.dumps(doc, indent=1) + "\n")
print(json.dumps(doc, indent=1))
PY
