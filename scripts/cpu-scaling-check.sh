#!/usr/bin/env bash
# CPU scaling checks for a many-core host without a Swift toolchain (the 16-core GPU host): unpack
# the bundle that scripts/bundle.sh wrote and, from the repository root (models/fortune-lm is
# read from there), write under OUT_DIR:
#   machine.txt          CPU, cores, cgroup quota, PyTorch version (each bench log names the OpenBLAS kernels)
#   peer.txt             fortune QAT/QAD steps at all cores, the PyTorch peer at as many threads,
#                        interleaved (ratios of medians)
#   scaling-fortune.*    qat bench --scaling, fortune shape, 1, 2, 4, … threads up to all cores
#   scaling-smollm.*     the same for the SmolLM2-135M shape (2 threads up, SMOLLM_THREADS; SMOLLM_REPEATS
#                        laps after a warm-up, default 1, under SMOLLM_LIMIT seconds, default 210)
#   profile-*.txt        per-phase wall/CPU time of the steps at all cores (fortune, smollm)
# (.txt: the table and progress; .json: `--json`). Every step has its own time limit and a
# failing step does not stop the others; the whole script takes about 5 minutes on 16 cores.
#   bash scripts/cpu-scaling-check.sh BUNDLE.tar.xz OUT_DIR [PEER_SCRIPT]
# PEER_SCRIPT defaults to .device/torch_qat_step.py, else ../shared/peer/torch_qat_step.py;
# PYTHON (default python3) needs torch and transformers.
set -uo pipefail
bundle=$(readlink -f "$1") out=$(mkdir -p "$2" && readlink -f "$2")
cd "$(dirname "$0")/.."
peer=${3:-}
if [ -z "$peer" ]; then
  for p in .device/torch_qat_step.py ../shared/peer/torch_qat_step.py; do [ -f "$p" ] && { peer=$p; break; }; done
fi
py=${PYTHON:-python3}
work=$(mktemp -d /tmp/qat-cpu.XXXXXX)
tar -C "$work" -xJf "$bundle" || { echo "cannot unpack $bundle" >&2; exit 1; }
Q=$work/qat-linux-x86_64/qat
start=$SECONDS
# All cores (THREADS overrides): nproc follows the affinity mask; qat also honours a cgroup quota.
threads=${THREADS:-$(nproc)}
smollm_threads=${SMOLLM_THREADS:-$(t=2; l=""; while [ $t -lt "$threads" ]; do l="$l$t,"; t=$((t * 2)); done; echo "$l$threads")}
# step NAME LIMIT_S CMD...: runs CMD with a time limit, stdout to OUT/NAME.json or .txt, stderr
# (and a trailer with the exit status and seconds) to OUT/NAME.txt.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $* ($((SECONDS - start)) s in)" | tee -a "$out/summary.txt"
  local s=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out/$name.out" 2>"$out/$name.txt"
  local rc=$?
  echo "== $name rc=$rc ($((SECONDS - s)) s)" | tee -a "$out/summary.txt" "$out/$name.txt"
}
{
  echo "date: $(date -u +%FT%TZ)"; echo "nproc: $(nproc)"; echo "online: $(getconf _NPROCESSORS_ONLN)"
  grep -m1 "model name" /proc/cpuinfo; grep Cpus_allowed_list /proc/self/status
  echo "cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
  lscpu 2>/dev/null | grep -E "Socket|Core|Thread|NUMA|L3|Flags" | cut -c1-200
  free -g | head -2; uptime
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'threads', torch.get_num_threads(), 'transformers', transformers.__version__)" 2>&1
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
# The peer comparison first: it is the figure the issue asks for.
if [ -n "$peer" ] && [ -f "$peer" ]; then
  step peer 180 "$Q" bench --shapes fortune --threads "$threads" --peer "$py" --peer-script "$peer"
else
  echo "== peer skipped: no peer script (.device/torch_qat_step.py)" | tee -a "$out/summary.txt"
fi
step scaling-fortune 120 "$Q" bench --scaling --shapes fortune --repeats 3 --json
step scaling-smollm "${SMOLLM_LIMIT:-210}" "$Q" bench --scaling --shapes smollm --repeats "${SMOLLM_REPEATS:-1}" \
  --scaling-threads "$smollm_threads" --json
step profile-fortune 60 "$Q" bench --shapes fortune --threads "$threads" --repeats 2 --no-micro --profile
[ $((SECONDS - start)) -lt 300 ] && step profile-smollm 90 "$Q" bench --shapes smollm --threads "$threads" --repeats 1 --no-micro --profile
[ $((SECONDS - start)) -lt 330 ] && step nospin-fortune 30 env QAT_SPIN_US=0 "$Q" bench --shapes fortune --threads "$threads" --repeats 3 --no-micro
for f in "$out"/*.out; do  # keep the JSON as .json, the tables as part of .txt
  case "$f" in *scaling*) mv "$f" "${f%.out}.json" ;; *) cat "$f" >>"${f%.out}.txt"; rm -f "$f" ;; esac
done
echo "== done in $((SECONDS - start)) s; logs in $out" | tee -a "$out/summary.txt"
rm -rf "$work"
