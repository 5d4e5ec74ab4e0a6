#!/usr/bin/env bash
# The GPU host's checks, in one call (the host has no Swift toolchain): unpack the bundle that
# scripts/bundle.sh wrote, run the selftest, fortune-lm evaluation in fp32 and bf16, PTQ on the
# GPU against PTQ on the CPU (export bytes compared), and the forward benchmark with the peer.
#   bash scripts/gpu-check.sh BUNDLE.tar.xz PEER_SCRIPT OUT_DIR
set -uo pipefail
bundle=$1 peer=$2 out=$3
mkdir -p "$out" /tmp/qatb
tar -C /tmp/qatb -xJf "$bundle"
Q=/tmp/qatb/qat-linux-x86_64/qat
export QAT_KERNEL_CACHE=/tmp/qat-kernels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
step() { echo "== $*"; local s=$SECONDS; "$@"; local rc=$?; echo "== rc=$rc ($((SECONDS - s)) s)"; return $rc; }
step $Q selftest --device cuda 2>&1 | tee "$out/selftest.txt"
step $Q eval --device cuda --model models/fortune-lm --json 2>&1 | tee "$out/eval.txt"
step $Q eval --device cuda --precision bf16 --model models/fortune-lm --json 2>&1 | tee -a "$out/eval.txt"
step $Q apply recipes/fortune-lm-ptq.yaml --device cuda --set export.dir=/tmp/ptq-gpu 2>&1 | tee "$out/ptq.txt"
step $Q apply recipes/fortune-lm-ptq.yaml --set export.dir=/tmp/ptq-cpu 2>&1 | tee -a "$out/ptq.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/ptq.txt"
import json, struct
def tensors(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); base = 8 + n
    return {k: b[base + v["data_offsets"][0]: base + v["data_offsets"][1]] for k, v in h.items() if k != "__metadata__"}
g, c = tensors("/tmp/ptq-gpu/model.safetensors"), tensors("/tmp/ptq-cpu/model.safetensors")
diff = [k for k in c if g.get(k) != c[k]]
print(f"export GPU vs CPU: {len(c)} tensors, {len(diff)} differ: {diff[:12]}")
for k in diff[:12]:
    if k.endswith("input_scale") or k.endswith("_scale") and len(c[k]) == 4:
        print(k, struct.unpack("<f", c[k])[0], struct.unpack("<f", g[k])[0])
PY
step $Q bench --device cuda --peer python3 --peer-script "$peer" 2>&1 | tee "$out/bench.txt"
