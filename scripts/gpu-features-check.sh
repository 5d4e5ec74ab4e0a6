#!/usr/bin/env bash
# The GPU training features beyond plain QAT/QAD, on a GPU host with the bundle of
# scripts/bundle.sh, in one call: `qat selftest --device cuda`, then each of these recipes on the
# GPU next to its CPU run (the figures of the summary table, the verify line, wall time):
#   LoRA-QAT (bf16), QLoRA-QAD (bf16), top-k QAD from a cache the GPU wrote
#   (`qat teacher-logprobs --device cuda`, compared with the CPU-written cache), and QAD with
#   activation checkpointing (bf16).
#   bash scripts/gpu-features-check.sh BUNDLE.tar.xz OUT_DIR     (SKIP_SELFTEST=1: without step 1)
set -uo pipefail
bundle=$(readlink -f "$1") out=$(mkdir -p "$2" && readlink -f "$2")
cd "$(dirname "$0")/.."
mkdir -p /tmp/qatb && { [ -x /tmp/qatb/qat-linux-x86_64/qat ] || tar -C /tmp/qatb -xJf "$bundle"; }
Q=/tmp/qatb/qat-linux-x86_64/qat
export QAT_KERNEL_CACHE=${QAT_KERNEL_CACHE:-/tmp/qat-kernels}
step() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; local s=$SECONDS
         timeout -k 5 "$limit" "$@" >"$out/$name.txt" 2>&1; local rc=$?
         echo "== $name rc=$rc ($((SECONDS - s)) s)" | tee -a "$out/$name.txt"; tail -8 "$out/$name.txt"; }
[ -n "${SKIP_SELFTEST:-}" ] || step selftest 120 $Q selftest --device cuda
step lora-qat-gpu 90 $Q apply recipes/fortune-lm-lora-qat.yaml --device cuda --precision bf16 --set export.dir=/tmp/f-lora
step qlora-qad-gpu 90 $Q apply recipes/fortune-lm-qlora-qad.yaml --device cuda --precision bf16 --set export.dir=/tmp/f-qlora
step topk-cache-gpu 60 $Q teacher-logprobs --device cuda --top-k 64 --out /tmp/f-t64-gpu.h5
step topk-cache-cpu 120 $Q teacher-logprobs --top-k 64 --out /tmp/f-t64-cpu.h5
step topk-qad-gpu 90 $Q apply recipes/fortune-lm-qad-topk.yaml --device cuda --precision bf16 --set export.dir=/tmp/f-topk \
  --set train.distill.teacher_logprobs=/tmp/f-t64-gpu.h5
step ckpt-qad-gpu 90 $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision bf16 --set export.dir=/tmp/f-ckpt \
  --set train.activation_checkpointing=true
python3 - /tmp/f-t64-gpu.h5 /tmp/f-t64-cpu.h5 <<'PY' 2>&1 | tee "$out/topk-cache-compare.txt"
import sys
try:
    import h5py, numpy as np
except ImportError:
    print("h5py not installed: cache comparison skipped"); sys.exit(0)
g, c = h5py.File(sys.argv[1]), h5py.File(sys.argv[2])
def walk(f, p=""):
    out = {}
    for k, v in f.items():
        if isinstance(v, h5py.Dataset): out[p + k] = v[()]
        else: out.update(walk(v, p + k + "/"))
    return out
G, C = walk(g), walk(c)
for k in sorted(set(G) | set(C)):
    if k not in G or k not in C: print(f"{k}: only in {'gpu' if k in G else 'cpu'}"); continue
    a, b = np.asarray(G[k]), np.asarray(C[k])
    if a.shape != b.shape: print(f"{k}: shape {a.shape} vs {b.shape}"); continue
    if a.dtype.kind in "iu": print(f"{k}: {a.size} values, {(a != b).sum()} differ")
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
        print(f"{k}: {a.size} values, {(a != b).sum()} differ, max |Δ| {np.nanmax(np.abs(a - b)) if a.size else 0:.3g}")
PY
