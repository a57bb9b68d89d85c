#!/usr/bin/env bash
# Installs defect_fast (editable) and what its tests need, without ever replacing the torch build:
# every install is constrained to torch==2.13.0, and lpips (which depends on torchvision) goes in
# with --no-deps: only its linear-head weights are used, torchvision is never imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
$PY -m pip install -q --disable-pip-version-check --no-deps "lpips==0.1.4"
