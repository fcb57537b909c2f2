#!/usr/bin/env bash
# Catch the next transformers (peft, nnsight, …) release before users do: install the newest versions that
# pyproject.toml allows into a fresh virtual environment, list what moved against constraints.txt, and run the
# test suite there. When it passes, `$VENV/bin/python scripts/lock.py write` makes that set the new lock.
# Usage: bash scripts/check_latest.sh [VENV]   (default /tmp/pg-latest; the offline assets' cache is shared)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/pg-latest}
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
$py -m pip install -q --disable-pip-version-check "torch==2.13.0"
$py -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -e ".[dev]"
echo "== newest allowed versions against constraints.txt"
$py scripts/lock.py diff || true
PATH="$venv/bin:$PATH" pg-assets
echo "== test suite on the newest allowed versions"
PATH="$venv/bin:$PATH" $py -m pytest -q
