#!/usr/bin/env bash
# The whole test suite, in release mode (the kernels are too slow unoptimised), after
# installing the system packages if missing. The suite is XCTest; its totals are repeated
# on the last line as "tests: N passed, N failed, N skipped".
#
# Skips are visible and, on CI, failures: every skipped test is listed by name, and the run
# fails when a test skips that is not in ALLOWED_SKIPS (space-separated Class.method names;
# by default only the tool that rewrites the fuzz regression inputs, which runs on demand).
# A missing mpirun or an unbuilt qat binary thus fails CI instead of passing it quietly.
# The fuzz campaigns' input counts are summed on a "fuzz:" line.
#
# Formatting is checked first (scripts/lint.sh: `swift format lint --strict` and no line over
# 140 characters in Sources/ and Tests/); its findings are printed and fail the run at the end,
# after the suite has run.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLOWED_SKIPS=${ALLOWED_SKIPS-"RegressionInputs.testMakeRegressionFiles"}
bash scripts/deps.sh
lint_status=0
bash scripts/lint.sh || lint_status=$?
swift build -c release --build-tests
# The CUDA kernels must compile for sm_90 and sm_100 with NVRTC 13.0.88 from PyPI (no GPU
# needed), through the same NVRTC path qat takes at run time on a GPU host.
nvrtc_env=.build/nvrtc-13.0.88
if [ ! -f "$nvrtc_env/ok" ]; then
  python3 -m venv "$nvrtc_env"
  "$nvrtc_env/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvrtc==13.0.88
  touch "$nvrtc_env/ok"
fi
nvrtc_lib=$(ls "$nvrtc_env"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13)
LD_LIBRARY_PATH="$(dirname "$nvrtc_lib")" .build/release/qat selftest --compile-only sm_90,sm_100 --nvrtc "$nvrtc_lib" | tail -1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
swift test -c release --skip-build --disable-swift-testing "$@" 2>&1 | tee "$log" || status=$?
# The last "Executed N tests, with S tests skipped and F failures" line is the whole run's.
summary=$(grep -E "^[[:space:]]*Executed [0-9]+ tests?, with" "$log" | tail -1 || true)
if [ -n "$summary" ]; then
  total=$(echo "$summary" | sed -E 's/^[[:space:]]*Executed ([0-9]+) tests?.*/\1/')
  # (XCTest's "N failures" counts failed assertions; a test fails once.)
  failed=$(grep -cE "^Test Case '[^']+' failed" "$log" || true)
  skipped=$(echo "$summary" | grep -oE '[0-9]+ tests? skipped' | grep -oE '^[0-9]+' || echo 0)
fi
# XCTest prints "Test Case 'Class.method' skipped (…)" for each skip.
skips=$(sed -nE "s/.*Test Case '([^']+)' skipped.*/\1/p" "$log" | sort -u)
unexpected=""
for t in $skips; do
  case " $ALLOWED_SKIPS " in *" $t "*) echo "skipped (allowed): $t" ;; *) echo "SKIPPED: $t"; unexpected="$unexpected $t" ;; esac
done
fuzz=$(awk '/^fuzz [^:]+: [0-9]+ inputs/ { n += $3; c += 1 } END { if (c) print n " inputs in " c " campaigns" }' "$log")
[ -z "$fuzz" ] || echo "fuzz: $fuzz (parsers built with Swift's checks, see Package.swift)"
if [ -n "$summary" ]; then
  echo "tests: $((total - failed - skipped)) passed, $failed failed, $skipped skipped"
fi
if [ -n "$unexpected" ]; then
  echo "error: tests skipped that must run on CI:$unexpected (install what they need, or add them to ALLOWED_SKIPS)" >&2
  [ "$status" -ne 0 ] || status=1
fi
if [ "$lint_status" -ne 0 ]; then
  echo "error: formatting: scripts/lint.sh found problems (listed above); run scripts/format.sh and shorten long literals" >&2
  [ "$status" -ne 0 ] || status=1
fi
exit $status
