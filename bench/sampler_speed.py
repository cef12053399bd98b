"""Rollout tokens/s and step time, transformers' generate against vLLM, from real training runs.

Runs `fusedrl train CONFIG` once per engine (rollout.engine=hf, then vllm) for a few steps in this
Python (the vLLM environment, .venv-vllm), and prints a markdown table from each run's metrics.jsonl:
response tokens generated per second of rollout (step 1, whose first vLLM calls pay one-off costs,
is left out), rollout / update / step time per step, weight-sync time, peak memory, held-out accuracy before and
after, and the whole run's wall time (start-up and evaluations included).
docs/vllm.md holds the committed results, with the machine named.

    .venv-vllm/bin/python bench/sampler_speed.py configs/demo.yaml run.steps=4 warm_start.steps=0

With --rollout-only it times generation alone, in one process on one loaded model: the same
prompts_per_step x group_size rollout from each engine in turn, `--rounds` times, so that the two see
the same machine load (the way to compare on a shared machine), after one untimed warm-up call each;
it also reports the process's CPU seconds per rollout, which the machine's load inflates far less.
"""

from __future__ import annotations

import argparse
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


def rollout_only(config: str, overrides: list[str], rounds: int) -> None:
    import torch

    from fusedrl.engine.config import load_config
    from fusedrl.engine.data import load_splits
    from fusedrl.engine.model import load_policy
    from fusedrl.engine.samplers import HFSampler
    from fusedrl.engine.vllm_sampler import VLLMSampler

    cfg = load_config(config, ["rollout.engine=vllm", *overrides])
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_policy(cfg.model, cfg.model.path, torch.device("cpu"))
    prompts = load_splits(cfg.data, tokenizer, cfg.run.seed)[0].prompt_ids[: cfg.rollout.prompts_per_step]
    start = time.perf_counter()
    vllm = VLLMSampler(cfg, model, tokenizer)
    vllm.sync_weights(model)
    startup = time.perf_counter() - start
    engines = {"hf": HFSampler(model, tokenizer, top_p=1.0, batch_size=cfg.rollout.batch_size), "vllm": vllm}
    tokens, seconds, cpu = ({k: 0 for k in engines}, {k: 0.0 for k in engines}, {k: 0.0 for k in engines})
    r = cfg.rollout
    for name, engine in engines.items():  # warm-up
        engine.generate(prompts, r.group_size, temperature=r.temperature, max_new_tokens=r.max_new_tokens)
    for _ in range(rounds):
        for name, engine in engines.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            batch = engine.generate(prompts, r.group_size, temperature=r.temperature, max_new_tokens=r.max_new_tokens)
            seconds[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
            tokens[name] += int(batch.completion_mask.sum())
    vllm.close()
    print(f"config {config} {' '.join(overrides)}; {rounds} rounds of {len(prompts)} x {r.group_size} responses "
          f"of up to {r.max_new_tokens} tokens; vLLM start-up and first sync {startup:.1f} s")
    print("| engine | rollout tokens/s | s per rollout | process CPU s per rollout | tokens per CPU second |")
    print("|---|---|---|---|---|")
    for name in engines:
        print(f"| {name} | {tokens[name] / seconds[name]:.3g} | {seconds[name] / rounds:.3g} "
              f"| {cpu[name] / rounds:.3g} | {tokens[name] / cpu[name]:.3g} |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollout-only", action="store_true", help="time generation alone, engines in turn")
    parser.add_argument("--rounds", type=int, default=2, help="timed rollouts per engine (--rollout-only)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.rollout_only:
        rollout_only(args.config, args.overrides, args.rounds)
        return
    config, overrides = args.config, args.overrides
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
