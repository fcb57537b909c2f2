#!/usr/bin/env bash
# Train and evaluate the offline recipe at several insert layers and seeds: the README's "Trained models" table.
# Usage: bash scripts/train_seeds.sh [OUT_ROOT] [LAYERS] [SEEDS] [pg-train options…]   (default: runs/seeds "4 0" "0 1 2")
# Options after the three (e.g. --precision fp32) go to every pg-train; pg-eval evaluates as the run was trained.
# Resumable: a finished run (model/ and eval/eval.json) is kept, an interrupted one continues from its checkpoint.
# Each run's wall time and peak RSS (/usr/bin/time) go to OUT_ROOT/L{L}-s{S}.time.
set -euo pipefail
root=${1:-runs/seeds}
layers=${2:-"4 0"}
seeds=${3:-"0 1 2"}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$root"
for s in $seeds; do
  for L in $layers; do
    out="$root/L$L-s$s"
    if [ ! -f "$out/model/config.json" ]; then
      resume=()
      if ls "$out"/checkpoints/stage*-step* >/dev/null 2>&1; then resume=(--resume); else rm -rf "$out"; fi
      /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$out.time" \
        pg-train --layer "$L" --seed "$s" --out "$out" --quiet ${resume[@]+"${resume[@]}"} "$@"
    fi
    [ -f "$out/eval/eval.json" ] || pg-eval "$out" --no-rank-all --no-generate --quiet
  done
done
