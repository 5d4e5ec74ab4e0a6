#!/usr/bin/env bash
# The GPU host's training checks, in one call (the host has no Swift toolchain): unpack the
# bundle that scripts/bundle.sh wrote, then
#   1. `qat selftest --device cuda` (every kernel, forward and backward, against the CPU);
#   2. fortune-lm QAD in fp32 at a constant lr: GPU against CPU from the same checkpoint, step
#      by step; a CPU checkpoint resumed on the GPU and a GPU checkpoint resumed on the CPU;
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
# fp32 QAD at a constant lr, GPU against CPU from the same state: the CPU calibrates and takes
# step 1 (checkpoint), the GPU resumes it to step 21; a second GPU run stops at step 10 and the
# CPU resumes that checkpoint to step 21. (Calibrating on each device gives activation amax a
# few ulps apart, which moves NVFP4 scales: README, GPU section.)
short=(--set train.schedule=constant --set train.warmup_steps=0 --set train.eval_every=0 --set train.save_every=100
       --set export.verify=false)
run() { local dir=$1; shift; step $Q apply recipes/fortune-lm-qad.yaml "${short[@]}" --set export.dir=/tmp/$dir \
          --set train.checkpoint_dir=/tmp/$dir.work/checkpoints "$@" 2>&1 | tail -12 | tee "$out/$dir.txt"; }
run cpu --set train.steps=21
run cpu1 --set train.steps=1
mkdir -p /tmp/chain.work && cp -r /tmp/cpu1.work/checkpoints /tmp/chain.work/
run gpu --set train.steps=21 --device cuda --precision fp32 --resume --force-resume --set train.checkpoint_dir=/tmp/cpu1.work/checkpoints
run chain --set train.steps=10 --device cuda --precision fp32 --resume --force-resume
run chain --set train.steps=21 --resume --force-resume
for d in cpu gpu chain; do cp /tmp/$d.work/metrics.jsonl "$out/metrics-$d.jsonl" 2>/dev/null; done
cp /tmp/cpu1.work/metrics.jsonl "$out/metrics-gpu-from-cpu1.jsonl" 2>/dev/null
python3 - "$out" <<'PY' 2>&1 | tee "$out/compare.txt"
import json, sys
d = sys.argv[1]
rd = lambda f: {r["step"]: r for r in map(json.loads, open(f"{d}/{f}"))}
c, g, ch = rd("metrics-cpu.jsonl"), rd("metrics-gpu-from-cpu1.jsonl"), rd("metrics-chain.jsonl")
rel = lambda a, b: abs(a - b) / abs(b)
steps = [s for s in sorted(g) if s > 1 and s in c]
print(f"fp32 QAD from the CPU's step-1 checkpoint, GPU steps {steps[0]}-{steps[-1]} vs the CPU run: "
      f"max relative loss difference {max(rel(g[s]['loss'], c[s]['loss']) for s in steps):.2e} (goal 1e-4)")
for s in steps: print(f"  step {s:2d}  gpu {g[s]['loss']:.7f}  cpu {c[s]['loss']:.7f}  grad_norm {g[s]['grad_norm']:.6f} / {c[s]['grad_norm']:.6f}  gpu_peak_mb {g[s].get('gpu_peak_mb')}")
late = [s for s in sorted(ch) if s > 10 and s in c]
print(f"GPU checkpoint (step 10) resumed on the CPU, steps {late[0]}-{late[-1]} vs the CPU run: "
      f"max relative loss difference {max(rel(ch[s]['loss'], c[s]['loss']) for s in late):.2e}")
PY
step $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision bf16 --set export.dir=/tmp/qad-bf16 2>&1 | tail -30 | tee "$out/qad-bf16.txt"
cp /tmp/qad-bf16.work/metrics.jsonl "$out/metrics-qad-bf16.jsonl" 2>/dev/null
