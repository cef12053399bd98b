#!/usr/bin/env bash
# The README's test command: sets up .venv from nothing, then runs the whole test suite.
# Triton kernels run under the Triton interpreter on a CPU machine (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -n 2 --timeout 900 "$@"
