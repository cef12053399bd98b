#!/usr/bin/env bash
# The README's demo: sets up .venv (CPU torch, nothing else downloaded at run time), then trains the
# built-in tiny Llama on multi-digit addition: a short supervised warm start, then GRPO with the
# fused loss on the top-20% entropy tokens. Prints held-out accuracy before and after RL and where
# the plots are. Extra arguments are config overrides, e.g. `bash scripts/demo.sh run.steps=30`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/fusedrl train configs/demo.yaml "$@"
