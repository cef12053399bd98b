"""GRPO: group-relative policy optimisation with the fused policy loss.

Each step samples `prompts_per_step` prompts and `group_size` responses to each at the rollout
temperature, scores them, and turns the rewards into advantages relative to their group: the mean is
subtracted and, unless Dr. GRPO is asked for (advantage.normalize_std=false), the group's std
divides. Optional DAPO shaping: an overlong penalty added to the reward before the advantage, and
dynamic sampling, which trains only on groups whose rewards are not all equal: the step samples
round after round of `prompts_per_step` fresh prompts, keeping such groups in sampling order, until it
holds `prompts_per_step` of them (the last round's surplus is cut) or `max_generation_rounds` rounds
were sampled; then it trains on the groups it has (none: no update). The reward metrics describe every
response sampled in the step's rounds. The policy then takes `updates_per_batch` passes over the
batch, each split into `mini_batches` optimizer steps; each mini-batch is cut into micro-batches by a
token budget whose gradients accumulate before clipping and the AdamW step.

The loss is FusedPolicyLoss on the fused linear path: the backbone's final hidden states and the
output embedding go in, so the logits tensor is never built. With a single update per rollout the
loss runs on-policy (old log-probs are the current ones, detached); with more, a no-grad pass fixes
the old log-probs first, using the same micro-batches so that the first ratio is exactly 1. A
reference model, when configured, gives per-token reference log-probs the same way. The batch-wide
statistics of the loss (the top-entropy threshold, Clip-Cov / KL-Cov's covariance and selection) are
taken over the whole mini-batch, not per micro-batch: when one is configured, each mini-batch starts
with a no-grad pass under the current policy that fixes its masks (FusedPolicyLoss.select), and every
micro-batch's loss takes its rows of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fusedrl.engine import rollout
from fusedrl.engine.advantages import group_advantages, informative_groups, overlong_penalty
from fusedrl.engine.config import Config, loss_arguments
from fusedrl.engine.loss import EXTREME_METRICS, FusedPolicyLoss, Selection, metrics_to_floats
from fusedrl.engine.model import completion_hidden, output_projection, token_logprobs
from fusedrl.engine.optim import MasterWeightAdamW, accumulate_gradients, clip_gradients
from fusedrl.engine.session import Session, make_scheduler


def make_loss(cfg: Config) -> FusedPolicyLoss:
    """FusedPolicyLoss from the loss section; temperature and max length come from the rollout."""
    return FusedPolicyLoss(**loss_arguments(cfg))


def micro_batches(batch: rollout.Batch, rows: torch.Tensor, token_budget: int) -> list[torch.Tensor]:
    """Splits `rows` into groups whose padded size (rows x (longest prompt + longest response))
    fits the budget; rows are sorted by length first so that similar lengths share padding. The groups
    are CPU index tensors (they index device tensors; the lengths are read from the device once)."""
    rows = torch.as_tensor(rows).cpu()
    lengths = torch.stack([batch.attention_mask[:, : batch.prompt_length].sum(1),
                           batch.completion_mask.sum(1)]).cpu()
    prompt_len, response_len = lengths[0, rows], lengths[1, rows]
    order = rows[torch.argsort(prompt_len + response_len, stable=True)]
    groups, current, p_max, r_max = [], [], 0, 0
    prompt_lens, response_lens = lengths.tolist()
    for row in order.tolist():
        p, r = prompt_lens[row], max(1, response_lens[row])
        if current and (len(current) + 1) * (max(p_max, p) + max(r_max, r)) > token_budget:
            groups.append(torch.tensor(current))
            current, p_max, r_max = [], 0, 0
        current.append(row)
        p_max, r_max = max(p_max, p), max(r_max, r)
    groups.append(torch.tensor(current))
    return groups


def per_token(model, batch: rollout.Batch, plan: list[list[torch.Tensor]], temperature: float,
              backend: str) -> torch.Tensor:
    """No-grad log-probs [B, T] of every response token, computed micro-batch by micro-batch."""
    return per_token_lp_entropy(model, batch, plan, temperature, backend)[0]


def per_token_lp_entropy(model, batch: rollout.Batch, plan: list[list[torch.Tensor]], temperature: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad log-probs and entropies [B, T] of the response tokens of the rows in `plan` (zero
    elsewhere), micro-batch by micro-batch with the fused linear op (no logits tensor)."""
    lp_out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    h_out = torch.zeros_like(lp_out)
    for rows in (r for mini in plan for r in mini):
        sub = batch.rows(rows)
        lp, h = token_logprobs(model, sub, temperature, backend)
        lp_out[rows.to(lp_out.device), : lp.shape[1]] = lp
        h_out[rows.to(h_out.device), : h.shape[1]] = h
    return lp_out, h_out


