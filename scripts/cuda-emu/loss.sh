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
python3 - "$here/../../Sources/QATCUDA/Kernels" <<'PY'
import re, sys
root = sys.argv[1] + '/'
src = '\n'.join(open(root + f).read() for f in ['common.cu', 'loss.cu', 'optim.cu'])
src = re.sub(r'__shared__ (double|float) (\w+)\[32\];', r'static \1 \2[32];', src)
assert 'asm' not in src and '__shared__' not in src
extra = ('inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }\n'
         'inline float __fsqrt_rn(float a) { volatile float r = sqrtf(a); return r; }\n')
open('kernels.cpp', 'w').write('#include "prelude.h"\n' + extra + src)
PY
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/loss_check.cpp" "$here/runtime.cpp"
./check "$@"
