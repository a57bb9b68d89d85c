#!/usr/bin/env bash
# Builds the extension (C++ and, where nvcc is found, CUDA) and runs the tests against another
# torch release from PyPI, in a virtual environment of its own: for instance the build a GPU
# image holds, before the first run there. PyPI's Linux wheels are CUDA builds: the download is
# about 4.5 GB (torch and its nvidia-* runtime wheels), so this is a manual check, not part of CI.
# On a machine with no GPU the CUDA kernels are compiled, linked and registered, and the
# `cuda`-marked tests skip.
#
#   bash scripts/check_other_torch.sh 2.11.0 [VENV]      (default VENV: /tmp/defect_fast_torch-<version>)
#
# It installs nothing outside VENV and builds into VENV/build; ../shared beside the checkout
# gives the tests their AlexNet trunk file, as in CI. The C++ runner example's test skips where
# CMake finds no full CUDA toolkit for a CUDA LibTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash scripts/check_other_torch.sh TORCH_VERSION [VENV]}
VENV=${2:-/tmp/defect_fast_torch-$VERSION}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$VERSION" numpy pillow scikit-learn tqdm \
  pytest pytest-benchmark ninja "pytorch-msssim==1.0.0" watchdog matplotlib onnx onnxruntime onnxscript
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "lpips==0.1.4"
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; } || true
export DEFECT_FAST_JIT=1 DEFECT_FAST_BUILD_DIR="$VENV/build"
"$VENV/bin/python" - <<'PY'
import torch
from defect_fast.ops import _native
module, reason = _native.load()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): extension loaded: {module is not None} {reason}")
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("defect_fast::"))
for n in ops:
    dump = torch._C._dispatch_dump(n)
    print(f"  {n:36s} CPU kernel: {'CPU:' in dump}  CUDA kernel: {'CUDA:' in dump}")
raise SystemExit(0 if module is not None else 1)
PY
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore tests/
