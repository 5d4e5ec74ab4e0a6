#!/usr/bin/env bash
# Runs the attention kernels on the CPU (no GPU): scripts/cuda-emu/prelude.h emulates the CUDA
# subset they use (one fiber per thread; barriers, shuffles, mma.sync, ldmatrix, cp.async), and
# attention_check.cpp compares them with a float64 reference. A few minutes; `run.sh bf16` runs
# only the tensor-core kernels, which run twice: cp.async copies landing at once, then
# (EMU_CP_ASYNC=late) only at the issuing thread's wait, so that a pipeline that overwrites a
# tile still in use, or reads one before its wait, fails. `run.sh lora` runs lora_check.cpp (the
# LoRA / QLoRA kernels of lora.cu against transcriptions of the Swift CPU code, bit for bit);
# `run.sh topk` runs topk_check.cpp (the top-k kernels of topk.cu, ballots and __match_any_sync
# emulated too, against ports of the CPU code). Not part of scripts/test.sh; run it after changing
# attention.cu, lora.cu or topk.cu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
cp "$here/prelude.h" .
if [ "${1:-}" = topk ]; then  # the top-k kernels (topk.cu), about 30 s
  python3 "$here/gen.py" topk.cu
  g++ -std=c++17 -O2 -w -I. -o check "$here/topk_check.cpp" "$here/runtime.cpp"
  exec ./check
fi
if [ "${1:-}" = lora ]; then  # the LoRA / QLoRA kernels (lora.cu), a few seconds
  python3 "$here/gen.py" lora.cu
  g++ -std=c++17 -O2 -w -I. -o check "$here/lora_check.cpp" "$here/runtime.cpp"
  exec ./check
fi
python3 "$here/gen.py"
g++ -std=c++17 -O2 -w -I. -o check "$here/attention_check.cpp" "$here/runtime.cpp"
./check "$@"
echo "again with cp.async copies landing at the wait (bf16 kernels only):"
EMU_CP_ASYNC=late ./check bf16
