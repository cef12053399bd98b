#!/usr/bin/env bash
# Peak RSS per rank of two GRPO steps on one model: one plain process, then 1, 2 and 4 gloo ranks under
# torchrun (FSDP2). Prints a markdown table of memory/peak_bytes at step 2 (the largest rank's peak).
# The table in docs/distributed.md comes from this script. Usage: bash scripts/measure_distributed_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
model="model.demo.hidden_size=1024 model.demo.num_layers=12 model.demo.num_heads=16 model.demo.intermediate_size=2816"
args="run.steps=2 run.progress=false run.tensorboard=false run.plots=false run.num_threads=1 run.device=cpu
      warm_start.steps=0 data.train_size=64 data.eval_size=4 rollout.prompts_per_step=4 rollout.group_size=2
      rollout.max_new_tokens=16 optim.micro_batch_tokens=512 $model"
echo "| layout | peak RSS per rank (MB) |"
echo "|---|---|"
for ranks in plain 1 2 4; do
    if [ "$ranks" = plain ]; then
        .venv/bin/fusedrl train configs/demo.yaml $args run.output_dir="$out/$ranks" > "$out/$ranks.log" 2>&1
        label="one process (no torchrun)"
    else
        .venv/bin/torchrun --nproc_per_node "$ranks" -m fusedrl.cli train configs/demo.yaml $args \
            run.output_dir="$out/$ranks" > "$out/$ranks.log" 2>&1
        label="$ranks gloo rank$([ "$ranks" = 1 ] || echo s) (FSDP2)"
    fi
    peak=$(.venv/bin/python -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; print(round(rows[-1]['memory/peak_bytes'] / 2**20))" "$out/$ranks/metrics.jsonl")
    echo "| $label | $peak |"
done
rm -rf "$out"
