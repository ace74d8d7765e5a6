#!/usr/bin/env bash
# Issue G's GPU measurements: `retention numerics` (one sequence of 2^20 tokens per head
# shape and gate pattern, in f32, f16 and bf16) and `retention drift` (100k decode steps
# after a 4k prefill with f32 and bf16 states), with the CUDA CLI staged in .gpu/:
#   scripts/gpu-reliability.sh OUT_DIR [numerics|drift|both]
# Writes OUT_DIR/numerics.{csv,log} and OUT_DIR/drift.{csv,log}; NUMERICS_TIMEOUT and
# DRIFT_TIMEOUT (seconds, default 400) bound each; DRIFT_SHAPES (default mha64,brumby).
set -uo pipefail
out=${1:?usage: scripts/gpu-reliability.sh OUT_DIR [numerics|drift|both]}
what=${2:-both}
mkdir -p "$out"
if [ "$what" != drift ]; then
  timeout "${NUMERICS_TIMEOUT:-400}" .gpu/retention numerics --backend cuda \
    --out "$out/numerics.csv" > "$out/numerics.log" 2>&1
  echo "numerics exit: $?"
  grep -E "^\| |gates .*: [0-9.]+ s" "$out/numerics.log" | tail -n 80
fi
if [ "$what" != numerics ]; then
  timeout "${DRIFT_TIMEOUT:-400}" .gpu/retention drift --backend cuda \
    --shapes "${DRIFT_SHAPES:-mha64,brumby}" --out "$out/drift.csv" > "$out/drift.log" 2>&1
  echo "drift exit: $?"
  grep -E "steps in" "$out/drift.log"
fi
