#!/usr/bin/env bash
# Kernel changes measured against the build before them, in one GPU call: CLIs staged in .gpu/
# as gzip files, each timed at the same shapes (forward and fwd+bwd rows at one length).
#
#   scripts/gpu-ab.sh OUT_DIR SEQ A.gz B.gz [C.gz ...]
# Writes OUT_DIR/ab.txt (every binary's rows, labelled by its file name).
# SHAPES (default "mha64 brumby"), ROUNDS (default 1: each bench process compiles its kernels
# first, ≈ 20–40 s, so rounds are dear), REPS (default 8), KERNELS (e.g. "auto cmma": each
# build timed with both kernel families through `--kernels`; unset: the flag is not passed, for
# builds that predate it). With SELFTEST=1 the
# last build's f16/bf16 suite with gradients follows for each of KERNELS
# (OUT_DIR/selftest-KERNELS.txt), with PROFILE=1 its per-kernel times at mha64
# (scripts/gpu-profile.sh). Budget the call: ≈ 30 s per (build, shape) at
# mha64, ≈ 45 s at brumby, ≈ 90 s for the suite, ≈ 90 s for the profile.
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
args=(bench --backend cuda --seqs "$seq" --decode-batches --backward --reps "${REPS:-8}" --warmup 1)
start=$SECONDS
# `--kernels K` where KERNELS names families
kernels_flag() { [ -n "${KERNELS:-}" ] && echo "--kernels $1"; }
for round in $(seq "${ROUNDS:-1}"); do
  for name in "${names[@]}"; do
    for kernels in ${KERNELS:-auto}; do
      for shape in ${SHAPES:-mha64 brumby}; do
        # the bench prints its rows as a table whose lines start with the implementation's name
        timeout 120 ".gpu/$name" "${args[@]}" $(kernels_flag "$kernels") --shape "$shape" 2>&1 \
          | grep -E "^burn_" | sed "s/^/$name\/$kernels r$round /" >> "$out/ab.txt"
        echo "$name/$kernels $shape round $round done at $((SECONDS - start)) s" >&2
      done
    done
  done
done
cat "$out/ab.txt"
last=${names[${#names[@]}-1]}
if [ "${SELFTEST:-0}" = 1 ]; then
  for kernels in ${KERNELS:-auto}; do
    timeout 150 ".gpu/$last" selftest --backend cuda --dtype f16 --dtype bf16 --cases 6 --grad \
      $(kernels_flag "$kernels") > "$out/selftest-$kernels.txt" 2>&1
    echo "selftest of $last/$kernels: exit $?"
    grep -E "^\| (F16|BF16)" "$out/selftest-$kernels.txt" | grep -v "| pass |" \
      || echo "every row passes"
  done
fi
if [ "${PROFILE:-0}" = 1 ]; then
  cp ".gpu/$last" .gpu/retention
  timeout 150 scripts/gpu-profile.sh "$out" "$last" --shape mha64 --seqs "$seq" \
    --decode-batches --backward --reps 2 --warmup 0 | head -24
fi
