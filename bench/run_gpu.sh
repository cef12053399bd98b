#!/usr/bin/env bash
# The one command for a GPU machine: sets up Python, then, within 10 minutes in all (set-up included):
#   1. records the device, driver and versions (bench/device_info.py; the benchmark sessions measure
#      the copy and matmul ceilings themselves);
#   2. runs the `gpu`-marked tests (compiled kernels at full sizes), then the rest of the suite as CI
#      runs it (CUDA hidden: the kernels' CPU twins run under the Triton interpreter);
#   3. runs every benchmark module, each with its own JSON, so that one that runs out of time loses
#      only its own rows;
# and writes bench/results/<device>-<date>.md (bench/report.py's table) and .json (every benchmark with
# the device, driver, torch and triton versions and the ceilings), copied to $OUT too when that is set
# (the lent GPU machines return what lands there). Exit status: the test suite's.
#
# Set-up, one of two ways:
# - online: scripts/bootstrap.sh makes .venv (the CUDA build of torch; Liger-Kernel comes with the
#   bench extra) and adds the GPU-only peer cut-cross-entropy;
# - offline, when .wheelhouse/ exists (made by scripts/wheelhouse.sh on a machine with an index and
#   carried along): the machine's own python3, which already holds CUDA torch and Triton, gets the
#   carried wheels and fusedrl itself, with no network.
# Usage: bash bench/run_gpu.sh [extra pytest arguments for the test suite]
# RUN_GPU_BUDGET_S (default 570) is the whole run's time budget in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
budget_end=$((SECONDS + ${RUN_GPU_BUDGET_S:-570}))
PIP_QUIET=(--quiet --disable-pip-version-check)

if [ -d .wheelhouse ]; then
    PY=${PYTHON:-python3}
    echo "run_gpu: offline set-up into $("$PY" -c 'import sys; print(sys.prefix)') from .wheelhouse/"
    "$PY" -c "import torch, triton" || { echo "run_gpu: $PY has no torch / triton to build on"; exit 1; }
    "$PY" -m pip install "${PIP_QUIET[@]}" --no-index --no-deps .wheelhouse/*.whl || exit 1
    "$PY" -m pip install "${PIP_QUIET[@]}" --no-index --no-deps --no-build-isolation -e . || exit 1
    # Versions that differ from what the carried wheels declare are listed, not fatal: the test
    # suite below shows whether they matter.
    "$PY" -m pip check || echo "run_gpu: pip check lists the mismatches above"
else
    bash scripts/bootstrap.sh || exit 1
    PY=.venv/bin/python
    "$PY" -m pip install "${PIP_QUIET[@]}" cut-cross-entropy \
        || echo "run_gpu: cut-cross-entropy did not install; its rows will skip"
fi

work=$(mktemp -d)
"$PY" bench/device_info.py "$work/device.json" || exit 1
slug=$("$PY" -c 'import json, re, sys; print(re.sub("[^a-z0-9]+", "-", json.load(open(sys.argv[1]))["device"].lower()).strip("-"))' "$work/device.json")
stem="bench/results/$slug-$(date -u +%Y-%m-%d)"
mkdir -p bench/results

# The tests get at most half of what is left, the benchmarks the rest. Two sessions: the GPU tests,
# compiled kernels at full sizes; then the rest of the suite as CI runs it (CUDA hidden, so the Triton
# kernels run under the interpreter at CI's shapes and every CPU twin runs too).
run_tests() {  # label, time limit, pytest arguments...
    local label=$1 limit=$2
    shift 2
    echo "run_gpu: $label (at most $limit s)"
    timeout "$limit" "$@" 2>&1 | tee -a "$work/tests.log"
    local status=${PIPESTATUS[0]} summary
    summary=$(grep -E "passed|failed|error|no tests ran" "$work/tests.log" | tail -n 1)
    [ "$status" -eq 124 ] && summary="stopped after $limit s: $summary"
    tests_summary="${tests_summary:+$tests_summary; }$label: $summary"
    [ "$status" -ne 0 ] && tests_status=$status
    return 0
}
tests_status=0
tests_summary=""
tests_limit=$(( (budget_end - SECONDS) / 2 ))
[ "$tests_limit" -gt 300 ] && tests_limit=300
run_tests "GPU tests" $((tests_limit / 2)) "$PY" -m pytest tests -m gpu -n 0 -q -rs -p no:cacheprovider --timeout 240 "$@"
run_tests "CPU suite" $((tests_limit - tests_limit / 2)) env CUDA_VISIBLE_DEVICES= "$PY" -m pytest tests -m "not gpu" \
    -n 8 -q -p no:cacheprovider --timeout 240 "$@"

jsons=()
modules=(bench/test_bench_*.py)
for i in "${!modules[@]}"; do
    module=${modules[$i]}
    # An equal share of what is left (15 s kept for the report), so a slow module cannot starve the rest.
    limit=$(( (budget_end - SECONDS - 15) / (${#modules[@]} - i) ))
    if [ "$limit" -le 10 ]; then
        echo "run_gpu: no time left for $module"
        continue
    fi
    echo "run_gpu: $module (at most $limit s)"
    json="$work/$(basename "$module" .py).json"
    timeout "$limit" "$PY" -m pytest "$module" -n 0 -q -rs -p no:cacheprovider \
        --benchmark-only --benchmark-json="$json"
    [ -s "$json" ] && jsons+=("$json")
done
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && cp "$work/tests.log" "$OUT/tests.log"

if [ "${#jsons[@]}" -gt 0 ]; then
    "$PY" bench/report.py "${jsons[@]}" --device-info "$work/device.json" --json-output "$stem.json" \
        -o "$stem.md" --note "tests: ${tests_summary:-no summary}"
    echo "run_gpu: wrote $stem.md and $stem.json"
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] && cp "$stem.md" "$stem.json" "$OUT"/
else
    echo "run_gpu: no benchmark finished"
fi
exit "$tests_status"
