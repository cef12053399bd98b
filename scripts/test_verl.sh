#!/usr/bin/env bash
# The verl integration's tests against the real verl, in their own environment: .venv-verl with verl
# (fusedrl's `verl` extra) and fusedrl installed editable, at the versions in requirements/verl.txt.
# verl pins its own transformers (< 5.11) and brings Ray, so it does not share .venv's pins.
# On a CPU machine torch is pinned to the local CPU build first (torch==2.13.0): verl does not pin
# torch, so nothing later pulls a CUDA build. A second run with the same pins installs nothing.
#
# FUSEDRL_UNPINNED=1: install the newest versions that pyproject.toml admits instead, run the tests,
# and only if they pass write what was installed to requirements/verl.txt (how the pins are made).
#
# verl's wheel also installs its own test suite as a top-level `tests` package in site-packages. It
# shadows nothing here: this repository's tests/ has no __init__.py, so pytest imports the test
# modules and their helpers by file name (conftest, test_verl, _verl_data), never as `tests.*`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PINS=requirements/verl.txt
VENV=.venv-verl
say() { echo "test_verl: $*" >&2; }
stamp_file=$VENV/.fusedrl-installed
stamp="$(cat pyproject.toml "$PINS" | sha256sum | cut -d' ' -f1) unpinned=${FUSEDRL_UNPINNED:-0}"
start=$SECONDS
if ! [ -x $VENV/bin/python ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    [ -x $VENV/bin/python ] || { say "creating $VENV"; "$PYTHON" -m venv $VENV; }
    PIP=($VENV/bin/python -m pip install --disable-pip-version-check --quiet)
    source scripts/_torch.sh
    $VENV/bin/python -c "import torch" 2>/dev/null || install_torch auto "${PIP[@]}"
    torch_pin=$VENV/torch-pin.txt
    $VENV/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$torch_pin"
    pins=(-c "$torch_pin")
    pinned="the newest versions pyproject.toml admits"
    if [ "${FUSEDRL_UNPINNED:-0}" != 1 ]; then
        pinned="the pins of $PINS"
        if command -v nvidia-smi >/dev/null 2>&1; then
            # A CUDA torch brings the Triton it was built with; the CPU pin of triton would fight it.
            grep -v '^triton==' "$PINS" > $VENV/pins-gpu.txt
            pins+=(-c $VENV/pins-gpu.txt)
        else
            pins+=(-c "$PINS")
        fi
    fi
    say "installing verl and fusedrl[verl] with $pinned (about 2 minutes on a fresh machine)"
    "${PIP[@]}" "${pins[@]}" -e ".[verl]" pytest pytest-timeout pytest-xdist 2> >(hide_noise)
    echo "$stamp" > "$stamp_file"
    say "environment ready in $((SECONDS - start)) s"
fi
# FUSEDRL_TEST_VERL=1: a missing verl fails these tests instead of skipping them.
FUSEDRL_TEST_VERL=1 $VENV/bin/python -m pytest -n 2 --timeout 900 \
    tests/integrations/test_verl.py tests/integrations/test_verl_distributed.py "$@"
if [ "${FUSEDRL_UNPINNED:-0}" = 1 ]; then
    {
        echo "# The exact versions scripts/test_verl.sh last passed with (pip constraints for .venv-verl)."
        echo "# torch is not listed: the script installs the local CPU build torch==2.13.0 first."
        echo "# Refresh on purpose: FUSEDRL_UNPINNED=1 bash scripts/test_verl.sh"
        $VENV/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^torch=='
    } > "$PINS"
    say "wrote $PINS"
fi
say "done in $((SECONDS - start)) s"
