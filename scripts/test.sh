#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, types, unit, integration, e2e.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
bin=.venv/bin
echo "== ruff"
"$bin/ruff" check agent collector wire tests bench
echo "== mypy --strict"
"$bin/mypy" --strict agent collector wire
echo "== pytest"
set +e
WAYSTATION_REQUIRE_TOOLS=1 "$bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
