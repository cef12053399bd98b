"""The supervised warm start: a few steps of next-token training on a built-in task's reference
completions, so that a freshly initialised model knows the answer format before RL.

The loss is the mean negative log-prob of the response tokens (and the end token), computed on the
fused linear path like the RL loss: no logits tensor.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from fusedrl.engine.config import WarmStartConfig
from fusedrl.engine.model import completion_hidden, output_projection
from fusedrl.engine.optim import MasterWeightAdamW, clip_gradients, decay
from fusedrl.engine.rollout import Batch, make_batch
from fusedrl.kernels import linear_logprobs_and_entropy


def supervised_batch(tokenizer, prompts_ids: list[list[int]], responses: list[str], device) -> Batch:
    """[left-padded prompt | response + end token, right-padded] in the rollout layout."""
    targets = [ids + [tokenizer.eos_token_id] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    return make_batch(prompts_ids, targets, [False] * len(targets), tokenizer.pad_token_id, device)


def warm_start(model, tokenizer, task, rows: list[dict], cfg: WarmStartConfig,
               report: Callable[[int, float, float], None] | None = None) -> tuple[float, float]:
    """Trains `model` in place for cfg.steps steps; returns (seconds, last loss). `report(step, loss,
    seconds)` is called after every tenth of the steps (a line in a log, where a bar would print nothing)."""
    device = next(model.parameters()).device
    optimizer = MasterWeightAdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, decay(max(0, s - warmup) / max(1, cfg.steps - warmup), cfg.schedule)))
    prompt_ids = tokenizer([row["prompt"] for row in rows])["input_ids"]
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    model.train()
    every = max(1, cfg.steps // 10)
    for step in range(1, cfg.steps + 1):
        pick = torch.randint(len(rows), (cfg.batch_size,)).tolist()
        batch = supervised_batch(tokenizer, [prompt_ids[i] for i in pick],
                                 [task.reference_completion(rows[i]) for i in pick], device)
        hidden = completion_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                                   batch.completion_ids.shape[1])
        weight, bias = output_projection(model)
        lp, _ = linear_logprobs_and_entropy(hidden, weight, batch.completion_ids.masked_fill(
            ~batch.completion_mask, -100), bias=bias)
        loss = -(lp * batch.completion_mask).sum() / batch.completion_mask.sum()
        loss.backward()
        clip_gradients(optimizer, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if report is not None and (step % every == 0 or step == cfg.steps):
            report(step, float(loss.detach()), time.perf_counter() - start)
    return time.perf_counter() - start, float(loss.detach())
