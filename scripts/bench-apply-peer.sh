#!/usr/bin/env bash
# qat against the PyTorch peer by whole runs, so that loading, calibration and export cancel out:
# the per-step time is (wall time of a 25-step run − wall time of a 5-step run) / 20, for
# `qat apply` (fortune-lm, nvfp4_default-kv_fp8, batch 8 × 256, no evaluation or checkpoints
# during training) and for the peer script (the same steps, its own warm-up step included in
# both), QAT and QAD, in interleaved rounds. Prints each round and the medians.
#   scripts/bench-apply-peer.sh [PYTHON] [ROUNDS] [PEER_SCRIPT]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:-/tmp/peer/bin/python} rounds=${2:-3} peer=${3:-../shared/peer/torch_qat_step.py}
qat=.build/release/qat
work=$(mktemp -d /tmp/qat-apply-peer.XXXXXX)
trap 'rm -rf "$work"' EXIT
wall() { local s; s=$(date +%s.%N); "$@" >"$work/last.log" 2>&1 || { echo "failed: $*" >&2; tail -3 "$work/last.log" >&2; }
         echo "$(date +%s.%N) - $s" | bc; }
apply() {  # mode steps
  wall "$qat" apply "recipes/fortune-lm-$1.yaml" --quiet --set train.steps="$2" --set train.batch_size=8 \
    --set train.eval_every=0 --set train.save_every=0 --set export.dir="$work/export-$1-$2"
}
peer_run() { wall "$py" "$peer" models/fortune-lm --batch 8 --seq 256 --mode "$1" --steps "$2"; }
echo "round mode  qat/step  peer/step  peer÷qat   (seconds per step from 25-step minus 5-step runs)"
for r in $(seq 1 "$rounds"); do
  for mode in qat qad; do
    q25=$(apply $mode 25); q5=$(apply $mode 5); p25=$(peer_run $mode 25); p5=$(peer_run $mode 5)
    echo "$r $mode $q25 $q5 $p25 $p5" | awk '{q=($3-$4)/20; p=($5-$6)/20; printf "%5d %-4s %9.3f %10.3f %8.2fx   (runs: qat %.1f/%.1f s, peer %.1f/%.1f s)\n", $1, $2, q, p, p/q, $3, $4, $5, $6}' \
      | tee -a "$work/rounds.txt"
  done
done
python3 - "$work/rounds.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("qat", "qad"):
    q = [float(r[2]) for r in rows if r[1] == mode]
    p = [float(r[3]) for r in rows if r[1] == mode]
    qm, pm = statistics.median(q), statistics.median(p)
    print(f"median {mode:<4} {qm:9.3f} {pm:10.3f} {pm / qm:8.2f}x over {len(q)} rounds")
PY
