#!/usr/bin/env bash
# Several retraining runs of the converted model side by side on one GPU. Measured on an H200
# (docs/models.md): four at once trained about 16k tokens/s together, less than one run alone
# (27k), so give it one run unless the runs are short comparisons. Each run gets its own run
# directory under RUNS_ROOT (an ignored folder: RESUME=1 in a later call of the same warm
# machine continues them) and its own folder under OUT_DIR.
#
#   scripts/gpu-retrain-sweep.sh OUT_DIR GGUF CORPUS_FILE 'name:flags' ['name:flags' ...]
# e.g. 'lr1e-4:--lr 1e-4' 'd5:--lr 1e-4 --distill 0.5'. Every run also gets COMMON (default
# `--retention-dtype bf16 --steps 1000`) and RETRAIN_TIMEOUT (seconds, default 500).
# Writes OUT_DIR/NAME/{retrain.log,losses.csv,recovery.json}, packed into OUT_DIR/sweep.tgz
# (a call returns only a few files), and prints each run's held-out losses.
set -uo pipefail
out=${1:?usage: scripts/gpu-retrain-sweep.sh OUT_DIR GGUF CORPUS 'name:flags'...}
gguf=${2:?gguf file}
corpus=${3:?corpus file}
shift 3
root=${RUNS_ROOT:-runs/sweep}
resume=
[ -n "${RESUME:-}" ] && resume=--resume
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  flags=${spec#*:}
  mkdir -p "$out/$name" "$root/$name"
  # shellcheck disable=SC2086
  timeout "${RETRAIN_TIMEOUT:-500}" .gpu/retention retrain --backend cuda --model "$gguf" \
    --corpus "$corpus" --mixer retention --checkpoint-every "${CHECKPOINT_EVERY:-100}" \
    --out "$root/$name" $resume ${COMMON:---retention-dtype bf16 --steps 1000} $flags \
    > "$out/$name/retrain.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
nvidia-smi --query-gpu=memory.used --format=csv
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name: ${spec#*:}"
  cp "$root/$name/retention/losses.csv" "$out/$name/" 2>/dev/null
  cp "$root/$name/retention/recovery.json" "$out/$name/" 2>/dev/null
  tr '\r' '\n' < "$out/$name/retrain.log" | grep -E -i "step [0-9]*00 |held|error|panic" | tail -n 14
done
names=()
for spec in "$@"; do names+=("${spec%%:*}"); done
tar czf "$out/sweep.tgz" -C "$out" "${names[@]}" && rm -rf "${names[@]/#/$out/}"
ls -la "$out"
