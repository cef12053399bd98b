"""PPO with a critic, the way Xu et al. 2024 made it beat DPO (docs/algorithms.md section 4).

Each step samples `prompts_per_step` x `group_size` responses and scores them. A no-grad pass gives the
rollout policy's log-probs, the reference's log-probs and the critic's values for every response token.
Per-token rewards are the (clipped) score on the last token and, with ppo.kl_penalty=reward, -beta * k1
(k1 = olp - rlp) on every token; GAE(gamma, lambda) turns them into advantages and returns. Advantages are
whitened over the valid tokens of the whole batch. The policy then takes `updates_per_batch` passes over
the batch in `mini_batches` optimizer steps through FusedPolicyLoss with per-token advantages (the shared
update, update.py), and the critic the same passes with the clipped value loss; with ppo.normalize_values the
critic learns returns scaled by their running mean and std. Last, the reference moves toward the policy,
ref <- (1 - eta) ref + eta policy (ppo.reference_ema; 0 keeps it frozen).

The critic is a value head on its own copy of the policy's backbone, or on a separate local model
(ppo.critic_model); it reads final hidden states only, so no vocabulary-sized tensor is built for it.
Checkpoints add the critic (critic/), its optimizer and the value normaliser's moments.

Under torchrun (engine/distributed.py) the critic is sharded like the policy, the whitening and the
value normaliser read every rank's tokens, and the critic's mini-batch schedule is the policy's global one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fusedrl.engine import rollout
from fusedrl.engine.config import Config
from fusedrl.engine import distributed
from fusedrl.engine.critic import ValueModel
from fusedrl.engine.gae import (RunningMeanStd, clipped_value_loss, gae_advantages, masked_mean, masked_whiten,
                                token_rewards)
from fusedrl.engine.model import DTYPES
from fusedrl.engine.optim import StepGuard, accumulate_gradients, clip_gradients, make_optimizer
from fusedrl.engine.packing import SequenceLengths, pack, use_packing
from fusedrl.engine.reference import ema_update_, master_copies
from fusedrl.engine.session import Session, make_scheduler
from fusedrl.engine.update import global_plan, make_loss, micro_batches, per_token, update

CRITIC_DIR, CRITIC_STATE = "critic", "critic_state.pt"


def make_critic(session: Session) -> ValueModel:
    """The critic: from the checkpoint being resumed, a separate model, or a copy of the policy's backbone
    (under torchrun a resumed critic's weights come from the checkpoint's shards, in Session.restore)."""
    cfg = session.cfg
    if session.resume_from is not None and not session.world.sharded:
        critic = ValueModel.from_pretrained(session.resume_from / CRITIC_DIR)
    elif cfg.ppo.critic_model is not None:
        critic = ValueModel.from_pretrained(cfg.ppo.critic_model)
    else:
        critic = ValueModel.from_policy(session.model)
    # Only the backbone takes the model's dtype. The head stays fp32 (as built, and as a checkpoint's
    # head is saved): values are regression targets read to a few digits, and a bf16 bias cannot move
    # by a critic step (0.5 + 1e-5 rounds back to 0.5).
    critic.backbone.to(dtype=DTYPES[cfg.model.dtype])
    critic.to(device=session.device)
    if session.packed:  # the critic takes the policy's micro-batches: it must pack too
        use_packing(critic.backbone, "packed", cfg.ppo.critic_model or "the critic (a copy of the policy's backbone)")
    if cfg.model.gradient_checkpointing:
        critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return critic


@torch.no_grad()
def predict_values(critic: ValueModel, batch: rollout.Batch, plan: list[torch.Tensor],
                   packed: bool = False) -> torch.Tensor:
    """Critic outputs [B, T] for every response token, micro-batch by micro-batch."""
    critic.eval()
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    lengths = SequenceLengths.of(batch) if packed else None
    with distributed.gathered(critic):  # under FSDP: ranks may run different numbers of micro-batches
        for rows in plan:
            values = critic_values(critic, batch, rows, lengths)
            out[rows.to(out.device), : values.shape[1]] = values
    return out


def critic_values(critic: ValueModel, batch: rollout.Batch, rows: torch.Tensor,
                  lengths: SequenceLengths | None) -> torch.Tensor:
    """Values [k, t] of the micro-batch `rows` (t: its longest response), packed when `lengths` are given."""
    if lengths is not None:
        return critic.packed_forward(pack(batch, rows, lengths))
    sub = batch.rows(rows)
    return critic(sub.input_ids, sub.attention_mask, sub.prompt_length, sub.completion_ids.shape[1])


def update_critic(critic: ValueModel, optimizer, guard: StepGuard, cfg: Config, batch: rollout.Batch,
                  old_values: torch.Tensor, returns: torch.Tensor, world: distributed.World = distributed.World(),
                  packed: bool = False) -> dict:
    """The critic's passes over the batch: clipped value loss, token mean over each mini-batch (of every
    rank's tokens; the schedule is the policy update's global one, idle micro-batches included)."""
    optim = cfg.optim
    # As in the policy update: token counts read once, losses and norms summed on the device and read
    # back once at the end, so that no micro-batch waits for the one before.
    row_tokens = batch.completion_mask.sum(1).tolist()
    lengths = SequenceLengths.of(batch) if packed else None
    losses, clip_fracs, grad_norms = [], [], []
    critic.train()
    for plan in global_plan(world, batch, len(batch), optim, packed):
        for mini in plan:
            mini_tokens = max(1, int(world.sum([sum(row_tokens[i] for r in mini for i in r.tolist())])[0]))
            step_loss = step_clip = 0.0
            for rows in world.lockstep(mini):
                idle = rows is None
                rows = torch.tensor([0]) if idle else rows
                values = critic_values(critic, batch, rows, None if idle else lengths)
                length = values.shape[1]
                loss, clip_frac = clipped_value_loss(values, old_values[rows, :length], returns[rows, :length],
                                                     batch.completion_mask[rows, :length] & (not idle),
                                                     value_clip=cfg.ppo.value_clip)
                share = 0.0 if idle else sum(row_tokens[i] for i in rows.tolist()) / mini_tokens
                (loss * share).backward()
                accumulate_gradients(optimizer)
                step_loss = step_loss + loss.detach().double() * share
                step_clip = step_clip + clip_frac.double() * share
            norm, stepped = guard.step(optimizer, optim.max_grad_norm)  # skips a non-finite gradient
            if stepped and optim.max_grad_norm > 0:
                grad_norms.append(norm.double())
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            clip_fracs.append(step_clip)
    # Each optimizer step's loss and clip fraction: the ranks' shares summed.
    steps = world.sum([float(v) for v in losses + clip_fracs])
    losses, clip_fracs = steps[: len(losses)], steps[len(losses):]
    out = {"loss/value": sum(losses) / len(losses), "value/clip_frac": sum(clip_fracs) / len(clip_fracs)}
    if grad_norms:
        out["value/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
    return out


def advantages_and_returns(cfg: Config, batch: rollout.Batch, scores: torch.Tensor, raw_values: torch.Tensor,
                           old_lp: torch.Tensor, ref_lp: torch.Tensor | None, normalizer: RunningMeanStd | None,
                           group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(advantages, critic targets, critic's old outputs, metrics) in the scale the critic learns; the
    batch statistics (whitening, normaliser, metrics) span the process group `group`."""
    ppo, mask = cfg.ppo, batch.completion_mask
    values = normalizer.denormalize(raw_values) if normalizer is not None else raw_values
    kl = None
    if ref_lp is not None:
        # On a kept set (rollout.train_on=sampler) a log-prob of -inf marks a token outside the policy's or
        # the reference's set, whose KL estimate is infinite: it adds none, as in FusedPolicyLoss's KL term.
        kl = torch.where((old_lp > -torch.inf) & (ref_lp > -torch.inf), old_lp - ref_lp, 0.0)
    in_reward = ppo.kl_penalty == "reward" and cfg.loss.beta > 0
    rewards = token_rewards(scores, mask, reward_clip=ppo.reward_clip, kl=kl if in_reward else None,
                            beta=cfg.loss.beta)
    advantages, returns = gae_advantages(rewards, values * mask, mask, gamma=ppo.gamma, lam=ppo.lam)
    metrics = {"advantages/mean": float(masked_mean(advantages, mask, group)),
               "returns/mean": float(masked_mean(returns, mask, group)),
               "value/mean": float(masked_mean(values, mask, group))}
    if kl is not None:
        metrics["kl/rollout"] = float(masked_mean(kl, mask, group))
    tokens = mask.sum()
    if group is not None:
        torch.distributed.all_reduce(tokens, group=group)
    if ppo.whiten_advantages and int(tokens) >= 2:
        advantages = masked_whiten(advantages, mask, process_group=group)
    targets, old_values = returns, values
    if normalizer is not None:
        normalizer.update(returns, mask, process_group=group)
        targets, old_values = normalizer.normalize(returns) * mask, normalizer.normalize(values) * mask
    return advantages, targets, old_values, metrics


