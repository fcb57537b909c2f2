#!/usr/bin/env bash
# The trained insert-layer sweep (README "Choosing L"): pg-train + pg-eval at each L and seed with the offline
# recipe's defaults (scripts/train_seeds.sh), pg-bench at the paper's prompt shape (88 text + 576 vision rows),
# then pg-sweep: the table with bootstrap intervals and the trade-off plot in ROOT-result/.
# Usage: bash scripts/sweep_layers.sh [ROOT] [LAYERS] [SEEDS] [pg-train options…]
#   (default: runs/sweep "0 2 4 8 12 16 24" "0 1"; options such as --precision fp32 go to every pg-train)
# Resumable: run it again after a kill; finished runs are kept, an interrupted one continues from its checkpoint.
set -euo pipefail
root=${1:-runs/sweep}
layers=${2:-"0 2 4 8 12 16 24"}
seeds=${3:-"0 1"}
shift $(( $# < 3 ? $# : 3 ))
bash "$(dirname "$0")/train_seeds.sh" "$root" "$layers" "$seeds" "$@"
[ -f "$root-bench/bench.json" ] || pg-bench --layers "$(echo "$layers" | tr ' ' ',')" --repeats 3 --no-train \
  --out "$root-bench" --quiet
pg-sweep "$root" --bench "$root-bench" --out "$root-result"
