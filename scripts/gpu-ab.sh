#!/usr/bin/env bash
# Kernel changes measured against the build before them, in one GPU call: CLIs staged in .gpu/
# as gzip files, each timed at the same shapes (forward and fwd+bwd rows), in two alternating
# rounds.
#
#   scripts/gpu-ab.sh OUT_DIR SEQ A.gz B.gz [C.gz ...]
# Writes OUT_DIR/ab.txt (every binary's rows, labelled by its file name).
set -uo pipefail
out=${1:?usage: scripts/gpu-ab.sh OUT_DIR SEQ A.gz B.gz [C.gz ...]}
seq=${2:?sequence length}
shift 2
names=()
for gz in "$@"; do
  name=$(basename "$gz" .gz)
  gunzip -c "$gz" > ".gpu/$name" && chmod +x ".gpu/$name"
  names+=("$name")
done
args=(bench --backend cuda --seqs "$seq" --decode-batches --backward --reps 10 --warmup 2)
for round in 1 2; do
  for name in "${names[@]}"; do
    for shape in mha64 brumby; do
      timeout 120 ".gpu/$name" "${args[@]}" --shape "$shape" 2>&1 | grep -E "^burn_" \
        | sed "s/^/$name r$round /" >> "$out/ab.txt"
    done
  done
done
cat "$out/ab.txt"
