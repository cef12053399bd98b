#!/usr/bin/env bash
# The one command for a GPU machine: sets up .venv (scripts/bootstrap.sh, with the CUDA build of torch
# and the GPU peers Liger-Kernel and cut-cross-entropy), then, within 10 minutes:
#   1. records the device, driver and versions (bench/device_info.py; the benchmark sessions measure
#      the copy and matmul ceilings themselves);
#   2. runs the whole test suite, the `gpu`-marked tests included (they run wherever CUDA is present);
#   3. runs every benchmark module, each with its own JSON, so that one that runs out of time loses
#      only its own rows;
# and writes bench/results/<device>-<date>.md (bench/report.py's table) and .json (every benchmark with
# the device, driver, torch and triton versions and the ceilings). Exit status: the test suite's.
# Usage: bash bench/run_gpu.sh [extra pytest arguments for the test suite]
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
PY=.venv/bin/python
"$PY" -m pip install --quiet --disable-pip-version-check liger-kernel cut-cross-entropy \
    || echo "run_gpu: Liger-Kernel / cut-cross-entropy did not install; their rows will skip"

budget_end=$((SECONDS + 600))
work=$(mktemp -d)
"$PY" bench/device_info.py "$work/device.json" || exit 1
slug=$("$PY" -c 'import json, re, sys; print(re.sub("[^a-z0-9]+", "-", json.load(open(sys.argv[1]))["device"].lower()).strip("-"))' "$work/device.json")
stem="bench/results/$slug-$(date -u +%Y-%m-%d)"
mkdir -p bench/results

echo "run_gpu: test suite"
timeout 300 "$PY" -m pytest tests -n 4 -q -p no:cacheprovider --timeout 240 "$@" 2>&1 | tee "$work/tests.log"
tests_status=${PIPESTATUS[0]}
tests_summary=$(grep -E "passed|failed|error" "$work/tests.log" | tail -n 1)
[ "$tests_status" -eq 124 ] && tests_summary="stopped after 300 s: $tests_summary"

jsons=()
for module in bench/test_bench_*.py; do
    left=$((budget_end - SECONDS - 15))  # 15 s kept for the report
    if [ "$left" -le 10 ]; then
        echo "run_gpu: no time left for $module"
        continue
    fi
    echo "run_gpu: $module (at most $((left < 180 ? left : 180)) s)"
    json="$work/$(basename "$module" .py).json"
    timeout $((left < 180 ? left : 180)) "$PY" -m pytest "$module" -n 0 -q -rs -p no:cacheprovider \
        --benchmark-only --benchmark-json="$json"
    [ -s "$json" ] && jsons+=("$json")
done

if [ "${#jsons[@]}" -gt 0 ]; then
    "$PY" bench/report.py "${jsons[@]}" --device-info "$work/device.json" --json-output "$stem.json" \
        -o "$stem.md" --note "tests (pytest tests, gpu-marked included): ${tests_summary:-no summary}"
    echo "run_gpu: wrote $stem.md and $stem.json"
else
    echo "run_gpu: no benchmark finished"
fi
exit "$tests_status"