def save_critic(directory: Path, critic: ValueModel, optimizer) -> None:
    critic.save_pretrained(directory / CRITIC_DIR)
    torch.save(optimizer.state_dict(), directory / CRITIC_STATE)


def train(cfg: Config) -> dict:
    """Runs PPO as configured; returns the run summary."""
    session = Session(cfg)
    session.prepare(make_critic)
    model, tokenizer, r, ppo, world = session.model, session.tokenizer, cfg.rollout, cfg.ppo, session.world
    # With the KL in the reward (ppo.kl_penalty=reward), the loss must not add it a second time.
    loss_fn = make_loss(cfg, world.group) if ppo.kl_penalty == "loss" else make_loss(cfg, world.group, beta=0.0)
    adamw = dict(weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    optimizer = make_optimizer(model.parameters(), sharded=world.sharded, lr=cfg.optim.lr, **adamw)
    scheduler = make_scheduler(optimizer, cfg, cfg.run.steps * cfg.optim.updates_per_batch * cfg.optim.mini_batches)
    critic = session.critic
    critic_optimizer = make_optimizer(critic.parameters(), sharded=world.sharded, lr=ppo.critic_lr, **adamw)
    session.critic_optimizer = critic_optimizer  # sharded checkpoints hold it with the critic
    critic_guard = StepGuard(cfg.optim.max_skipped_steps)
    normalizer = RunningMeanStd() if ppo.normalize_values else None
    session.restore(optimizer, scheduler)
    if session.resume_from is not None and not world.sharded:
        critic_optimizer.load_state_dict(torch.load(session.resume_from / CRITIC_STATE, map_location="cpu",
                                                      weights_only=True))
    if session.resume_from is not None and normalizer is not None:
        normalizer.load_state_dict(session.extra["value_normalizer"])
    # A 16-bit EMA reference is averaged in fp32 copies (reference.py), kept in the checkpoints.
    ema_master = master_copies(session.reference) if ppo.reference_ema > 0 else {}
    for name, saved in session.extra.get("reference_ema_master", {}).items():
        ema_master[name].copy_(saved)
    for step in session.steps():
        start = time.perf_counter()
        prompts, seeds = session.next_prompts(r.prompts_per_step)
        batch = session.generate(prompts, seeds)
        generated = time.perf_counter()
        scores, failures = session.score_groups(prompts, rollout.decode(tokenizer, batch))
        # Rollout-time log-probs, reference log-probs and values, then GAE on the per-token rewards.
        plan = micro_batches(batch, torch.arange(len(batch)), cfg.optim.micro_batch_tokens, session.packed)
        old_lp = per_token(model, batch, [plan], loss_fn, session.packed)
        ref_lp = (per_token(session.reference, batch, [plan], loss_fn, session.packed)
                  if session.reference is not None else None)
        raw_values = predict_values(critic, batch, plan, session.packed)
        advantages, targets, old_values, adv_metrics = advantages_and_returns(
            cfg, batch, scores.to(batch.input_ids.device), raw_values, old_lp, ref_lp, normalizer, world.group)
        # Over every rank's responses, ranks in order: one process's batch.
        parts = world.gather((scores.tolist(), batch.lengths().tolist(), batch.truncated.tolist(), failures))
        all_scores = torch.tensor([v for p in parts for v in p[0]])
        lengths = torch.tensor([v for p in parts for v in p[1]], dtype=torch.float32)
        truncated = torch.tensor([v for p in parts for v in p[2]], dtype=torch.float32)
        metrics = {"reward/mean": float(all_scores.mean()),
                   "reward/std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
                   "reward/failures": sum(p[3] for p in parts), "accuracy": float((all_scores >= 1).float().mean()),
                   "completions/mean_length": float(lengths.mean()), "tokens/sampled": int(lengths.sum()),
                   "completions/truncated": float(truncated.mean()), **adv_metrics}
        # Policy through the fused loss with per-token advantages, then the critic, then the reference EMA.
        metrics.update(update(session, loss_fn, optimizer, scheduler, batch, advantages, ref_logprobs=ref_lp))
        metrics.update(update_critic(critic, critic_optimizer, critic_guard, cfg, batch, old_values, targets, world,
                                     session.packed))
        if ppo.reference_ema > 0:
            ema_update_(session.reference, model, ppo.reference_ema, master=ema_master)
        elapsed = time.perf_counter() - start
        metrics["tokens_per_second"] = world.sum([float(batch.attention_mask.sum())])[0] / elapsed
        metrics["time/rollout_s"] = generated - start
        metrics["time/step_s"] = elapsed
        if normalizer is not None:
            session.extra["value_normalizer"] = normalizer.state_dict()
        if ema_master:
            session.extra["reference_ema_master"] = ema_master
        # Sharded runs keep the critic in the checkpoint's shards (Session.save); one process adds its files.
        session.end_step(step, metrics, optimizer, scheduler,
                         parts=None if world.sharded else lambda directory: save_critic(directory, critic, critic_optimizer))
    return session.finish()
