#!/usr/bin/env bash
# Creates .venv in the repository root and installs fusedrl with its test and engine extras.
# On a CPU machine torch is pinned to the local CPU build first (torch==2.13.0), so that no
# later requirement can pull a CUDA build of several gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" torch
    else
        "${PIP[@]}" "torch==2.13.0" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    fi
fi
"${PIP[@]}" -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
