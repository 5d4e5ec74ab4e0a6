#!/usr/bin/env bash
# The GPU host's training checks, in one call (the host has no Swift toolchain): unpack the
# bundle that scripts/bundle.sh wrote, then
#   1. `qat selftest --device cuda` (every kernel, forward and backward, against the CPU);
#   2. fortune-lm QAD in fp32, 20 steps at a constant lr: GPU against CPU, step by step;
#   3. a checkpoint written on the GPU (step 10) resumed on the CPU to step 20;
#   4. the fortune-lm QAD recipe in bf16 on the GPU (300 steps, export, verify): the share of
#      the PTQ gap it closes.
#   bash scripts/gpu-train-check.sh BUNDLE.tar.xz OUT_DIR
set -uo pipefail
bundle=$1 out=$2
mkdir -p "$out" /tmp/qatb
tar -C /tmp/qatb -xJf "$bundle"
Q=/tmp/qatb/qat-linux-x86_64/qat
export QAT_KERNEL_CACHE=/tmp/qat-kernels
# OpenBLAS 0.3.26 takes this host's CPU (Xeon family 6 model 207) for a Prescott.
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}
step() { echo "== $*"; local s=$SECONDS; "$@"; local rc=$?; echo "== rc=$rc ($((SECONDS - s)) s)"; return $rc; }
step $Q selftest --device cuda 2>&1 | tee "$out/selftest.txt"
short=(--set train.steps=20 --set train.schedule=constant --set train.warmup_steps=0 --set train.eval_every=0 --set export.verify=false)
step $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision fp32 "${short[@]}" --set export.dir=/tmp/qad-gpu \
  --set train.checkpoint_dir=/tmp/qad-gpu.work/checkpoints 2>&1 | tail -25 | tee "$out/qad-fp32-gpu.txt"
step $Q apply recipes/fortune-lm-qad.yaml "${short[@]}" --set export.dir=/tmp/qad-cpu \
  --set train.checkpoint_dir=/tmp/qad-cpu.work/checkpoints 2>&1 | tail -25 | tee "$out/qad-fp32-cpu.txt"
# A GPU checkpoint at step 10, resumed on the CPU to step 20 (same recipe: the interrupted run's).
step $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision fp32 "${short[@]}" --set train.steps=10 --set train.save_every=10 \
  --set export.dir=/tmp/qad-resume --set train.checkpoint_dir=/tmp/qad-resume.work/checkpoints 2>&1 | tail -8 | tee "$out/qad-resume.txt"
step $Q apply recipes/fortune-lm-qad.yaml "${short[@]}" --resume --force-resume --set export.dir=/tmp/qad-resume \
  --set train.checkpoint_dir=/tmp/qad-resume.work/checkpoints 2>&1 | tail -12 | tee -a "$out/qad-resume.txt"
cp /tmp/qad-gpu.work/metrics.jsonl "$out/metrics-gpu-fp32.jsonl"; cp /tmp/qad-cpu.work/metrics.jsonl "$out/metrics-cpu-fp32.jsonl"
cp /tmp/qad-resume.work/metrics.jsonl "$out/metrics-resumed.jsonl"
python3 - "$out" <<'PY' 2>&1 | tee "$out/compare.txt"
import json, sys
d = sys.argv[1]
rd = lambda f: [json.loads(l) for l in open(f"{d}/{f}")]
g, c, r = rd("metrics-gpu-fp32.jsonl"), rd("metrics-cpu-fp32.jsonl"), rd("metrics-resumed.jsonl")
worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(g, c))
print(f"fp32 QAD, {len(g)} GPU steps vs {len(c)} CPU steps: max relative loss difference {worst:.2e} (goal 1e-4)")
for a, b in zip(g, c): print(f"  step {a['step']:2d}  gpu {a['loss']:.7f}  cpu {b['loss']:.7f}  grad_norm {a['grad_norm']:.5f} / {b['grad_norm']:.5f}  gpu_peak_mb {a.get('gpu_peak_mb')}")
late = [x for x in r if x["step"] > 10]
w2 = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(late, c[10:]))
print(f"GPU checkpoint (step 10) resumed on the CPU: steps 11-{late[-1]['step']} vs the CPU run: max relative difference {w2:.2e}")
PY
step $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision bf16 --set export.dir=/tmp/qad-bf16 2>&1 | tail -30 | tee "$out/qad-bf16.txt"
cp /tmp/qad-bf16.work/metrics.jsonl "$out/metrics-qad-bf16.jsonl" 2>/dev/null
