#!/usr/bin/env bash
# The study of docs/study.md: warm-starts the tiny model once per seed, trains every arm of
# configs/study/arms.yaml from it (two one-thread runs at a time; about an hour on 2 CPU cores), and
# writes docs/study.md with its plots in docs/images/. `--small` is the few-minute check CI runs (one
# seed, two steps per arm; its report goes to runs/study_small/study.md). An interrupted study continues
# where it stopped; delete runs/study to start over. Other arguments: `python -m fusedrl.engine.study --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m fusedrl.engine.study "$@"
