#!/usr/bin/env bash
# The GPU host's training checks, in one call (the host has no Swift toolchain): unpack the
# bundle that scripts/bundle.sh wrote, then
#   1. `qat selftest --device cuda` (every kernel, forward and backward, against the CPU);
#   2. fortune-lm in fp32 at a constant lr (NVFP4 QAD, and unquantized QAT): GPU against CPU from
#      the same checkpoint, step by step, with a CPU-vs-CPU control; a GPU checkpoint resumed on the CPU;
#   3. the fortune-lm QAD recipe in bf16 on the GPU (300 steps, export, verify): the share of
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
# fp32 at a constant lr, GPU against CPU from the same state: the CPU calibrates and takes step 1
# (checkpoint); the GPU resumes it to step 21, and so does the CPU with OpenBLAS's Prescott kernels (SSE, no FMA)
# (another summation order: the control that shows how far two correct fp32 paths drift apart
# when NVFP4 rounds). Once with NVFP4 W4A4 + FP8 KV (QAD), once unquantized (QAT, quantize: null).
# A second GPU run stops at step 10 and the CPU resumes that checkpoint to step 21. (Calibrating
# on each device gives activation amax a few ulps apart, which moves NVFP4 scales: README, GPU section.)
short=(--set train.schedule=constant --set train.warmup_steps=0 --set train.eval_every=0 --set train.save_every=100
       --set export.verify=false)
run() { local recipe=$1 dir=$2; shift 2; step $Q apply "$recipe" "${short[@]}" --set export.dir=/tmp/$dir \
          --set train.checkpoint_dir=/tmp/$dir.work/checkpoints "$@" 2>&1 | tail -12 | tee "$out/$dir.txt"; }
# resume RECIPE FROM DIR ARGS…: DIR starts from FROM's checkpoints.
resume() { local recipe=$1 from=$2 dir=$3; shift 3; rm -rf /tmp/$dir.work; mkdir -p /tmp/$dir.work
           cp -r /tmp/$from.work/checkpoints /tmp/$dir.work/; run "$recipe" "$dir" --resume --force-resume "$@"; }
qad=recipes/fortune-lm-qad.yaml qat=recipes/fortune-lm-qat.yaml
run $qad cpu --set train.steps=21
run $qad cpu1 --set train.steps=1
resume $qad cpu1 gpu --set train.steps=21 --device cuda --precision fp32
OPENBLAS_CORETYPE=Prescott resume $qad cpu1 cpuh --set train.steps=21
resume $qad cpu1 chain --set train.steps=10 --device cuda --precision fp32
resume $qad chain chain2 --set train.steps=21
run $qat nq-cpu --set train.steps=21 --set quantize=null
run $qat nq-cpu1 --set train.steps=1 --set quantize=null
resume $qat nq-cpu1 nq-gpu --set train.steps=21 --set quantize=null --device cuda --precision fp32
OPENBLAS_CORETYPE=Prescott resume $qat nq-cpu1 nq-cpuh --set train.steps=21 --set quantize=null
for d in cpu gpu cpuh chain2 nq-cpu nq-gpu nq-cpuh; do cp /tmp/$d.work/metrics.jsonl "$out/metrics-$d.jsonl" 2>/dev/null; done
python3 - "$out" <<'PY' 2>&1 | tee "$out/compare.txt"
import json, sys
d = sys.argv[1]
def rd(f):
    try: return {r["step"]: r for r in map(json.loads, open(f"{d}/metrics-{f}.jsonl")) if "loss" in r}
    except OSError: return {}
rel = lambda a, b: abs(a - b) / abs(b)
def compare(label, ref, other, first=2):
    steps = [s for s in sorted(other) if s >= first and s in ref]
    if not steps: print(f"{label}: no steps to compare"); return
    worst = max(rel(other[s]["loss"], ref[s]["loss"]) for s in steps)
    print(f"{label}, steps {steps[0]}-{steps[-1]}: max relative loss difference {worst:.2e}")
    for s in steps[:4]: print(f"    step {s:2d}  {other[s]['loss']:.7f} vs {ref[s]['loss']:.7f}  grad_norm "
                              f"{other[s]['grad_norm']:.6f} / {ref[s]['grad_norm']:.6f}")
c = rd("cpu")
compare("NVFP4 QAD fp32: GPU resumed from the CPU's step 1 vs the CPU (goal 1e-4)", c, rd("gpu"))
compare("NVFP4 QAD fp32: CPU with Prescott kernels resumed from step 1 vs the CPU (the control)", c, rd("cpuh"))
compare("NVFP4 QAD: GPU checkpoint (step 10) resumed on the CPU vs the CPU", c, rd("chain2"), first=11)
n = rd("nq-cpu")
compare("unquantized QAT fp32: GPU resumed from the CPU's step 1 vs the CPU (goal 1e-4)", n, rd("nq-gpu"))
compare("unquantized QAT fp32: CPU with Prescott kernels vs the CPU (the control)", n, rd("nq-cpuh"))
PY
step $Q apply recipes/fortune-lm-qad.yaml --device cuda --precision bf16 --set export.dir=/tmp/qad-bf16 2>&1 | tail -30 | tee "$out/qad-bf16.txt"
cp /tmp/qad-bf16.work/metrics.jsonl "$out/metrics-qad-bf16.jsonl" 2>/dev/null
