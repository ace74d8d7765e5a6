#!/usr/bin/env bash
# Peak device memory of a training step of the decoder language model (`retention train`, the
# ≈ 14M-parameter preset, batch 1) against the sequence length, retention vs attention.
#
# Run on the GPU machine from the repository root, with the CUDA CLI staged in .gpu/ and the
# corpus as a text file (`bible Gen1:1-Rev22:21 > .gpu/kjv.txt` on a machine with bible-kjv):
#   scripts/gpu-train-memory.sh OUT_DIR CORPUS_FILE [t,t,...]
# Each (mixer, t) is its own process: 2 optimizer steps and the end-of-run validation pass,
# while nvidia-smi samples the device's used memory every 20 ms. Writes OUT_DIR/train-memory.csv
# (`mixer,t,batch,peak_mib,seconds,status`; peak over the idle level) and OUT_DIR/train-memory.log.
# RUN_TIMEOUT (seconds, default 300) bounds each run.
set -uo pipefail
out=${1:?usage: scripts/gpu-train-memory.sh OUT_DIR CORPUS_FILE [t,t,...]}
corpus=${2:?corpus file}
ts=${3:-1024,2048,4096,8192,16384,32768}
log=$out/train-memory.log
echo "mixer,t,batch,peak_mib,seconds,status" > "$out/train-memory.csv"
common=(--backend cuda --batch 1 --corpus "$corpus" --eval-every 0 --checkpoint-every 0)
# one tokenizer for every run
shared=$(mktemp -d)
.gpu/retention train "${common[@]}" --mixer retention --steps 1 --seq 256 --out "$shared" >> "$log" 2>&1
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mixer in retention attention; do
  for t in ${ts//,/ }; do
    run=$(mktemp -d)
    cp "$shared/tokenizer.json" "$run/"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$run/mem.txt" &
    smi=$!
    start=$(date +%s.%N)
    echo "== $mixer t=$t" >> "$log"
    if timeout "${RUN_TIMEOUT:-300}" .gpu/retention train "${common[@]}" --steps 2 --mixer "$mixer" --seq "$t" --out "$run" >> "$log" 2>&1; then
      status=ok
    else
      status=failed
    fi
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    kill $smi; wait $smi 2>/dev/null
    peak=$(sort -n "$run/mem.txt" | tail -1)
    echo "$mixer,$t,1,$((peak - idle)),$seconds,$status" | tee -a "$out/train-memory.csv"
    rm -rf "$run"
  done
done
