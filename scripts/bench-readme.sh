#!/usr/bin/env bash
# Regenerates every performance and memory figure that README.md quotes; the README names the
# line of this script that produced each figure. Each command is printed ("+ ...") before its
# output. Timings are medians of 5 laps (3 for the SmolLM2 shape) after a warm-up, printed as
# median [min, max]; each peak is its configuration's own (see `qat bench --help`). On a shared
# machine, quote the load averages printed first and last next to the figures.
# Usage: nice -n 0 scripts/bench-readme.sh [PEER_PYTHON] > out.txt   (lines 19-21: 24 min at load 5-7; line 22: 23 min)
# PyTorch peer: python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch transformers safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${1:-/tmp/peer/bin/python}"
script=""
for s in ../shared/peer/torch_qat_step.py ../../shared/peer/torch_qat_step.py; do [ -f "$s" ] && script=$s && break; done
qat=.build/release/qat
[ -x "$qat" ] || swift build -c release --product qat >/dev/null
[ -x "$peer" ] && [ -n "$script" ] || { echo "no PyTorch peer at $peer or no ../shared/peer (see ../shared/peer/README.md)" >&2; exit 1; }
bench() { echo "+ qat bench $*"; "$qat" bench "$@" 2>&1 >/dev/null; echo; }  # the lines as measured (stderr), not the repeat
echo "# $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)"
bench --shapes fortune --peer "$peer" --peer-script "$script" --peer-steps 2  # fortune-lm steps, PyTorch peer, memcpy, fake quant
bench --shapes smollm --no-micro --repeats 3                         # SmolLM2-135M shape (3 laps: steps of 30-50 s loaded)
echo "+ scripts/bench-scaling.sh"; scripts/bench-scaling.sh; echo     # the MPI scaling table
bench --shapes "" --no-micro --loss-tokens 1024,4096,16384 --repeats 1  # KD loss peaks (one lap each: minutes at 16k)
echo "# done $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
