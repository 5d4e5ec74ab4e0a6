#!/usr/bin/env bash
# One GPU-host call that checks a new bundle and measures it against ModelOpt, in the order that
# matters if the call is cut short (each step under its own limit, every log unbuffered):
#   1. `qat selftest --device cuda` (every kernel and model path against the CPU);
#   2. `qat bench --device cuda` on the Llama-3.2-1B and Qwen3-0.6B shapes (SHAPES) at 8×1024, forward and
#      QAT/QAD steps, with ModelOpt's QAT/QAD steps and PyTorch's forward in the same run (the peer
#      script, ModelOpt from SITE_TAR: a tar.xz of a pip --target folder named site, see
#      ../shared/peer/README.md);
#   3. scripts/gpu-features-check.sh (LoRA, QLoRA, top-k, checkpointing recipes) with what is left.
# Writes OUT/selftest.txt, OUT/peer-warmup.txt, OUT/bench.txt, OUT/features.tgz (and OUT/cpu-profile.txt, OUT/scaling-smollm.txt) (few files: the device tool brings
# back at most 8).
#   bash scripts/gpu-session-check.sh BUNDLE.tar.xz SITE.tar.xz PEER_SCRIPT OUT_DIR [SECONDS]
# (BENCH_EXTRA: more flags for the bench, e.g. --profile; SHAPE_LIMIT: seconds per shape, default 330; PEER_MODES:
# the peer's modes, default fwd,qat,qad; SCALING=1: also the SmolLM2 CPU scaling, 2 and all threads, after the selftest;
# MULTIGPU=OMPI.tar.xz: scripts/multigpu-check.sh's data-parallel rank checks, to OUT/multigpu.txt; NO_FEATURES=1: no step 3.)
set -uo pipefail
bundle=$(readlink -f "$1") site=$(readlink -f "$2") peer=$(readlink -f "$3") out=$(mkdir -p "$4" && readlink -f "$4")
budget=${5:-560}
cd "$(dirname "$0")/.."
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
mkdir -p /tmp/qatb /tmp/py && tar -C /tmp/qatb -xJf "$bundle" && tar -C /tmp/py -xJf "$site" || exit 1
Q=/tmp/qatb/qat-linux-x86_64/qat
export QAT_KERNEL_CACHE=/tmp/qat-kernels PYTHONPATH=/tmp/py/site PYTHONUNBUFFERED=1
# ModelOpt builds its FP8 CUDA extension (about 70 s of nvcc) at its first QAT run: build it
# beforehand, beside work that times nothing (the selftest; with SCALING, the MULTIGPU checks).
warm_up() {
  timeout 200 python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8; get_cuda_ext_fp8()" \
    >"$out/peer-warmup.txt" 2>&1 &
  warmup=$!
}
[ -z "${SCALING:-}" ] && warm_up
timeout 120 $Q selftest --device cuda >"$out/selftest.txt" 2>&1
echo "selftest rc=$? at $((SECONDS - start)) s" | tee -a "$out/selftest.txt"
# SCALING=1: the SmolLM2 shape's CPU scaling (issue 18) at 2 and all threads, 3 laps, while nothing else runs.
if [ -n "${SCALING:-}" ]; then
  timeout "${SCALING_LIMIT:-200}" $Q bench --scaling --shapes smollm --scaling-threads "2,$(nproc)" --repeats 3 \
    >"$out/scaling-smollm.txt" 2>&1
  echo "scaling rc=$? at $((SECONDS - start)) s" | tee -a "$out/scaling-smollm.txt"
  warm_up
fi
# MULTIGPU=OMPI.tar.xz (scripts/ompi-carry.sh): scripts/multigpu-check.sh's rank checks (no selftest, no Llama),
# beside the warm-up, under MULTIGPU_LIMIT seconds (default 150); its summary to OUT/multigpu.txt.
if [ -n "${MULTIGPU:-}" ]; then
  mkdir -p /tmp/multigpu
  SELFTEST=0 LLAMA=0 timeout "${MULTIGPU_LIMIT:-150}" bash scripts/multigpu-check.sh "$bundle" /tmp/multigpu "$(readlink -f "$MULTIGPU")" \
    >/tmp/multigpu/run.log 2>&1
  echo "multigpu rc=$? at $((SECONDS - start)) s" >>/tmp/multigpu/summary.txt
  cat /tmp/multigpu/summary.txt >"$out/multigpu.txt"; tail -40 /tmp/multigpu/run.log >>"$out/multigpu.txt"
fi
wait $warmup
echo "ModelOpt extension warm-up rc=$? at $((SECONDS - start)) s" | tee -a "$out/peer-warmup.txt"
# One bench per shape (SHAPES, in order), each with its own limit, so a slow peer cannot take the next shape's time.
for shape in ${SHAPES:-llama-3.2-1b qwen3-0.6b}; do
  [ "$(left)" -gt 120 ] || { echo "== $shape skipped: $(left) s left" | tee -a "$out/bench.txt"; continue; }
  echo "== $shape at $((SECONDS - start)) s" >>"$out/bench.txt"
  limit=$(($(left) - 60)); [ "$limit" -gt "${SHAPE_LIMIT:-330}" ] && limit=${SHAPE_LIMIT:-330}
  timeout "$limit" $Q bench --device cuda --shapes "$shape" --batch 8 --seq 1024 --repeats 5 ${BENCH_EXTRA:-} \
    --peer python3 --peer-script "$peer" --peer-modes "${PEER_MODES:-fwd,qat,qad}" >>"$out/bench.txt" 2>&1
  echo "bench $shape rc=$? at $((SECONDS - start)) s" | tee -a "$out/bench.txt"
done
if [ -z "${NO_FEATURES:-}" ] && [ "$(left)" -gt 40 ]; then
  mkdir -p /tmp/features
  SKIP_SELFTEST=1 timeout $(($(left) - 10)) bash scripts/gpu-features-check.sh "$bundle" /tmp/features >/tmp/features/run.log 2>&1
fi
tar -C /tmp -czf "$out/features.tgz" features 2>/dev/null
# CPU_PROFILE=1: the SmolLM2 QAT/QAD step phases on all of the host's cores with the time left (issue 18).
if [ -n "${CPU_PROFILE:-}" ] && [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 5)) $Q bench --shapes smollm --threads "$(nproc)" --repeats 1 --no-micro --profile >"$out/cpu-profile.txt" 2>&1
fi
echo "done at $((SECONDS - start)) s"
