#!/usr/bin/env bash
# Runs the attention kernels on the CPU (no GPU): scripts/cuda-emu/prelude.h emulates the CUDA
# subset they use (one fiber per thread; barriers, shuffles, mma.sync, ldmatrix, cp.async), and
# attention_check.cpp compares them with a float64 reference. A few minutes; `run.sh bf16` runs
# only the tensor-core kernels. The bf16 kernels run twice: cp.async copies landing at once, then
# (EMU_CP_ASYNC=late) only at the issuing thread's wait, so that a pipeline that overwrites a
# tile still in use, or reads one before its wait, fails. Not part of scripts/test.sh; run it
# after changing attention.cu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 "$here/gen.py"
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/attention_check.cpp" "$here/runtime.cpp"
./check "$@"
echo "again with cp.async copies landing at the wait (bf16 kernels only):"
EMU_CP_ASYNC=late ./check bf16
