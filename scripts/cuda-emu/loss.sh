#!/usr/bin/env bash
# Runs the loss-row kernels (loss.cu) and sumsq_chunks (optim.cu) on the CPU emulator of
# prelude.h and compares them with C++ ports of the CPU path (DistillationKernels.fullRow,
# CrossEntropy.row, GradientClipping.sumOfSquares). About a minute. Not part of scripts/test.sh;
# run it after changing loss.cu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 "$here/plain.py" loss.cu optim.cu
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/loss_check.cpp" "$here/runtime.cpp"
./check "$@"
