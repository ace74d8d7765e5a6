#!/usr/bin/env bash
# The CUDA checks a kernel change needs before it lands, in one GPU run: the kernel-vs-oracle
# suite for f32, f16 and bf16, the poisoned-output test, and compute-sanitizer's memcheck and
# racecheck on a short suite.
#
# Run on the GPU machine from the repository root, with the CLI and the poison test binary
# staged in .gpu/ (../shared/tools/gpu-pack target/release/retention target/release/deps/poison-*):
#   scripts/gpu-check.sh OUT_DIR [CASES]        (CASES: suite cases per dtype, default 200)
# Writes OUT_DIR/check.txt (the suite's table and every summary) and prints the summaries.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [CASES]}
cases=${2:-200}
log="$out/check.txt"
.gpu/retention selftest --backend cuda --cases "$cases" > "$log" 2>&1
echo "selftest exit $?" >> "$log"
for test in .gpu/poison-*; do
  "$test" 2>&1 | grep -E "test result|panicked" >> "$log"
done
compute-sanitizer --tool memcheck --error-exitcode 3 \
  .gpu/retention selftest --backend cuda --dtype bf16 --dtype f32 --cases 6 2>&1 \
  | grep -E "ERROR SUMMARY|Invalid|selftest" >> "$log"
echo "memcheck exit ${PIPESTATUS[0]}" >> "$log"
compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 \
  .gpu/retention selftest --backend cuda --dtype bf16 --cases 3 2>&1 \
  | grep -E "RACECHECK SUMMARY|hazard|selftest" >> "$log"
echo "racecheck exit ${PIPESTATUS[0]}" >> "$log"
cat "$log"
