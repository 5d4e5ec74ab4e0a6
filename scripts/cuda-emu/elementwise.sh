#!/usr/bin/env bash
# Runs the element-wise kernels (elementwise.cu, rope.cu, rmsnorm.cu's backward) on the CPU emulator of
# prelude.h against their formulas element by element, on aligned arrays (the float4 paths) and on arrays one
# float off (the element-by-element paths). Seconds. Not part of scripts/test.sh; run it after changing those kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 "$here/plain.py" elementwise.cu rope.cu rmsnorm.cu
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/elementwise_check.cpp" "$here/runtime.cpp"
./check "$@"
