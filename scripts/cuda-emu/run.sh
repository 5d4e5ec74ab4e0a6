#!/usr/bin/env bash
# Runs the attention kernels on the CPU (no GPU): scripts/cuda-emu/prelude.h emulates the CUDA
# subset they use (one fiber per thread; barriers, shuffles, ballots, mma.sync, ldmatrix,
# cp.async), and attention_check.cpp compares them with a float64 reference. About a minute;
# `run.sh bf16` runs only the tensor-core kernels. `run.sh topk` runs the top-k kernels (topk.cu)
# against ports of the CPU code instead (topk_check.cpp). Not part of scripts/test.sh; run it
# after changing attention.cu or topk.cu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
cp "$here/prelude.h" .
if [ "${1:-}" = topk ]; then
  python3 "$here/gen.py" topk
  g++ -std=c++17 -O2 -w -I. -o check "$here/topk_check.cpp" "$here/runtime.cpp"
  ./check
else
  python3 "$here/gen.py"
  g++ -std=c++17 -O2 -w -I. -o check "$here/attention_check.cpp" "$here/runtime.cpp"
  ./check "$@"
fi
