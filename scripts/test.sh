#!/usr/bin/env bash
# The whole suite in two streams side by side, since most of it waits on servers, msrun and Airflow:
#   beside: the compiled-engine parity tier (marker `engine`: single-threaded model processes, ~16 minutes
#           here), then the live-cluster tier (marker `cluster`: Celery, PostgreSQL, Redis; ~12 minutes), then
#           the UI and multi-user files listed in BESIDE_FILES (real API servers, a few minutes each);
#   main:   everything else.
# Every tier always runs to the end; the exit status is non-zero if any failed. Extra arguments go to all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NARROWED=${1:-}
BESIDE_FILES=(tests/test_ui.py tests/test_gallery_scope.py tests/test_rank_user.py)
log=$(mktemp -t caption-beside.XXXXXX)
status=$(mktemp -t caption-beside-status.XXXXXX)
(
    "$PY" -m pytest -m engine -p no:cacheprovider "$@"
    engine=$?
    echo "=================== cluster tier (pytest -m cluster), after the engine tier ==================="
    "$PY" -m pytest -m cluster -p no:cacheprovider "$@"
    cluster=$?
    files=0
    if [ -z "$NARROWED" ]; then
        echo "=================== ${BESIDE_FILES[*]}, after the cluster tier ==================="
        "$PY" -m pytest -m "not engine and not cluster" -p no:cacheprovider "${BESIDE_FILES[@]}"
        files=$?
    fi
    echo "$engine $cluster $files" >"$status"
) >"$log" 2>&1 &
beside_pid=$!
ignore=()
[ -n "$NARROWED" ] || for f in "${BESIDE_FILES[@]}"; do ignore+=("--ignore=$f"); done
"$PY" -m pytest -m "not engine and not cluster" "${ignore[@]}" "$@"
main=$?
wait "$beside_pid"
read -r engine cluster files <"$status" || { engine=1; cluster=1; files=1; }
echo "=================== engine tier, cluster tier and ${BESIDE_FILES[*]}, run beside the above ==================="
cat "$log"
rm -f "$log" "$status"
echo "main tier exit $main, engine tier exit $engine, cluster tier exit $cluster, UI files exit $files"
ok() {  # pytest's 5 (no test selected) is fine only when the caller narrowed the run with arguments
    [ "$1" -eq 0 ] || { [ "$1" -eq 5 ] && [ -n "$NARROWED" ]; }
}
ok "$main" && ok "$engine" && ok "$cluster" && ok "$files"
