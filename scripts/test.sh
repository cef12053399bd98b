#!/usr/bin/env bash
# The README's test command: sets up .venv from nothing (pinned versions), runs the whole test suite,
# then the suites that need their own pinned environments (the real verl, the real vLLM CPU build),
# each of which sets up its own virtual environment (scripts/test_<name>.sh).
# Triton kernels run under the Triton interpreter on a CPU machine (tests/conftest.py sets it).
# Arguments go to the main suite's pytest, and then only the main suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest -n 2 --timeout 900 "$@"
[ $# -eq 0 ] || exit 0
for suite in scripts/test_verl.sh scripts/test_vllm.sh; do
    if [ -f "$suite" ]; then
        echo "== $suite"
        bash "$suite"
    fi
done
