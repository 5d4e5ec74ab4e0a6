#!/usr/bin/env bash
# The main job on a fresh machine: system packages (if missing), a release build, then
# `qat apply recipes/default.yaml` (QAT of the embedded fortune-lm to NVFP4, then export).
# Extra arguments go to `qat apply` (e.g. --set train.steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release --product qat
.build/release/qat apply recipes/default.yaml "$@"