def mini_batch_selection(model, loss_fn: FusedPolicyLoss, batch: rollout.Batch, mini: list[torch.Tensor],
                         mask: torch.Tensor, advantages: torch.Tensor, old_lp: torch.Tensor | None,
                         temperature: float, backend: str) -> Selection:
    """The batch-wide masks (top-entropy tau, Clip-Cov / KL-Cov) over the tokens of one mini-batch
    that get loss (`mask` [B, T] on its rows), from a no-grad pass under the current policy, the one
    its micro-batches' losses see. Rows outside the mini-batch count as padding; indexed by batch row."""
    lp, entropy = per_token_lp_entropy(model, batch, [mini], temperature, backend)
    in_mini = torch.zeros(len(batch), dtype=torch.bool, device=lp.device)
    in_mini[torch.cat(mini).to(lp.device)] = True
    return loss_fn.select(mask.bool() & in_mini[:, None], advantages, entropy=entropy, logprobs=lp,
                          old_logprobs=old_lp)


def _weight(loss_type: str, rows: int, tokens: int, mini_rows: int, mini_tokens: int) -> float:
    """Share of a micro-batch's loss in its mini-batch's loss.

    dapo divides by the mini-batch's token count itself (num_items_in_batch, or with normalize_by
    selected the Selection's count); grpo and dr_grpo average over responses, so a micro-batch counts
    by its rows; bnpo averages over tokens (with normalize_by selected the loss scales its part to fit).
    """
    if loss_type == "dapo":
        return 1.0
    if loss_type == "bnpo":
        return tokens / mini_tokens
    return rows / mini_rows


