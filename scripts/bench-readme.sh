#!/usr/bin/env bash
# Regenerates every performance and memory figure that README.md quotes. The README's tables
# name the line of this script that produced each figure; each command is printed ("+ ...")
# before its output. Timings are medians of 5 laps after a warm-up, printed as median [min, max];
# each peak is its configuration's own (see `qat bench --help`).
# Usage: nice -n 0 scripts/bench-readme.sh [PEER_PYTHON]   (takes about half an hour on 2 cores)
# The PyTorch peer: python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch transformers safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${1:-/tmp/peer/bin/python}"
script=""
for s in ../shared/peer/torch_qat_step.py ../../shared/peer/torch_qat_step.py; do [ -f "$s" ] && script=$s && break; done
qat=.build/release/qat
[ -x "$qat" ] || swift build -c release --product qat >/dev/null
[ -x "$peer" ] && [ -n "$script" ] || { echo "no PyTorch peer at $peer or no ../shared/peer (see ../shared/peer/README.md)" >&2; exit 1; }
run() { echo "+ $*"; "$@"; echo; }
echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)"
run "$qat" bench --shapes fortune --peer "$peer" --peer-script "$script"      # fortune-lm, PyTorch peer, memcpy, fake quant
run "$qat" bench --shapes smollm --no-micro                                   # SmolLM2-135M shape
run "$qat" bench --shapes "" --no-micro --loss-tokens 1024,4096,16384 --repeats 1  # KD loss memory, one lap each
run scripts/bench-scaling.sh                                                  # the MPI scaling table
