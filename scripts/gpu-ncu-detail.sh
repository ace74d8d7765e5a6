#!/usr/bin/env bash
# Nsight Compute detail (speed of light, warp stalls, occupancy, memory) for one launch of each
# of our forward kernels at one shape: why a kernel is as fast as it is.
#
#   scripts/gpu-ncu-detail.sh OUT_DIR SHAPE T
# Writes OUT_DIR/ncu-detail-SHAPE-T.txt.
set -uo pipefail
out=${1:?usage: scripts/gpu-ncu-detail.sh OUT_DIR SHAPE T}
shape=${2:?shape}
t=${3:?t}
ncu --clock-control none --kernel-name regex:'query_state|chunk_state|chunk_output|discumsum|decode' \
  --launch-count 6 --section SpeedOfLight --section WarpStateStats --section Occupancy \
  --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  .gpu/retention bench --backend cuda --shape "$shape" --seqs "$t" --warmup 0 --reps 1 \
  --decode-batches 1 --decode-contexts 1024 > "$out/ncu-detail-$shape-$t.txt" 2>&1
grep -E '^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Block Limit|Warp Cycles Per Issued|Stall|Issue Slots Busy|L1/TEX Hit|L2 Hit' \
  "$out/ncu-detail-$shape-$t.txt" | head -150
