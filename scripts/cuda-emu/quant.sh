#!/usr/bin/env bash
# Runs the NVFP4 kernels of quant.cu on the CPU emulator of prelude.h: nvfp4_fake_quant against a
# C++ port of NVFP4.fakeQuant (Sources/QATQuant/NVFP4.swift) and swiglu_nvfp4 against
# swiglu_forward (elementwise.cu) then nvfp4_fake_quant and rmsnorm_nvfp4 against rmsnorm_forward
# (rmsnorm.cu) then nvfp4_fake_quant, bit for bit (both modes, fp32 and bf16 outputs, whole and
# partial blocks, rows not a multiple of 4, arrays one float off 16-byte alignment); adamw_update's NVFP4 refresh
# of the product copy against the step then nvfp4_fake_quant; and swiglu_backward's optional
# fp32 / bf16 outputs. Seconds. Not part of scripts/test.sh; run it after changing quant.cu or
# the SwiGLU kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 "$here/plain.py" elementwise.cu rmsnorm.cu quant.cu optim.cu
cp "$here/prelude.h" .
g++ -std=c++17 -O2 -w -I. -o check "$here/quant_check.cpp" "$here/runtime.cpp"
./check "$@"
