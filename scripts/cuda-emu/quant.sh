#!/usr/bin/env bash
# Runs the NVFP4 kernels of quant.cu on the CPU emulator of prelude.h: nvfp4_fake_quant against a
# C++ port of NVFP4.fakeQuant (Sources/QATQuant/NVFP4.swift) and swiglu_nvfp4 against
# swiglu_forward (elementwise.cu) then nvfp4_fake_quant, bit for bit (both modes, fp32 and bf16
# outputs, whole and partial blocks, rows not a multiple of 4); and swiglu_backward's optional
# fp32 / bf16 outputs. Seconds. Not part of scripts/test.sh; run it after changing quant.cu or
# the SwiGLU kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 - "$here/../../Sources/QATCUDA/Kernels" <<'PY'
import re, sys
root = sys.argv[1] + '/'
src = '\n'.join(open(root + f).read() for f in ['common.cu', 'elementwise.cu', 'quant.cu'])
src = re.sub(r'__shared__ (double|float) (\w+)\[32\];', r'static \1 \2[32];', src)
assert 'asm' not in src and '__shared__' not in src
extra = ('inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }\n'
         'inline unsigned atomicMax(unsigned *p, unsigned v) { unsigned o = *p; if (v > o) *p = v; return o; }\n')
open('kernels.cpp', 'w').write('#include "prelude.h"\n' + extra + src)
PY
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/quant_check.cpp" "$here/runtime.cpp"
./check "$@"
