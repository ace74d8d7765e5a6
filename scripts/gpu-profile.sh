#!/usr/bin/env bash
# Per-kernel device time of `retention bench` calls under Nsight Compute (one metric, no
# clock control), summed by kernel name: where a forward or decode call spends its time.
#
#   scripts/gpu-profile.sh OUT_DIR NAME [retention bench arguments...]
# Writes OUT_DIR/ncu-NAME.csv (raw) and prints the per-kernel table (ms, launches, share).
set -uo pipefail
out=${1:?usage: scripts/gpu-profile.sh OUT_DIR NAME [bench args...]}
name=${2:?name}
shift 2
ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  --log-file "$out/ncu-$name.csv" .gpu/retention bench --backend cuda "$@" > "$out/bench-$name.txt" 2>&1
python3 - "$out/ncu-$name.csv" <<'PY'
import csv, sys, collections
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
total = collections.Counter(); count = collections.Counter()
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "ns")
    scale = {"ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "nsecond": 1e-6}.get(unit, 1e-6)
    name = r["Kernel Name"][:70]
    total[name] += v * scale; count[name] += 1
s = sum(total.values())
print(f"{'kernel':70s} {'ms':>10s} {'n':>5s} {'share':>6s}")
for k, v in total.most_common(25):
    print(f"{k:70s} {v:10.3f} {count[k]:5d} {100*v/s:5.1f}%")
print(f"{'total':70s} {s:10.3f}")
PY
