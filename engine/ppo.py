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
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fusedrl.engine import rollout
from fusedrl.engine.config import Config
from fusedrl.engine.critic import ValueModel
from fusedrl.engine.gae import (RunningMeanStd, clipped_value_loss, gae_advantages, masked_mean, masked_whiten,
                                token_rewards)
from fusedrl.engine.model import DTYPES
from fusedrl.engine.optim import MasterWeightAdamW, accumulate_gradients, clip_gradients
from fusedrl.engine.reference import ema_update_, master_copies
from fusedrl.engine.session import Session, make_scheduler
from fusedrl.engine.update import make_loss, micro_batches, per_token, update
from fusedrl.loss import metrics_to_floats

CRITIC_DIR, CRITIC_STATE = "critic", "critic_state.pt"


def make_critic(session: Session) -> ValueModel:
    """The critic: from the checkpoint being resumed, a separate model, or a copy of the policy's backbone."""
    cfg = session.cfg
    if session.resume_from is not None:
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
    if cfg.model.gradient_checkpointing:
        critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return critic


@torch.no_grad()
def predict_values(critic: ValueModel, batch: rollout.Batch, plan: list[torch.Tensor]) -> torch.Tensor:
    """Critic outputs [B, T] for every response token, micro-batch by micro-batch."""
    critic.eval()
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    for rows in plan:
        sub = batch.rows(rows)
        values = critic(sub.input_ids, sub.attention_mask, sub.prompt_length, sub.completion_ids.shape[1])
        out[rows.to(out.device), : values.shape[1]] = values
    return out


