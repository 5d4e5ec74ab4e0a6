#!/usr/bin/env bash
# Scaling figures of `qat apply` on this machine: the same QAD recipe (fortune-lm, 2 micro-batches
# of 8 × 256 tokens per step) run by 1 process, by 2 data-parallel ranks (with and without ZeRO-1)
# and by 2 pipeline stages. Prints the median step time, the bytes rank 0 hands to MPI per step
# (metrics.jsonl's comm_mb), the time rank 0 spends inside MPI calls per step (comm_s:
# transfers and waiting for the other ranks) and rank 0's peak RSS. Step times: median [min, max] over the
# steps after two warm-up steps. Usage: scripts/bench-scaling.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-12}"
qat=.build/release/qat
[ -x "$qat" ] || swift build -c release --product qat >/dev/null
command -v mpirun >/dev/null || { echo "mpirun not found: bash scripts/deps.sh installs Open MPI" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader,tcp \
  OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
work=$(mktemp -d /tmp/qat-scaling.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat > "$work/recipe.yaml" <<EOF
model: models/fortune-lm
data:
  seq_len: 256
  validation_sequences: 8
quantize:
  preset: nvfp4_default-kv_fp8
calibration:
  samples: 16
train:
  mode: qad
  steps: $steps
  batch_size: 8
  grad_accum: 2
  lr: 1.0e-4
  eval_every: 0
  save_every: 0
export:
  verify: false
EOF
mpi=(mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none)
run() {  # name, launcher..., then qat arguments after --
  local name=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done; shift
  "${launcher[@]}" "$qat" apply "$work/recipe.yaml" --quiet --set "export.dir=$work/$name" "$@" >"$work/$name.log" 2>&1 \
    || { cat "$work/$name.log" >&2; exit 1; }
  python3 - "$name" "$work/$name.work/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[2])][2:]  # the first two steps warm up
tokens = 2 * 8 * 256
ts = [tokens / r["tokens_per_s"] for r in rows]
t = statistics.median(ts)
comm = statistics.median(r.get("comm_mb", 0.0) for r in rows)
wait = statistics.median(r.get("comm_s", 0.0) for r in rows)
print(f"{sys.argv[1]:<28} {t:6.3f} [{min(ts):.3f}, {max(ts):.3f}] s {tokens / t:7.0f} tok/s {comm:7.1f} MB {wait:7.3f} s"
      f" {rows[-1]['peak_rss_mb']:7.0f} MB")
EOF
}
echo "configuration                step time: median [min, max]  tokens/s  comm/step  in MPI  peak RSS (rank 0)"
run "1 process"                 env -- 
run "1 process, 1 thread"       env -- --threads 1
run "2 ranks data parallel"     "${mpi[@]}" -- --set train.batch_size=4
run "2 ranks DP + ZeRO-1"       "${mpi[@]}" -- --set train.batch_size=4 --set train.shard_optimizer_state=true
run "2 pipeline stages"         "${mpi[@]}" -- --set train.pipeline_stages=2
run "1 process, 8 micro-b. of 2" env -- --set train.batch_size=2 --set train.grad_accum=8
run "2 stages, 8 micro-b. of 2" "${mpi[@]}" -- --set train.pipeline_stages=2 --set train.batch_size=2 --set train.grad_accum=8