def update(session: Session, loss_fn, optimizer, scheduler, batch: rollout.Batch, advantages: torch.Tensor,
           loss_mask: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None) -> dict:
    """The policy updates on one rollout batch; returns the loss metrics averaged over tokens.

    advantages: [B] (one per response) or [B, T] (per token: PPO, SPO). loss_mask [B, T]: the response
    tokens that get loss (default: all of them; SPO-tree drops zero-advantage segments). ref_logprobs
    [B, T]: the reference's log-probs when the caller has them already (PPO, for its KL reward).
    """
    cfg, model = session.cfg, session.model
    optim = cfg.optim
    n = len(batch)
    need_old = optim.updates_per_batch > 1 or optim.mini_batches > 1
    passes = []
    for _ in range(optim.updates_per_batch):
        order = torch.randperm(n) if optim.mini_batches > 1 else torch.arange(n)
        passes.append([micro_batches(batch, mini, optim.micro_batch_tokens)
                       for mini in order.tensor_split(min(optim.mini_batches, n))])
    temperature, backend = cfg.rollout.temperature, cfg.loss.backend
    old_lp = per_token(model, batch, passes[0], temperature, backend) if need_old else None
    ref_lp = ref_logprobs
    if ref_lp is None and session.reference is not None:
        ref_lp = per_token(session.reference, batch, passes[0], temperature, backend)
    sums, extremes, tokens_seen, losses, grad_norms = {}, {}, 0, [], []
    mask = batch.completion_mask if loss_mask is None else loss_mask & batch.completion_mask
    # Token counts per row, read once: the loop below then never waits on the device; the loss and its
    # metrics are summed as device tensors and read back once, at the end.
    row_tokens = mask.sum(1).tolist()
    # Batch-wide statistics (masks, the selected-token count) need their own no-grad pass per mini-batch;
    # plain runs skip it, and so does a mini-batch that is one micro-batch (its loss call sees the whole
    # mini-batch) unless Clip-Cov draws: its draw is laid out over the batch's rows, so that runs do not
    # depend on micro_batch_tokens.
    batch_wide = loss_fn.batch_wide
    model.train()
    for plan in passes:
        for mini in plan:
            mini_rows = sum(len(r) for r in mini)
            mini_tokens = sum(row_tokens[i] for r in mini for i in r.tolist())
            step_loss = 0.0
            selection = None
            if batch_wide and (len(mini) > 1 or loss_fn.cov_mode == "clip_cov"):
                selection = mini_batch_selection(model, loss_fn, batch, mini, mask, advantages, old_lp,
                                                 temperature, backend)
            for rows in mini:
                sub = batch.rows(rows)
                length = sub.completion_ids.shape[1]
                hidden = completion_hidden(model, sub.input_ids, sub.attention_mask, sub.prompt_length, length)
                weight, bias = output_projection(model)
                sub_mask = mask[rows, :length]
                sub_adv = advantages[rows] if advantages.dim() == 1 else advantages[rows, :length]
                loss, metrics = loss_fn(
                    sub.completion_ids, sub_mask, sub_adv, hidden=hidden, weight=weight,
                    bias=bias, old_logprobs=None if old_lp is None else old_lp[rows, :length],
                    ref_logprobs=None if ref_lp is None else ref_lp[rows, :length],
                    num_items_in_batch=mini_tokens if cfg.loss.loss_type == "dapo" else None,
                    selection=None if selection is None else selection.rows(rows, length))
                valid = sum(row_tokens[i] for i in rows.tolist())
                share = _weight(cfg.loss.loss_type, len(rows), valid, mini_rows, mini_tokens)
                (loss * share).backward()
                accumulate_gradients(optimizer)  # 16-bit gradients summed in fp32 (engine/optim.py)
                step_loss = step_loss + loss.detach().double() * share
                tokens_seen += valid
                for key, value in metrics.items():
                    if key in EXTREME_METRICS:
                        extremes[key] = EXTREME_METRICS[key](extremes.get(key, value.double()), value.double())
                    else:
                        sums[key] = sums.get(key, 0.0) + value.double() * valid
            if optim.max_grad_norm > 0:
                grad_norms.append(clip_gradients(optimizer, optim.max_grad_norm).double())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    totals = {key: value / max(1, tokens_seen) for key, value in sums.items()} | extremes
    totals["loss/policy"] = sum(losses) / len(losses)
    if grad_norms:
        totals["grad_norm"] = sum(grad_norms) / len(grad_norms)
    out = metrics_to_floats(totals)
    out["lr"] = scheduler.get_last_lr()[0]
    return out


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
    prompts = session.train_split.select(session.sampler.next_indices(r.prompts_per_step))
    batch = session.generate(prompts)
    rewards, failures = session.score_groups(prompts, rollout.decode(session.tokenizer, batch))
    penalty = overlong_penalty(batch.lengths().cpu(), r.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
    return Round(batch, rewards, rewards + penalty, failures)


@dataclass
class Groups:
    """What one step trains on, and every round it sampled for it."""

    batch: rollout.Batch | None  # the training groups, a group's rows adjacent; None when there are none
    shaped: torch.Tensor  # their shaped rewards
    rounds: list[Round]
    kept: int  # groups the filter kept over all rounds, the cut ones included


def collect_groups(sample: Callable[[], Round], *, group_size: int, groups: int, dynamic_sampling: bool,
                   max_rounds: int, pad_id: int) -> Groups:
    """The step's training groups from rounds drawn with `sample`.

    Without dynamic sampling: one round, every group. With it (DAPO): the informative groups (rewards
    not all equal) of round after round, in sampling order, until `groups` are collected or `max_rounds`
    rounds were drawn; the last round's groups past `groups` are cut. Stopped by the cap, the step
    trains on the groups collected, possibly none.
    """
    wanted, allowed = groups * group_size, max_rounds if dynamic_sampling else 1
    rounds, batches, shaped, kept = [], [], [], 0
    while len(rounds) < allowed and sum(map(len, shaped)) < wanted:
        current = sample()
        rounds.append(current)
        keep = (informative_groups(current.shaped, group_size) if dynamic_sampling
                else torch.ones(len(current.shaped), dtype=torch.bool))
        kept += int(keep.sum()) // group_size
        rows = keep.nonzero().squeeze(1)[: wanted - sum(map(len, shaped))]  # rows past `groups` are cut
        if len(rows):
            batches.append(current.batch.rows(rows))
            shaped.append(current.shaped[rows])
    if not batches:
        return Groups(None, torch.zeros(0), rounds, kept)
    return Groups(rollout.concat(batches, pad_id), torch.cat(shaped), rounds, kept)


def rollout_metrics(groups: Groups, group_size: int, dynamic_sampling: bool) -> dict:
    """Reward and length metrics over every response sampled in the step's rounds, and the filter's counts."""
    rewards = torch.cat([r.rewards for r in groups.rounds])
    lengths = torch.cat([r.batch.lengths().cpu() for r in groups.rounds])
    truncated = torch.cat([r.batch.truncated.cpu() for r in groups.rounds])
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "reward/failures": sum(r.failures for r in groups.rounds),
               "accuracy": float((rewards >= 1).float().mean()),
               "completions/mean_length": float(lengths.float().mean()),
               "completions/truncated": float(truncated.float().mean()),
               "groups/kept": groups.kept * group_size / len(rewards)}
    if dynamic_sampling:
        metrics["dynamic_sampling/rounds"] = len(groups.rounds)
        metrics["groups/trained"] = len(groups.shaped) // group_size
    return metrics


