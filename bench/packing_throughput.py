"""Padding waste: tokens per second of one policy update, packed against padded micro-batches.

A batch of 16 responses whose lengths are the 16 quantiles (i + 1/2) / 16 of a lognormal distribution
with median 128 tokens, its sigma chosen so that the longest is 8x the median (1024 tokens: a long
tail as RL on reasoning produces it), to prompts of 32 to 96 tokens, and one GRPO update (engine/update.py: forward,
backward, an AdamW step) with micro-batches of up to 4096 tokens, packed (sequences end to end) or
padded (rows x longest prompt + longest response). The model is a small Qwen2 that a CPU computes in
minutes (4 layers, hidden 256, 4 query / 2 key-value heads, MLP 704, vocabulary 32,000, fp32). Tokens
are the batch's real ones (prompts and responses); each layout runs --repeats times, alternating, and
the best time counts. A benchmark, not a test.

Usage: python bench/packing_throughput.py [--repeats 2] [--output bench/results/packing_throughput-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.distributed import World
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.packing import use_packing
from fusedrl.engine.update import make_loss, micro_batches, update

MEDIAN, TAIL, RESPONSES, BUDGET = 128, 8, 16, 4096


def lognormal_lengths() -> torch.Tensor:
    """Response lengths at the quantiles (i + 1/2) / n of a lognormal with the given median whose top
    quantile is TAIL x the median (deterministic: a sample of 16 rarely reaches its tail)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    z = normal.icdf((torch.arange(RESPONSES, dtype=torch.float64) + 0.5) / RESPONSES)
    sigma = math.log(TAIL) / float(z[-1])
    return torch.exp(z * sigma).mul(MEDIAN).round().long()


def lognormal_batch(vocab: int) -> rollout.Batch:
    gen = torch.Generator().manual_seed(0)
    lengths = lognormal_lengths()[torch.randperm(RESPONSES, generator=gen)]
    prompts = torch.randint(32, 97, (RESPONSES,), generator=gen)
    ids = [torch.randint(2, vocab, (int(p + r),), generator=gen).tolist() for p, r in zip(prompts, lengths)]
    return rollout.make_batch([s[:p] for s, p in zip(ids, prompts.tolist())],
                              [s[p:] for s, p in zip(ids, prompts.tolist())], [False] * RESPONSES, 0, "cpu")


def one_update(model, batch, packed: bool) -> float:
    cfg = load_config(None, ["loss.loss_type=grpo", "data.max_prompt_length=96", f"rollout.max_new_tokens={TAIL * MEDIAN}",
                             f"optim.micro_batch_tokens={BUDGET}"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, packed=packed, step_guard=StepGuard(1), world=World())
    advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    update(session, make_loss(cfg), optimizer, scheduler, batch, advantages)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--machine", default="2-core CPU sandbox, shared")
    parser.add_argument("--output", type=Path, default=Path("bench/results/packing_throughput-cpu.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=2048))
    use_packing(model, "packed", "small qwen2")
    model.train()
    batch = lognormal_batch(model.config.vocab_size)
    tokens = int(batch.attention_mask.sum())
    layout = {}
    for packed in (True, False):
        plan = micro_batches(batch, torch.arange(len(batch)), BUDGET, packed)
        # Tokens each layout runs through the backbone: real ones packed, rows x padded width padded.
        computed = tokens if packed else sum(len(g) * batch.rows(g).input_ids.shape[1] for g in plan)
        layout["packed" if packed else "padded"] = {"micro_batches": len(plan), "tokens_computed": computed, "seconds": []}
    for _ in range(args.repeats):
        for name in layout:
            layout[name]["seconds"].append(one_update(model, batch, name == "packed"))
    for name, row in layout.items():
        row["tokens_per_second"] = tokens / min(row["seconds"])
    lengths = batch.completion_mask.sum(1)
    result = {"machine": args.machine, "real_tokens": tokens, "response_lengths": lengths.tolist(),
              "median_response": float(lengths.float().median()), "max_response": int(lengths.max()), **layout,
              "speedup": layout["packed"]["tokens_per_second"] / layout["padded"]["tokens_per_second"]}
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
