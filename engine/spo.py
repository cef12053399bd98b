"""SPO: segment-level advantages from Monte-Carlo values (Guo et al. 2025, docs/algorithms.md section 5).

No critic: a state's value is the mean reward of continuations sampled from it, and a segment's
advantage is the change of value across it (the maths is in segments.py, the sampling in spo_rollout.py).

SPO-chain (run.algorithm=spo_chain). Each step samples `group_size` responses per prompt like GRPO, takes
the rollout policy's probability of every sampled token, cuts each response before every
`cutpoint_interval`-th token whose probability is below `cutpoint_threshold`, and samples
`num_continuations` continuations from every cut (the prompt included) in batched generate calls across
all responses and prompts. Every token of a segment gets V(after) - V(before); the last segment ends in the
response's own reward.

SPO-tree (run.algorithm=spo_tree). Each step grows one tree per prompt (`tree_branching` children per
node per level, `tree_level_tokens` new tokens per level, the last level to the end), scores the leaves,
and trains one row per leaf path in which every node's segment appears once, with advantage
V(node) - V(parent) (optionally over the siblings' std); zero-advantage segments get no loss. group_size is
not used: the tree's leaves are the responses.

In both, a response or continuation that reaches max_new_tokens without its end token scores 0, so that
the values along a chain are estimates of one and the same return. The update is the shared one (update.py), through
FusedPolicyLoss with per-token advantages; the paper trains with the probability mask
(loss.prob_mask_threshold=0.9, loss.normalize_by=selected), which the demo configs set. The sampling
overhead, generated tokens per trained token, is logged as spo/sampling_overhead.

Under torchrun each rank samples its share of the prompts. Every draw is seeded by what it continues
(SPO-chain's continuations per prefix, SPO-tree's branches per node, both from the prompt's seed), so
that the values and trees do not depend on the number of ranks: N ranks repeat the one-process run.
"""

from __future__ import annotations

import time

import torch

from fusedrl.engine import rollout
from fusedrl.engine.config import Config
from fusedrl.engine.data import Split
from fusedrl.engine.optim import make_optimizer
from fusedrl.engine.segments import chain_advantages, tree_values_and_advantages
from fusedrl.engine.session import Session, make_scheduler
from fusedrl.engine.update import make_loss, micro_batches, per_token, update
from fusedrl.loss import FusedPolicyLoss
from fusedrl.engine.spo_rollout import (Sampling, Scorer, chain_values, pad_rows, sample_trees, score_leaves,
                                        tree_training_rows)


def make_scorer(session: Session, prompts: Split, failures: list[int]) -> Scorer:
    """The configured reward on (prompt index, completion text) pairs; failed calls are counted."""

    def scorer(prompt_index: list[int], completions: list[str]) -> list[float]:
        columns = {k: [v[i] for i in prompt_index] for k, v in prompts.columns.items()}
        rewards, failed = session.score([prompts.prompts[i] for i in prompt_index], completions, columns)
        failures.append(failed)
        return rewards.tolist()

    return scorer


def chain_step(session: Session, loss_fn: FusedPolicyLoss, prompts: Split, seeds: list[int], sampling: Sampling,
               scorer: Scorer):
    """Rollout, boundary values and per-token advantages of one SPO-chain step."""
    cfg, model, tokenizer, r = session.cfg, session.model, session.tokenizer, session.cfg.rollout
    batch = session.generate(prompts, seeds)
    repeat = [i for i in range(len(prompts)) for _ in range(r.group_size)]
    rewards = torch.tensor(scorer(repeat, rollout.decode(tokenizer, batch)))
    rewards = rewards.masked_fill(batch.truncated.cpu(), 0.0)
    plan = micro_batches(batch, torch.arange(len(batch)), cfg.optim.micro_batch_tokens, session.packed)
    old_lp = per_token(model, batch, [plan], loss_fn, session.packed)  # the rollout policy's, for the cutpoints
    with session.sampler.generating():
        boundaries, values, continuation_tokens = chain_values(
            session.sampler, tokenizer, prompts.prompt_ids, repeat, batch, old_lp, k=cfg.spo.num_continuations,
            threshold=cfg.spo.cutpoint_threshold, interval=cfg.spo.cutpoint_interval, sampling=sampling,
            scorer=scorer, seeds=seeds)
    advantages = chain_advantages(boundaries, values, rewards.tolist(), batch.completion_mask)
    segments, responses, response_tokens, continuation_tokens = session.world.sum(
        [sum(map(len, boundaries)), len(boundaries), int(batch.completion_mask.sum()), continuation_tokens])
    metrics = {"spo/segments_mean": segments / responses,
               "spo/sampling_overhead": (response_tokens + continuation_tokens) / max(1, response_tokens),
               "tokens/sampled": response_tokens + continuation_tokens}
    return batch, rewards, advantages, None, metrics