def train(cfg: Config) -> dict:
    """Runs GRPO as configured; returns the run summary (accuracies, plot paths, entropy-law fit)."""
    session = Session(cfg)
    session.prepare()
    model, tokenizer, r, a = session.model, session.tokenizer, cfg.rollout, cfg.advantage
    loss_fn = make_loss(cfg)
    optimizer = MasterWeightAdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    total_updates = cfg.run.steps * cfg.optim.updates_per_batch * cfg.optim.mini_batches
    scheduler = make_scheduler(optimizer, cfg, total_updates)
    session.restore(optimizer, scheduler)
    for step in session.steps():
        start = time.perf_counter()
        # Rollout and reward: G responses per prompt, scored and shaped by the overlong penalty; dynamic
        # sampling keeps the groups that carry signal, sampling more rounds until prompts_per_step do.
        groups = collect_groups(lambda: sample_round(session), group_size=r.group_size,
                                groups=r.prompts_per_step, dynamic_sampling=a.dynamic_sampling,
                                max_rounds=a.max_generation_rounds, pad_id=tokenizer.pad_token_id)
        sampled = time.perf_counter()
        metrics = rollout_metrics(groups, r.group_size, a.dynamic_sampling)
        # Advantages within each group, then the policy update through the fused loss.
        if groups.batch is not None:
            advantages = group_advantages(groups.shaped, r.group_size, normalize_std=a.normalize_std, eps=a.eps)
            metrics.update(update(session, loss_fn, optimizer, scheduler, groups.batch,
                                  advantages.to(groups.batch.input_ids.device)))
        elapsed = time.perf_counter() - start
        metrics["tokens_per_second"] = sum(float(g.batch.attention_mask.sum()) for g in groups.rounds) / elapsed
        metrics["time/rollout_s"] = sampled - start
        metrics["time/step_s"] = elapsed
        session.end_step(step, metrics, optimizer, scheduler)
    return session.finish()
