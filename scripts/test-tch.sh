#!/usr/bin/env bash
# Runs the reference test suite on the LibTorch backend (burn-tch 0.21 -> tch 0.22, libtorch 2.9.0).
#
# burn-tch would download libtorch at build time, which fails offline; instead this script
# installs PyTorch 2.9.0 from PyPI into a virtual environment and lets torch-sys use it
# (LIBTORCH_USE_PYTORCH=1). The PyPI wheel is the CUDA build, so its NVIDIA runtime
# libraries come along (several GB; the tests run on the CPU device).
#
#   scripts/test-tch.sh            # venv in .venv-tch (git-ignored)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
venv=${TCH_VENV:-$root/.venv-tch}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.9.0
fi
export LIBTORCH_USE_PYTORCH=1
export PATH="$venv/bin:$PATH"
site=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$site/lib:${LD_LIBRARY_PATH:-}"
# every NVIDIA runtime library the wheel brought, for libtorch_cuda.so to load
for d in "$venv"/lib/python3*/site-packages/nvidia/*/lib; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
done
export LD_LIBRARY_PATH
cargo test -p retention --no-default-features --features tch --test forms "$@"
