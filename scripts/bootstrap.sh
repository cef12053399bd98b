#!/usr/bin/env bash
# Creates .venv in the repository root and installs fusedrl with its test and engine extras, at the
# versions pinned in requirements/constraints.txt (FUSEDRL_UNPINNED=1: the newest that pyproject.toml
# admits, for scripts/refresh_pins.sh). On a CPU machine torch is pinned to the local CPU build first
# (torch==2.13.0), so that no later requirement can pull a CUDA build of several gigabytes.
# A second run with the same pins and pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=requirements/constraints.txt
say() { echo "bootstrap: $*" >&2; }
stamp_file=.venv/.fusedrl-installed
stamp="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) unpinned=${FUSEDRL_UNPINNED:-0}"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
start=$SECONDS
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
fi
# pip's own progress bars on a terminal; one line per step in a log or pipe.
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on)
[ -t 1 ] || PIP+=(--quiet)
source scripts/_torch.sh
.venv/bin/python -c "import torch" 2>/dev/null || install_torch auto "${PIP[@]}"
pins=()
if [ "${FUSEDRL_UNPINNED:-0}" != 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        # A CUDA torch brings the Triton it was built with; the CPU pin of triton would fight it.
        grep -v '^triton==' "$CONSTRAINTS" > .venv/constraints-gpu.txt
        pins=(-c .venv/constraints-gpu.txt)
    else
        pins=(-c "$CONSTRAINTS")
    fi
fi
say "installing fusedrl[dev] ${pins:+with the pins of $CONSTRAINTS }(about 2 minutes on a fresh machine)"
"${PIP[@]}" "${pins[@]}" -e ".[dev]" 2> >(hide_noise)
echo "$stamp" > "$stamp_file"
say "ready in $((SECONDS - start)) s"
