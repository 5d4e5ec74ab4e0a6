#!/usr/bin/env bash
# The main job on a fresh machine: system packages (if missing), a release build, then
# `qat eval` of the embedded fortune-lm on its validation split. Extra arguments go to qat.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release --product qat
.build/release/qat eval --model models/fortune-lm --data models/fortune-lm/tokens.h5 --split validation --seq-len 256 "$@"
