"""Rollout tokens/s and step time, transformers' generate against vLLM, from real training runs.

Runs `fusedrl train CONFIG` once per engine (rollout.engine=hf, then vllm) for a few steps in this
Python (the vLLM environment, .venv-vllm), and prints a markdown table from each run's metrics.jsonl:
response tokens generated per second of rollout (step 1, whose first vLLM calls pay one-off costs,
is left out), rollout / update / step time per step, weight-sync time, peak memory, held-out accuracy before and
after, and the whole run's wall time (start-up and evaluations included).
docs/vllm.md holds the committed results, with the machine named.

    .venv-vllm/bin/python bench/sampler_speed.py configs/demo.yaml run.steps=4 warm_start.steps=0
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean


def run(config: str, engine: str, overrides: list[str], out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fusedrl.cli", "train", config, f"rollout.engine={engine}",
                    f"run.output_dir={out}", "run.progress=false", "run.plots=false", "run.tensorboard=false",
                    "run.save_every=0", *overrides], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r]
    timed = steps[1:] or steps
    responses = _responses_per_step(out)
    rollout_tokens = [r["completions/mean_length"] * responses for r in timed]
    rollout_s = [r["time/rollout_s"] for r in timed]
    summary = json.loads((out / "summary.json").read_text())
    return {"engine": engine, "steps": len(steps),
            "rollout tokens/s": sum(rollout_tokens) / sum(rollout_s),
            "rollout s/step": mean(rollout_s),
            "update s/step": mean(r["time/step_s"] - r["time/rollout_s"] for r in timed),
            "step s": mean(r["time/step_s"] for r in timed),
            "weight sync s": mean(r.get("time/weight_sync_s", 0.0) for r in timed),
            "peak memory GB": max(r["memory/peak_bytes"] for r in steps) / 1e9,
            "accuracy before / after": f"{summary['accuracy_before_rl']:.3f} / {summary['accuracy_after_rl']:.3f}",
            "run wall s": wall}


def _responses_per_step(out: Path) -> int:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "config.yaml")
    return cfg.rollout.prompts_per_step * cfg.rollout.group_size


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    config, overrides = argv[0], argv[1:]
    with tempfile.TemporaryDirectory(prefix="fusedrl-bench-") as tmp:
        results = [run(config, engine, overrides, Path(tmp) / engine) for engine in ("hf", "vllm")]
    keys = list(results[0])
    print(f"config {config} {' '.join(overrides)}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
