"""GRPO: group-relative policy optimisation with the fused policy loss.

Each step samples `prompts_per_step` prompts and `group_size` responses to each at the rollout
temperature, scores them, and turns the rewards into advantages relative to their group: the mean is
subtracted and, unless Dr. GRPO is asked for (advantage.normalize_std=false), the group's std
divides. Optional DAPO shaping: an overlong penalty added to the reward before the advantage, and
dynamic sampling, which trains only on groups whose rewards are not all equal: the step samples
round after round of `prompts_per_step` fresh prompts, keeping such groups in sampling order, until it
holds `prompts_per_step` of them (the last round's surplus is cut) or `max_generation_rounds` rounds
were sampled; then it trains on the groups it has (none: no update). The reward metrics describe every
response sampled in the step's rounds. The policy update (engine/update.py) is the one PPO and SPO
share: FusedPolicyLoss on the fused linear path, mini-batches and micro-batches, the batch-wide token
selection over each mini-batch. Under torchrun each rank samples its share of every round's prompts
and the filter's counts, the cut and the metrics are global (engine/distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fusedrl.engine import rollout
from fusedrl.engine.advantages import group_advantages, informative_groups, overlong_penalty
from fusedrl.engine.config import Config
from fusedrl.engine.distributed import World
from fusedrl.engine.optim import make_optimizer
from fusedrl.engine.session import Session, make_scheduler
from fusedrl.engine.update import make_loss, update


@dataclass
class Round:
    """One generation round: G responses to each of `prompts_per_step` prompts (a group's rows adjacent)."""

    batch: rollout.Batch
    rewards: torch.Tensor  # [P * G] on the CPU, as the reward function gave them
    shaped: torch.Tensor  # [P * G] on the CPU, plus the overlong penalty: what the advantages read
    failures: int  # reward calls that failed (scored 0)


def sample_round(session: Session) -> Round:
    """The sampler's next `prompts_per_step` prompts, their responses, rewards and shaped rewards."""
    r, a = session.cfg.rollout, session.cfg.advantage
    prompts, seeds = session.next_prompts(r.prompts_per_step)
    batch = session.generate(prompts, seeds)
    rewards, failures = session.score_groups(prompts, rollout.decode(session.tokenizer, batch))
    penalty = overlong_penalty(batch.lengths().cpu(), r.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
    return Round(batch, rewards, rewards + penalty, failures)


@dataclass
class Groups:
    """What one step trains on, and every round it sampled for it."""

    batch: rollout.Batch | None  # the training groups, a group's rows adjacent; None when there are none
    shaped: torch.Tensor  # their shaped rewards
    rounds: list[Round]
    kept: int  # groups the filter kept over all rounds, the cut ones included (all ranks)
    trained: int  # training groups on all ranks


def collect_groups(sample: Callable[[], Round], *, group_size: int, groups: int, dynamic_sampling: bool,
                   max_rounds: int, pad_id: int, world: World = World()) -> Groups:
    """The step's training groups from rounds drawn with `sample` (this rank's share of each round).

    Without dynamic sampling: one round, every group. With it (DAPO): the informative groups (rewards
    not all equal) of round after round, in sampling order, until `groups` are collected or `max_rounds`
    rounds were drawn; the last round's groups past `groups` are cut. Stopped by the cap, the step
    trains on the groups collected, possibly none. Across ranks, sampling order is round by round,
    ranks in order (the order of the prompts): the counts are summed and the cut falls where it falls
    in one process.
    """
    allowed = max_rounds if dynamic_sampling else 1
    rounds, batches, shaped, kept, trained = [], [], [], 0, 0
    while len(rounds) < allowed and trained < groups:
        current = sample()
        rounds.append(current)
        keep = (informative_groups(current.shaped, group_size) if dynamic_sampling
                else torch.ones(len(current.shaped), dtype=torch.bool))
        here = int(keep.sum()) // group_size
        per_rank = world.sum([here if r == world.rank else 0 for r in range(world.size)])
        kept += int(sum(per_rank))
        mine = max(0, min(here, groups - trained - int(sum(per_rank[: world.rank]))))  # groups past `groups` are cut
        trained += min(int(sum(per_rank)), groups - trained)
        rows = keep.nonzero().squeeze(1)[: mine * group_size]
        if len(rows):
            batches.append(current.batch.rows(rows))
            shaped.append(current.shaped[rows])
    if not batches:
        return Groups(None, torch.zeros(0), rounds, kept, trained)
    return Groups(rollout.concat(batches, pad_id), torch.cat(shaped), rounds, kept, trained)


def rollout_metrics(groups: Groups, group_size: int, dynamic_sampling: bool, world: World = World()) -> dict:
    """Reward and length metrics over every response sampled in the step's rounds (on every rank), and
    the filter's counts."""
    parts = world.gather([(r.rewards.tolist(), r.batch.lengths().tolist(), r.batch.truncated.tolist(), r.failures)
                          for r in groups.rounds])
    # Round by round, ranks in order: the order of one process's responses.
    rounds = [p[i] for i in range(len(groups.rounds)) for p in parts]
    rewards = torch.tensor([v for r in rounds for v in r[0]], dtype=torch.float32)
    lengths = torch.tensor([v for r in rounds for v in r[1]])
    truncated = torch.tensor([v for r in rounds for v in r[2]], dtype=torch.bool)
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "reward/failures": sum(r[3] for r in rounds),
               "accuracy": float((rewards >= 1).float().mean()),
               "completions/mean_length": float(lengths.float().mean()),
               "completions/truncated": float(truncated.float().mean()), "tokens/sampled": int(lengths.sum()),
               "groups/kept": groups.kept * group_size / len(rewards)}
    if dynamic_sampling:
        metrics["dynamic_sampling/rounds"] = len(groups.rounds)
        metrics["groups/trained"] = groups.trained
    return metrics


def train(cfg: Config) -> dict:
    """Runs GRPO as configured; returns the run summary (accuracies, plot paths, entropy-law fit)."""
    session = Session(cfg)
    session.prepare()
    model, tokenizer, r, a = session.model, session.tokenizer, cfg.rollout, cfg.advantage
    loss_fn = make_loss(cfg, session.world.group)
    optimizer = make_optimizer(model.parameters(), sharded=session.world.sharded, lr=cfg.optim.lr,
                               weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    total_updates = cfg.run.steps * cfg.optim.updates_per_batch * cfg.optim.mini_batches
    scheduler = make_scheduler(optimizer, cfg, total_updates)
    session.restore(optimizer, scheduler)
    for step in session.steps():
        start = time.perf_counter()
        # Rollout and reward: G responses per prompt, scored and shaped by the overlong penalty; dynamic
        # sampling keeps the groups that carry signal, sampling more rounds until prompts_per_step do.
        groups = collect_groups(lambda: sample_round(session), group_size=r.group_size,
                                groups=r.prompts_per_step, dynamic_sampling=a.dynamic_sampling,
                                max_rounds=a.max_generation_rounds, pad_id=tokenizer.pad_token_id,
                                world=session.world)
        sampled = time.perf_counter()
        metrics = rollout_metrics(groups, r.group_size, a.dynamic_sampling, session.world)
        # Advantages within each group, then the policy update through the fused loss (on every rank
        # while any rank has groups: one without joins the collectives with batch=None).
        if groups.trained:
            advantages = None
            if groups.batch is not None:
                advantages = group_advantages(groups.shaped, r.group_size, normalize_std=a.normalize_std,
                                              eps=a.eps).to(groups.batch.input_ids.device)
            metrics.update(update(session, loss_fn, optimizer, scheduler, groups.batch, advantages))
        elapsed = time.perf_counter() - start
        tokens = session.world.sum([sum(float(g.batch.attention_mask.sum()) for g in groups.rounds)])[0]
        metrics["tokens_per_second"] = tokens / elapsed
        metrics["time/rollout_s"] = sampled - start
        metrics["time/step_s"] = elapsed
        session.end_step(step, metrics, optimizer, scheduler)
    return session.finish()
