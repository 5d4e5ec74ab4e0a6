#!/usr/bin/env bash
# Offline top-k QAD on fortune-lm, every objective × k: writes the teacher caches once (top-64
# and 64 draws by the teacher; top-8 and 8 draws narrowed from those with --from-cache), then runs recipes/fortune-lm-qad-topk.yaml (300 steps of
# 16 × 256 at lr 1e-4, the live QAD budget) per (objective, k) and prints one table row each:
# the exported model's validation loss, the share of the PTQ gap it closes, the cache size
# (MB and bytes per token) and the median step time (metrics.jsonl, first two steps skipped).
# Runs are sequential and niced; a run whose summary is already in WORK is not run again. Usage:
#   scripts/bench-topk.sh [steps] [runs...]      runs: objective:k, e.g. coarse_kl:64 sampled:8
# Environment: WORK (cache and run directory, default /tmp/qat-topk-bench), QAT (the qat binary,
# default .build/release/qat; a copy keeps a long campaign safe from rebuilds). The gap is
# (PTQ − exported)/(PTQ − unquantized) with both references from the run's own summary.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-300}"; shift || true
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(coarse_kl:64 teacher_normalized:64 both_normalized:64 coarse_kl:8
                              sampled:64 teacher_normalized:8 both_normalized:8 sampled:8)
qat="${QAT:-.build/release/qat}"
[ -x "$qat" ] || nice -n 10 swift build -c release --product qat >/dev/null
work="${WORK:-/tmp/qat-topk-bench}"
unq="${UNQ:-3.7709}"; ptq="${PTQ:-3.7969}"
mkdir -p "$work"

cache() {  # kind k → path (written once; k < 64 narrowed from the k = 64 cache)
  local kind=$1 k=$2 p="$work/teacher-$1$2.h5"
  if [ ! -f "$p" ]; then
    local flag=(--top-k "$k"); [ "$kind" = sampled ] && flag=(--sample "$k")
    if [ "$k" -lt 64 ]; then
      nice -n 10 "$qat" teacher-logprobs --from-cache "$(cache "$kind" 64)" "${flag[@]}" --out "$p" --json > "$p.json"
    else
      nice -n 10 "$qat" teacher-logprobs --model models/fortune-lm --data models/fortune-lm/tokens.h5 --seq-len 256 \
        "${flag[@]}" --out "$p" --json > "$p.json"
    fi
  fi
  echo "$p"
}

printf '%-20s %4s %10s %8s %10s %11s %10s\n' objective k "val loss" "gap" "cache MB" "B/token" "step s"
for run in "${runs[@]}"; do
  obj=${run%%:*}; k=${run##*:}
  kind=topk; [ "$obj" = sampled ] && kind=sampled
  c=$(cache "$kind" "$k")
  out="$work/run-$obj-$k"
  grep -q '"exported"' "$out.json" 2>/dev/null || { rm -rf "$out" "$out.work"; nice -n 10 "$qat" apply recipes/fortune-lm-qad-topk.yaml --json --quiet --set "train.steps=$steps" \
    --set "train.distill.teacher_logprobs=$c" --set "train.distill.topk_objective=$obj" --set "export.dir=$out" \
    > "$out.json" 2> "$out.log" || { tail -5 "$out.log" >&2; exit 1; }; }
  python3 - "$obj" "$k" "$out.json" "$c.json" "$out.work/metrics.jsonl" "$unq" "$ptq" <<'EOF'
import json, statistics, sys
obj, k, summary, cache, metrics, unq, ptq = sys.argv[1:]
s = json.load(open(summary)); c = json.load(open(cache))
loss = s["exported"]["val_loss"]
rows = [json.loads(l) for l in open(metrics)][2:]
step = statistics.median(16 * 256 / r["tokens_per_s"] for r in rows)
unq = s.get("unquantized", {}).get("val_loss") or float(unq)
ptq = s.get("ptq", {}).get("val_loss") or float(ptq)
gap = (ptq - loss) / (ptq - unq)
print(f"{obj:<20} {k:>4} {loss:10.4f} {100 * gap:7.0f}% {c['bytes'] / 1e6:10.1f} {c['bytes_per_token']:11.1f} {step:10.2f}")
EOF
done