def tree_step(session: Session, loss_fn: FusedPolicyLoss, prompts: Split, seeds: list[int], sampling: Sampling,
              scorer: Scorer):
    """Tree rollout, node advantages and the per-leaf training rows of one SPO-tree step."""
    tokenizer, spo = session.tokenizer, session.cfg.spo
    with session.sampler.generating():
        trees, generated = sample_trees(session.sampler, tokenizer, prompts.prompt_ids, list(range(len(prompts))),
                                        branching=spo.tree_branching, level_tokens=spo.tree_level_tokens,
                                        sampling=sampling, seeds=seeds)
    leaf_rewards = score_leaves(tokenizer, trees, scorer)
    advantages = [tree_values_and_advantages(t.parents, lr, std_normalize=spo.tree_std_normalize)[1]
                  for t, lr in zip(trees, leaf_rewards)]
    rows = tree_training_rows(trees, advantages)
    rewards = torch.tensor([v for lr in leaf_rewards for v in lr.values()])
    trained = sum(m for *_, mask in rows for m in mask)  # tokens with loss
    # One collective on every rank, those without rows included (they would otherwise wait apart).
    leaves, kept, generated, trained = session.world.sum([len(rewards), len(rows), generated, trained])
    metrics = {"spo/leaves": leaves, "spo/rows_dropped": leaves - kept, "tokens/sampled": generated}
    if kept:
        metrics["spo/sampling_overhead"] = generated / trained
    if not rows:  # update() still runs on every rank while another has rows (batch=None here)
        return None, rewards, None, None, metrics
    sampler_lp = [tree.response_logprobs(leaf) for tree, leaf, *_ in rows]
    batch = rollout.make_batch([prompts.prompt_ids[tree.prompt_index] for tree, *_ in rows],
                               [ids for _, _, ids, _, _ in rows], [not tree.finished[leaf] for tree, leaf, *_ in rows],
                               tokenizer.pad_token_id, session.device, None if None in sampler_lp else sampler_lp)
    width = batch.completion_ids.shape[1]
    token_adv = pad_rows([a for *_, a, _ in rows], width, 0.0, torch.float32, session.device)
    loss_mask = pad_rows([m for *_, m in rows], width, False, torch.bool, session.device)
    return batch, rewards, token_adv, loss_mask, metrics


def train(cfg: Config) -> dict:
    """Runs SPO-chain or SPO-tree (run.algorithm) as configured; returns the run summary."""
    session = Session(cfg)
    session.prepare()
    model, r = session.model, cfg.rollout
    loss_fn = make_loss(cfg, session.world.group)
    optimizer = make_optimizer(model.parameters(), sharded=session.world.sharded, lr=cfg.optim.lr,
                               weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    scheduler = make_scheduler(optimizer, cfg, cfg.run.steps * cfg.optim.updates_per_batch * cfg.optim.mini_batches)
    session.restore(optimizer, scheduler)
    sampling = Sampling(r.temperature, r.max_new_tokens, r.batch_size)
    step_fn = chain_step if cfg.run.algorithm == "spo_chain" else tree_step
    for step in session.steps():
        start = time.perf_counter()
        prompts, seeds = session.next_prompts(r.prompts_per_step)
        failures: list[int] = []
        batch, rewards, advantages, loss_mask, metrics = step_fn(session, loss_fn, prompts, seeds, sampling,
                                                                  make_scorer(session, prompts, failures))
        sampled = time.perf_counter()
        # Over every rank's responses, ranks in order: one process's.
        parts = session.world.gather((rewards.tolist(), sum(failures),
                                      [] if batch is None else batch.lengths().tolist(),
                                      [] if batch is None else batch.truncated.tolist(),
                                      0.0 if batch is None else float(batch.attention_mask.sum())))
        rewards = torch.tensor([v for p in parts for v in p[0]])
        lengths = torch.tensor([v for p in parts for v in p[2]], dtype=torch.float32)
        metrics.update({"reward/mean": float(rewards.mean()), "reward/failures": sum(p[1] for p in parts),
                        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                        "accuracy": float((rewards >= 1).float().mean())})
        if len(lengths):
            metrics["completions/mean_length"] = float(lengths.mean())
            metrics["completions/truncated"] = float(torch.tensor([v for p in parts for v in p[3]]).float().mean())
            metrics.update(update(session, loss_fn, optimizer, scheduler, batch, advantages, loss_mask=loss_mask))
        elapsed = time.perf_counter() - start
        if len(lengths):
            metrics["tokens_per_second"] = sum(p[4] for p in parts) / elapsed
        metrics["time/rollout_s"] = sampled - start
        metrics["time/step_s"] = elapsed
        session.end_step(step, metrics, optimizer, scheduler)
    return session.finish()
