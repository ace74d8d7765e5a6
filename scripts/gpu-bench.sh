#!/usr/bin/env bash
# One GPU run, every number side by side: `retention bench --compare` times our kernels, a Burn
# matmul, then runs the anchor script (Manifest's Triton `power_retention`, PyTorch SDPA, a torch
# matmul) at the same shapes, lengths and modes, on the same GPU, into one CSV per shape.
#
# Run on the GPU machine from the repository root, with the CLI staged in .gpu/
# (../shared/tools/gpu-pack target/release/retention) and the `retention` wheel in .whl/:
#   scripts/gpu-bench.sh OUT_DIR [shape ...]        (shapes: mha64 brumby; default both)
# Writes OUT_DIR/h200.csv (all rows, anchor schema), OUT_DIR/log.txt (every table and log) and
# Triton's autotuning results as OUT_DIR/triton-cache.tgz.aa. Keep it in .triton-cache/
# (ignored) and carry it: the next run unpacks it, so Triton does not autotune again (both
# shapes' forward and backward are tuned as of 2026-12-01).
# BENCH_ARGS adds arguments to `retention bench` (`--backward` for fwd+bwd rows of both sides,
# `--seqs 8192,16384` to limit the lengths: each new anchor shape autotunes);
# BENCH_TIMEOUT (seconds, default 1500) bounds each shape; if it strikes, the rows printed
# before it are taken from the log.
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
  timeout "${BENCH_TIMEOUT:-1500}" .gpu/retention bench --backend cuda --shape "$shape" \
    --out "$work/$shape.csv" --matmul 8192 --compare ${BENCH_ARGS:-} 2>&1 \
    | tee "$work/$shape.log" | tee -a "$out/log.txt"
  if [ -s "$work/$shape.csv" ]; then
    tail -n +2 "$work/$shape.csv" >> "$out/h200.csv"
  else
    # cut short: the anchor rows it printed (ours print as a table, not as CSV)
    grep -E "^(sdpa|retention_triton|torch_matmul),[^,]+,$shape,([^,]*,){8}[0-9.]+," \
      "$work/$shape.log" >> "$out/h200.csv"
  fi
done
# the autotuning results alone (tens of kB): the compiled kernels are rebuilt in seconds, the
# tuning took minutes (the whole cache, ≈ 65 MB, no longer comes back from one run)
find .triton -name '*.autotune.json' | tar czf "$out/triton-cache.tgz.aa" -T -