def update_critic(critic: ValueModel, optimizer, cfg: Config, batch: rollout.Batch, old_values: torch.Tensor,
                  returns: torch.Tensor) -> dict:
    """The critic's passes over the batch: clipped value loss, token mean over each mini-batch."""
    optim = cfg.optim
    n = len(batch)
    # As in the policy update: token counts read once, losses and norms summed on the device and read
    # back once at the end, so that no micro-batch waits for the one before.
    row_tokens = batch.completion_mask.sum(1).tolist()
    losses, clip_fracs, grad_norms = [], [], []
    critic.train()
    for _ in range(optim.updates_per_batch):
        order = torch.randperm(n) if optim.mini_batches > 1 else torch.arange(n)
        for mini in order.tensor_split(min(optim.mini_batches, n)):
            mini_tokens = max(1, sum(row_tokens[i] for i in mini.tolist()))
            step_loss = step_clip = 0.0
            for rows in micro_batches(batch, mini, optim.micro_batch_tokens):
                sub = batch.rows(rows)
                length = sub.completion_ids.shape[1]
                values = critic(sub.input_ids, sub.attention_mask, sub.prompt_length, length)
                loss, clip_frac = clipped_value_loss(values, old_values[rows, :length], returns[rows, :length],
                                                     sub.completion_mask, value_clip=cfg.ppo.value_clip)
                share = sum(row_tokens[i] for i in rows.tolist()) / mini_tokens
                (loss * share).backward()
                accumulate_gradients(optimizer)
                step_loss = step_loss + loss.detach().double() * share
                step_clip = step_clip + clip_frac.double() * share
            if optim.max_grad_norm > 0:
                grad_norms.append(clip_gradients(optimizer, optim.max_grad_norm).double())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            clip_fracs.append(step_clip)
    out = {"loss/value": sum(losses) / len(losses), "value/clip_frac": sum(clip_fracs) / len(clip_fracs)}
    if grad_norms:
        out["value/grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics_to_floats(out)


def advantages_and_returns(cfg: Config, batch: rollout.Batch, scores: torch.Tensor, raw_values: torch.Tensor,
                           old_lp: torch.Tensor, ref_lp: torch.Tensor | None,
                           normalizer: RunningMeanStd | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(advantages, critic targets, critic's old outputs, metrics) in the scale the critic learns."""
    ppo, mask = cfg.ppo, batch.completion_mask
    values = normalizer.denormalize(raw_values) if normalizer is not None else raw_values
    kl = old_lp - ref_lp if ref_lp is not None else None
    in_reward = ppo.kl_penalty == "reward" and cfg.loss.beta > 0
    rewards = token_rewards(scores, mask, reward_clip=ppo.reward_clip, kl=kl if in_reward else None,
                            beta=cfg.loss.beta)
    advantages, returns = gae_advantages(rewards, values * mask, mask, gamma=ppo.gamma, lam=ppo.lam)
    metrics = {"advantages/mean": float(masked_mean(advantages, mask)),
               "returns/mean": float(masked_mean(returns, mask)), "value/mean": float(masked_mean(values, mask))}
    if kl is not None:
        metrics["kl/rollout"] = float(masked_mean(kl, mask))
    if ppo.whiten_advantages and int(mask.sum()) >= 2:
        advantages = masked_whiten(advantages, mask)
    targets, old_values = returns, values
    if normalizer is not None:
        normalizer.update(returns, mask)
        targets, old_values = normalizer.normalize(returns) * mask, normalizer.normalize(values) * mask
    return advantages, targets, old_values, metrics


def save_critic(directory: Path, critic: ValueModel, optimizer) -> None:
    critic.save_pretrained(directory / CRITIC_DIR)
    torch.save(optimizer.state_dict(), directory / CRITIC_STATE)


def train(cfg: Config) -> dict:
    """Runs PPO as configured; returns the run summary."""
    session = Session(cfg)
    session.prepare()
    model, tokenizer, r, ppo = session.model, session.tokenizer, cfg.rollout, cfg.ppo
    # With the KL in the reward (ppo.kl_penalty=reward), the loss must not add it a second time.
    loss_fn = make_loss(cfg) if ppo.kl_penalty == "loss" else make_loss(cfg, beta=0.0)
    optimizer = MasterWeightAdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    scheduler = make_scheduler(optimizer, cfg, cfg.run.steps * cfg.optim.updates_per_batch * cfg.optim.mini_batches)
    critic = make_critic(session)
    critic_optimizer = MasterWeightAdamW(critic.parameters(), lr=ppo.critic_lr, weight_decay=cfg.optim.weight_decay,
                                         betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
    normalizer = RunningMeanStd() if ppo.normalize_values else None
    session.restore(optimizer, scheduler)
    if session.resume_from is not None:
        critic_optimizer.load_state_dict(torch.load(session.resume_from / CRITIC_STATE, map_location="cpu",
                                                      weights_only=True))
        if normalizer is not None:
            normalizer.load_state_dict(session.extra["value_normalizer"])
    # A 16-bit EMA reference is averaged in fp32 copies (reference.py), kept in the checkpoints.
    ema_master = master_copies(session.reference) if ppo.reference_ema > 0 else {}
    for name, saved in session.extra.get("reference_ema_master", {}).items():
        ema_master[name].copy_(saved)
    for step in session.steps():
        start = time.perf_counter()
        prompts = session.train_split.select(session.sampler.next_indices(r.prompts_per_step))
        batch = session.generate(prompts)
        generated = time.perf_counter()
        scores, failures = session.score_groups(prompts, rollout.decode(tokenizer, batch))
        # Rollout-time log-probs, reference log-probs and values, then GAE on the per-token rewards.
        plan = micro_batches(batch, torch.arange(len(batch)), cfg.optim.micro_batch_tokens)
        old_lp = per_token(model, batch, [plan], loss_fn)
        ref_lp = (per_token(session.reference, batch, [plan], loss_fn)
                  if session.reference is not None else None)
        raw_values = predict_values(critic, batch, plan)
        advantages, targets, old_values, adv_metrics = advantages_and_returns(
            cfg, batch, scores.to(batch.input_ids.device), raw_values, old_lp, ref_lp, normalizer)
        lengths = batch.lengths()
        metrics = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "reward/failures": failures, "accuracy": float((scores >= 1).float().mean()),
                   "completions/mean_length": float(lengths.float().mean()), "tokens/sampled": int(lengths.sum()),
                   "completions/truncated": float(batch.truncated.float().mean()), **adv_metrics}
        # Policy through the fused loss with per-token advantages, then the critic, then the reference EMA.
        metrics.update(update(session, loss_fn, optimizer, scheduler, batch, advantages, ref_logprobs=ref_lp))
        metrics.update(update_critic(critic, critic_optimizer, cfg, batch, old_values, targets))
        if ppo.reference_ema > 0:
            ema_update_(session.reference, model, ppo.reference_ema, master=ema_master)
        elapsed = time.perf_counter() - start
        metrics["tokens_per_second"] = float(batch.attention_mask.sum()) / elapsed
        metrics["time/rollout_s"] = generated - start
        metrics["time/step_s"] = elapsed
        if normalizer is not None:
            session.extra["value_normalizer"] = normalizer.state_dict()
        if ema_master:
            session.extra["reference_ema_master"] = ema_master
        saved = session.end_step(step, metrics, optimizer, scheduler)
        if saved is not None:
            save_critic(saved, critic, critic_optimizer)
    return session.finish()
