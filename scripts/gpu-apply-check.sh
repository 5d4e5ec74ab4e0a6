#!/usr/bin/env bash
# A whole `qat apply` of the Qwen3-0.6B shape on the GPU host, timed: random weights written by the
# peer script (`modelopt_gpu_speed.py --save`, the same model its speed rows use), the fortune-lm
# token ids (all below Qwen3's vocabulary) packed at 1024, NVFP4 W4A4 + FP8 KV, max calibration on
# 32 sequences, 50 QAD steps of 8×1024 in bf16 with the unquantized model as the teacher, export,
# and verify (the export reloaded, its logits against the fake-quant model's: max |Δlogit|).
#   bash scripts/gpu-apply-check.sh BUNDLE.tar.xz OUT_DIR [PEER_SCRIPT] [EXTRA --set …]
set -uo pipefail
bundle=$(readlink -f "$1") out=$(mkdir -p "$2" && readlink -f "$2")
peer=${3:-.device/modelopt_gpu_speed.py}
shift $(($# < 3 ? $# : 3))
cd "$(dirname "$0")/.."
mkdir -p /tmp/qatb && { [ -x /tmp/qatb/qat-linux-x86_64/qat ] || tar -C /tmp/qatb -xJf "$bundle"; }
Q=/tmp/qatb/qat-linux-x86_64/qat
export QAT_KERNEL_CACHE=${QAT_KERNEL_CACHE:-/tmp/qat-kernels}
model=/tmp/qwen3-0.6b-random
s=$SECONDS
[ -f $model/config.json ] || PYTHONUNBUFFERED=1 timeout 240 python3 "$peer" qwen3-0.6b --save $model --modes fwd --steps 2 \
  >"$out/save.txt" 2>&1
echo "model written in $((SECONDS - s)) s: $(du -sh $model | cut -f1)" | tee -a "$out/apply.txt"
cat >/tmp/qwen3-qad.yaml <<YAML
model: $model
data:
  train: $PWD/models/fortune-lm/tokens.h5
  validation: $PWD/models/fortune-lm/tokens.h5
  seq_len: 1024
quantize:
  preset: nvfp4_default-kv_fp8
calibration:
  samples: 32
  batch_size: 8
train:
  mode: qad
  steps: 50
  batch_size: 8
  lr: 1.0e-5
  schedule: cosine
  warmup_steps: 5
  eval_every: 0
  save_every: 0
  seed: 42
  distill:
    loss: forward_kl
device: cuda
precision: bf16
export:
  dir: /tmp/qwen3-qad-export
YAML
s=$SECONDS
timeout 420 $Q apply /tmp/qwen3-qad.yaml "$@" 2>&1 | tee -a "$out/apply.txt"
echo "== qat apply rc=${PIPESTATUS[0]} wall $((SECONDS - s)) s" | tee -a "$out/apply.txt"
cp /tmp/qwen3-qad-export.work/metrics.jsonl "$out/apply-metrics.jsonl" 2>/dev/null
ls -la /tmp/qwen3-qad-export >>"$out/apply.txt" 2>&1
