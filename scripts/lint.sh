#!/usr/bin/env bash
# The formatting check of CI (run by scripts/test.sh): `swift format lint --strict` with the
# repository's .swift-format over the paths scripts/format.sh formats, and no line of a file in
# Sources/ or Tests/ longer than 140 characters (the formatter leaves string literals and
# comments as they are, so it cannot shorten those lines itself). Prints every finding and
# exits 1 if there is any; scripts/format.sh fixes what the formatter can.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
if ! out=$(swift format lint --strict --parallel --recursive Sources Tests Package.swift 2>&1); then
  echo "$out" | sort
  echo "lint: swift format lint --strict reported $(echo "$out" | grep -c ': error: \|: warning: ') finding(s); run scripts/format.sh" >&2
  status=1
fi
# Characters, not bytes (the sources hold a few non-ASCII letters such as × and …): grep
# counts characters in a UTF-8 locale (mawk's length() would count bytes).
long=$(find Sources Tests -type f \( -name '*.swift' -o -name '*.cu' -o -name '*.c' -o -name '*.h' \) -print0 | sort -z |
  xargs -0 env LC_ALL=C.UTF-8 grep -nHE '^.{141,}' | cut -c1-200 || true)
if [ -n "$long" ]; then
  echo "$long"
  echo "lint: $(echo "$long" | wc -l) line(s) over 140 characters in Sources/ and Tests/" >&2
  status=1
fi
[ $status -ne 0 ] || echo "lint: swift format lint clean, no line over 140 characters"
exit $status
