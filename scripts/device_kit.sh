#!/usr/bin/env bash
# Prepares, on a machine with network and ../shared beside the checkout, the folder a GPU machine
# with no network needs beside the checkout to run benchmarks/gpu_suite.sh:
#   DIR/wheels/   lpips 0.1.4 and pytorch-msssim 1.0.0, two pure-Python wheels (about 60 kB): what
#                 a GPU image that already holds torch with CUDA, numpy, scikit-learn, pytest, ninja
#                 and tqdm lacks (lpips goes in with --no-deps: torchvision is never imported);
#   DIR/alexnet-features-imagenet.pth   the frozen trunk of LPIPS, the perceptual map and the
#                 image context (copied from ../shared/weights, 9.9 MB).
#
#   bash scripts/device_kit.sh [DIR]      (default DIR: .device, ignored by git)
#
# Then carry DIR with the checkout and run  bash benchmarks/gpu_suite.sh OUTDIR  (the suite looks
# in ./.device by itself; --wheels DIR/wheels and $DEFECT_FAST_ALEXNET_WEIGHTS name other places;
# --archive FILE.tar.gz packs OUTDIR into one file to copy back).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device}
PY=${PYTHON:-python3}
mkdir -p "$DIR/wheels"
$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$DIR/wheels" \
  "lpips==0.1.4" "pytorch-msssim==1.0.0"
WEIGHTS=${DEFECT_FAST_ALEXNET_WEIGHTS:-../shared/weights/alexnet-features-imagenet.pth}
if [ -f "$WEIGHTS" ]; then
  cp "$WEIGHTS" "$DIR/alexnet-features-imagenet.pth"
else
  echo "device_kit.sh: no AlexNet trunk file at $WEIGHTS; the suite's recommended step and AW-AE's LPIPS stage need it" >&2
fi
du -sh "$DIR"; find "$DIR" -type f | sort
