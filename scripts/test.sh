#!/usr/bin/env bash
# The whole suite, in two tiers side by side: the compiled-engine parity tier (marker `engine`: single-threaded
# model processes, ~8 minutes alone) beside everything else, which mostly waits on servers, msrun and Airflow.
# Both tiers always run to the end; the exit status is non-zero if either failed. Extra arguments go to both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NARROWED=${1:-}
log=$(mktemp -t caption-engine-tier.XXXXXX)
"$PY" -m pytest -m engine -p no:cacheprovider "$@" >"$log" 2>&1 &
engine_pid=$!
"$PY" -m pytest -m "not engine" "$@"
main=$?
wait "$engine_pid"
engine=$?
echo "=================== engine tier (pytest -m engine), run beside the above ==================="
cat "$log"
rm -f "$log"
echo "main tier exit $main, engine tier exit $engine"
ok() {  # pytest's 5 (no test selected) is fine only when the caller narrowed the run with arguments
    [ "$1" -eq 0 ] || { [ "$1" -eq 5 ] && [ -n "$NARROWED" ]; }
}
ok "$main" && ok "$engine"
