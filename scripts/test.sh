#!/usr/bin/env bash
# The whole test suite, in release mode (the kernels are too slow unoptimised), after
# installing the system packages if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release --build-tests
swift test -c release --skip-build "$@"
