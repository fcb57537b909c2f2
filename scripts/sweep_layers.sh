#!/usr/bin/env bash
# Cheap insert-layer sweep on the offline pair (validates pg-recommend's rule; see README "Choosing L").
# Usage: bash scripts/sweep_layers.sh [OUT_ROOT] [LAYERS...]   (default: runs/sweep, 0 2 4 8 16)
# Each L: stage 0 (300 steps, as measured in README) + stage 1 (100) + a short stage 2 (60), then pg-eval on the
# 99 test images. `--extra-train none --match-mean false --distill-weight 0 --stage2-lr 1e-4`: the 309 photos only, the plain
# norm matching, no text-twin distillation and the LM learning rate of the time, as when
# its README numbers were measured.
set -euo pipefail
root=${1:-runs/sweep}
shift || true
layers=("$@")
[ ${#layers[@]} -gt 0 ] || layers=(0 2 4 8 16)
for L in "${layers[@]}"; do
  out="$root/L$L"
  if [ ! -f "$out/model/config.json" ]; then
    rm -rf "$out"
    pg-train --layer "$L" --out "$out" --stage0-steps 300 --stage1-steps 100 --stage2-steps 60 --extra-train none --match-mean false --distill-weight 0 --stage2-lr 1e-4 --checkpoint-every 1000 --quiet
  fi
  [ -f "$out/eval/eval.json" ] || pg-eval "$out" --no-rank-all --no-generate --bench-repeats 2 --quiet
done
