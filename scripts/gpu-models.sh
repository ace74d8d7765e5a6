#!/usr/bin/env bash
# The pretrained-model measurements on the GPU machine: SmolLM2-135M's per-token latency
# against the context (attention vs its conversion to power retention), then the retraining
# after the conversion with its attention control and the recovery curve.
#
# Run from the repository root, with the CUDA CLI staged in .gpu/, the checkpoint and the
# corpus as files (on a machine with bible-kjv: `bible Gen1:1-Rev22:21 > .gpu/kjv.txt`;
# `scripts/fetch-smollm2.sh .gpu`):
#   scripts/gpu-models.sh OUT_DIR GGUF CORPUS_FILE
# The checkpoint (98 MB) is more than one call may carry (64 MiB): split it here
# (`split -b 47M models/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/smollm2.part.`), carry the
# first part (and the corpus) in one call that moves it to the ignored models/ folder there,
# and the rest with the binary in the next call while the machine is still warm (ignored
# folders stay between calls of one machine): `cat models/smollm2.part.* .gpu/smollm2.part.*
# > models/smollm2.gguf` before this script.
# Environment: LATENCY_AT (contexts, default 1024,...,65536; `none` skips the latency),
# STEPS (default 2000), BATCH (8), SEQ (1024), MIXER (both), RETRAIN_TIMEOUT (seconds, default
# 420), CHECKPOINT_EVERY (250), RUNS (the run directories, default runs/gpu-retrain: an ignored
# folder, so a later call on the same warm machine continues with RESUME=1), EXTRA (more
# retrain flags, e.g. --rotary).
# Two runs compared in one call: `LATENCY_AT=none MIXER=retention RUNS=runs/d0 EXTRA="--retention-dtype bf16"
# scripts/gpu-models.sh $OUT/d0 ...` then the same with RUNS=runs/d5, OUT $OUT/d5 and
# `--distill 0.5` added (each OUT folder gets its own three files).
# Writes OUT_DIR/latency.csv (draw it with `retention plot`), latency.log, retrain.log,
# recovery.svg, and each run's losses.csv and recovery.json as <mixer>-losses.csv and
# <mixer>-recovery.json: 8 files, what a run may return. Checkpoints every 250 steps keep
# losses.csv current when the time limit stops a run.
set -uo pipefail
out=${1:?usage: scripts/gpu-models.sh OUT_DIR GGUF CORPUS_FILE}
gguf=${2:?gguf file}
corpus=${3:?corpus file}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
if [ "${LATENCY_AT:-}" != none ]; then
  timeout 240 .gpu/retention generate --backend cuda --model "$gguf" \
    --latency-at "${LATENCY_AT:-1024,4096,16384,32768,65536}" --latency-steps 16 \
    --out "$out/latency.csv" > "$out/latency.log" 2>&1
  tail -n 14 "$out/latency.log"
fi
runs=${RUNS:-runs/gpu-retrain}
mkdir -p "$runs"
resume=
[ -n "${RESUME:-}" ] && resume=--resume
timeout "${RETRAIN_TIMEOUT:-420}" .gpu/retention retrain --backend cuda --model "$gguf" \
  --corpus "$corpus" --mixer "${MIXER:-both}" --steps "${STEPS:-2000}" --batch "${BATCH:-8}" \
  --seq "${SEQ:-1024}" --checkpoint-every "${CHECKPOINT_EVERY:-250}" --out "$runs" $resume \
  ${EXTRA:-} > "$out/retrain.log" 2>&1
echo "retrain exit: $?"
grep -v "^\s*$" "$out/retrain.log" | tr '\r' '\n' | tail -n 12
cp "$runs/recovery.svg" "$out/" 2>/dev/null
for mixer in retention attention; do
  cp "$runs/$mixer/losses.csv" "$out/$mixer-losses.csv" 2>/dev/null
  cp "$runs/$mixer/recovery.json" "$out/$mixer-recovery.json" 2>/dev/null
done
ls -la "$out"
