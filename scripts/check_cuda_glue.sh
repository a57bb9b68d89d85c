#!/usr/bin/env bash
# Compile check of the torch glue of the CUDA kernels, on a machine without a GPU.
#
# The CUDA kernels (csrc/*/cuda/*_kernel.cu) are compiled by CMake in CI, but their torch glue
# (csrc/*/cuda/*_cuda.cpp: argument checks, dispatch, stream, TORCH_LIBRARY_IMPL for CUDA) and the
# CUDA branch of csrc/extension.cpp are built only by the extension build on a machine whose
# torch has CUDA. This checks that the glue compiles against the installed torch's headers and
# the CUDA toolkit's, with the flags torch's extension builder uses (C++20,
# DEFECT_FAST_WITH_CUDA): g++ -fsyntax-only, nothing is linked.
# A CPU-only torch wheel ships the c10/cuda headers but not the one generated at torch's build
# time (c10/cuda/impl/cuda_cmake_macros.h); a copy with the content of a shared-library build is
# put in a temporary folder for the check.
#
#   bash scripts/check_cuda_glue.sh
#   TORCH_INCLUDE=DIR bash scripts/check_cuda_glue.sh
#
# TORCH_INCLUDE names the include folder of another torch (for instance the one a GPU image holds,
# unpacked from its wheel: unzip torch-*.whl 'torch/include/*'); then every C++ file of csrc/
# (CPU kernels too: the extension build on that machine compiles them all) is checked against
# those headers instead, with the generated CUDA header that a CUDA build of torch ships.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
if [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
  echo "CUDA headers not found in $cuda_inc: CUDA glue compile check skipped"
  exit 0
fi
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
if [ -n "${TORCH_INCLUDE:-}" ]; then
  [ -f "$TORCH_INCLUDE/torch/extension.h" ] || { echo "TORCH_INCLUDE=$TORCH_INCLUDE: no torch/extension.h there" >&2; exit 2; }
  torch_inc=(-I"$TORCH_INCLUDE" -I"$TORCH_INCLUDE/torch/csrc/api/include")
  files=$(find csrc -name '*.cpp' | sort)
else
  read -r -a torch_inc <<< "$(python3 -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')"
  files=$(ls csrc/*/cuda/*_cuda.cpp csrc/extension.cpp)
fi
read -r -a py_inc <<< "$(python3 -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])')"
status=0
for f in $files; do
  # the torch include folders first: a CUDA build of torch has its own generated header there
  if g++ -std=c++20 -fsyntax-only -fopenmp -Wall -Werror=return-type -DDEFECT_FAST_WITH_CUDA -DTORCH_EXTENSION_NAME=defect_fast_native \
      -DDEFECT_FAST_CUDA_ARCHS=8.0_9.0 -DDEFECT_FAST_BUILD_KIND=jit \
      -Icsrc "${torch_inc[@]}" -I"$stub" -I"$cuda_inc" "${py_inc[@]}" "$f"; then
    echo "ok   $f"
  else
    echo "FAIL $f"
    status=1
  fi
done
exit $status
