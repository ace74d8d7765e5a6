#!/usr/bin/env bash
# One GPU run, every number side by side: `retention bench` (our kernels) and the anchor script
# (Manifest's Triton `power_retention` and PyTorch SDPA) at the same shapes, on the same GPU.
#
# Run on the GPU machine from the repository root, with the CLI staged in .gpu/
# (../shared/tools/gpu-pack target/release/retention) and the `retention` wheel in .whl/:
#   scripts/gpu-bench.sh OUT_DIR [shape ...]        (shapes: mha64 brumby; default both)
# Writes OUT_DIR/h200.csv (all rows, anchor schema), OUT_DIR/log.txt (every table and log) and
# the Triton cache as OUT_DIR/triton-cache.tgz.aa, .ab, … (15 MB pieces: a run brings back at
# most 8 files of 16 MiB). Keep the pieces in .triton-cache/ (ignored) and carry it: the next run
# unpacks them, so Triton does not autotune again.
# ANCHOR_TIMEOUT (seconds, default 900) bounds each anchor run; rows printed before it count.
# ANCHOR_TS (comma-separated sequence lengths) limits the anchor rows (each new shape autotunes);
# BENCH_ARGS adds arguments to `retention bench` (`--backward` for our fwd+bwd rows);
# ANCHOR_MODES (default fwd) is the anchor script's --modes (fwd,fwd+bwd for training rows).
set -uo pipefail
out=${1:?usage: scripts/gpu-bench.sh OUT_DIR [shape ...]}
shift
shapes=${*:-mha64 brumby}
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.triton
# keep autotuning decisions in the cache too (Triton 3.x), not only compiled kernels
export TRITON_CACHE_AUTOTUNING=1
if ls .triton-cache/triton-cache.tgz* > /dev/null 2>&1; then
  cat .triton-cache/triton-cache.tgz* | tar xz
fi
work=$(mktemp -d)
echo "impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops" > "$out/h200.csv"
for shape in $shapes; do
  .gpu/retention bench --backend cuda --shape "$shape" --out "$work/ours-$shape.csv" ${BENCH_ARGS:-} \
    2>&1 | tee -a "$out/log.txt"
  tail -n +2 "$work/ours-$shape.csv" >> "$out/h200.csv"
  timeout "${ANCHOR_TIMEOUT:-900}" python3 benches/anchors/anchor_bench.py --shape "$shape" --modes "${ANCHOR_MODES:-fwd}" \
    --ts "${ANCHOR_TS:-1024,2048,4096,8192,16384,32768,65536}" 2>&1 \
    | tee "$work/anchors-$shape.txt" | tee -a "$out/log.txt"
  grep -E '^(sdpa|retention_triton),' "$work/anchors-$shape.txt" >> "$out/h200.csv"
done
tar czf - .triton | split -b 15m - "$out/triton-cache.tgz."
