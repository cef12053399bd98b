"""The policy update that GRPO, PPO and SPO share: micro-batches, the no-grad passes, the optimizer steps.

`update` takes one rollout batch and its advantages ([B] per response, or [B, T] per token) through
`updates_per_batch` passes, each split into `mini_batches` optimizer steps; each mini-batch is cut
into micro-batches by a token budget whose gradients accumulate before clipping and the AdamW step.
The loss runs on the fused linear path: the backbone's final hidden states and the output embedding
go in, so the logits tensor is never built.

With a single update per rollout the loss runs on-policy (old log-probs are the current ones,
detached); with more, a no-grad pass fixes the old log-probs first, using the same micro-batches so
that the first ratio is exactly 1. A reference model, when configured, gives per-token reference
log-probs the same way. When the loss reads statistics of the whole batch (`loss_fn.batch_wide`: the
top-entropy threshold, Clip-Cov / KL-Cov, a selected-token count), each mini-batch starts with a
no-grad pass under the current policy that fixes its masks (`FusedPolicyLoss.select`), and every
micro-batch's loss takes its rows of them.

Everything that depends on the loss's options is asked of the loss: the temperature and backend of
the no-grad passes, each micro-batch's share of its mini-batch's loss (`micro_batch_share`) and the
token count it divides by (`token_count_argument`). So the micro-batch layout, a memory knob, never
changes the objective.

A batch that carries the sampler's own log-probs (rollout.engine=vllm) always gets the no-grad pass
of old log-probs: the mismatch between them and the sampler's is measured and corrected
(engine/mismatch.py: weights into the loss as rollout_is_weights, or tokens masked out of it).
"""

from __future__ import annotations

import torch

from fusedrl.engine import mismatch, rollout
from fusedrl.engine.config import Config
from fusedrl.engine.model import completion_hidden, output_projection, token_logprobs
from fusedrl.engine.optim import accumulate_gradients, clip_gradients
from fusedrl.engine.session import Session
from fusedrl.loss import EXTREME_METRICS, FusedPolicyLoss, Selection, metrics_to_floats


def make_loss(cfg: Config, **option_overrides) -> FusedPolicyLoss:
    """FusedPolicyLoss from the loss section, at the rollout's temperature; dr_grpo's constant length
    is rollout.max_new_tokens. `option_overrides` replace loss options for this loop (PPO with the KL
    in the reward gives the loss no KL term)."""
    return FusedPolicyLoss(cfg.loss, temperature=cfg.rollout.temperature,
                           max_completion_length=cfg.rollout.max_new_tokens, **option_overrides)


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


def per_token(model, batch: rollout.Batch, plan: list[list[torch.Tensor]], loss_fn: FusedPolicyLoss) -> torch.Tensor:
    """No-grad log-probs [B, T] of every response token, computed micro-batch by micro-batch."""
    return per_token_lp_entropy(model, batch, plan, loss_fn)[0]


def per_token_lp_entropy(model, batch: rollout.Batch, plan: list[list[torch.Tensor]],
                         loss_fn: FusedPolicyLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad log-probs and entropies [B, T] of the response tokens of the rows in `plan` (zero
    elsewhere), micro-batch by micro-batch with the fused linear op (no logits tensor), at the loss's
    temperature and backend."""
    lp_out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    h_out = torch.zeros_like(lp_out)
    for rows in (r for mini in plan for r in mini):
        sub = batch.rows(rows)
        lp, h = token_logprobs(model, sub, loss_fn.temperature, loss_fn.backend)
        lp_out[rows.to(lp_out.device), : lp.shape[1]] = lp
        h_out[rows.to(h_out.device), : h.shape[1]] = h
    return lp_out, h_out


def mini_batch_selection(model, loss_fn: FusedPolicyLoss, batch: rollout.Batch, mini: list[torch.Tensor],
                         mask: torch.Tensor, advantages: torch.Tensor, old_lp: torch.Tensor | None) -> Selection:
    """The batch-wide masks (top-entropy tau, Clip-Cov / KL-Cov) over the tokens of one mini-batch
    that get loss (`mask` [B, T] on its rows), from a no-grad pass under the current policy, the one
    its micro-batches' losses see. Rows outside the mini-batch count as padding; indexed by batch row."""
    lp, entropy = per_token_lp_entropy(model, batch, [mini], loss_fn)
    in_mini = torch.zeros(len(batch), dtype=torch.bool, device=lp.device)
    in_mini[torch.cat(mini).to(lp.device)] = True
    return loss_fn.select(mask.bool() & in_mini[:, None], advantages, entropy=entropy, logprobs=lp,
                          old_logprobs=old_lp)


def update(session: Session, loss_fn: FusedPolicyLoss, optimizer, scheduler, batch: rollout.Batch,
           advantages: torch.Tensor, loss_mask: torch.Tensor | None = None,
           ref_logprobs: torch.Tensor | None = None) -> dict:
    """The policy updates on one rollout batch; returns the loss metrics averaged over tokens.

    advantages: [B] (one per response) or [B, T] (per token: PPO, SPO). loss_mask [B, T]: the response
    tokens that get loss (default: all of them; SPO-tree drops zero-advantage segments). ref_logprobs
    [B, T]: the reference's log-probs when the caller has them already (PPO, for its KL reward).
    """
    cfg, model = session.cfg, session.model
    optim = cfg.optim
    n = len(batch)
    sampler_lp = batch.sampler_logprobs
    need_old = optim.updates_per_batch > 1 or optim.mini_batches > 1 or sampler_lp is not None
    passes = []
    for _ in range(optim.updates_per_batch):
        order = torch.randperm(n) if optim.mini_batches > 1 else torch.arange(n)
        passes.append([micro_batches(batch, mini, optim.micro_batch_tokens)
                       for mini in order.tensor_split(min(optim.mini_batches, n))])
    old_lp = per_token(model, batch, passes[0], loss_fn) if need_old else None
    ref_lp = ref_logprobs
    if ref_lp is None and session.reference is not None:
        ref_lp = per_token(session.reference, batch, passes[0], loss_fn)
    sums, extremes, tokens_seen, losses, grad_norms = {}, {}, 0, [], []
    mask = batch.completion_mask if loss_mask is None else loss_mask & batch.completion_mask
    rollout_weights, mismatch_metrics = None, {}
    if sampler_lp is not None:
        fix = mismatch.correct(old_lp, sampler_lp, mask, cfg.rollout.correction, cfg.rollout.correction_cap)
        mask, rollout_weights, mismatch_metrics = mask & fix.keep, fix.weights, fix.metrics
    off_policy_lp = sampler_lp if loss_fn.off_policy_mask_threshold is not None else None
    # Token counts per row, read once: the loop below then never waits on the device; the loss and its
    # metrics are summed as device tensors and read back once, at the end.
    row_tokens = mask.sum(1).tolist()
    model.train()
    for plan in passes:
        for mini in plan:
            mini_rows = sum(len(r) for r in mini)
            mini_tokens = sum(row_tokens[i] for r in mini for i in r.tolist())
            step_loss = 0.0
            # Batch-wide statistics need their own no-grad pass per mini-batch; a mini-batch that is one
            # micro-batch skips it (its loss call sees the whole mini-batch) unless Clip-Cov draws: its draw
            # is laid out over the batch's rows, so that runs do not depend on micro_batch_tokens.
            selection = None
            if loss_fn.batch_wide and (len(mini) > 1 or loss_fn.cov_mode == "clip_cov"):
                selection = mini_batch_selection(model, loss_fn, batch, mini, mask, advantages, old_lp)
            for rows in mini:
                sub = batch.rows(rows)
                length = sub.completion_ids.shape[1]
                hidden = completion_hidden(model, sub.input_ids, sub.attention_mask, sub.prompt_length, length)
                weight, bias = output_projection(model)
                sub_adv = advantages[rows] if advantages.dim() == 1 else advantages[rows, :length]
                loss, metrics = loss_fn(
                    sub.completion_ids, mask[rows, :length], sub_adv, hidden=hidden, weight=weight, bias=bias,
                    old_logprobs=None if old_lp is None else old_lp[rows, :length],
                    ref_logprobs=None if ref_lp is None else ref_lp[rows, :length],
                    num_items_in_batch=loss_fn.token_count_argument(mini_tokens),
                    selection=None if selection is None else selection.rows(rows, length),
                    rollout_is_weights=None if rollout_weights is None else rollout_weights[rows, :length],
                    sampling_logprobs=None if off_policy_lp is None else off_policy_lp[rows, :length])
                valid = sum(row_tokens[i] for i in rows.tolist())
                share = loss_fn.micro_batch_share(len(rows), valid, mini_rows, mini_tokens)
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
    return out | mismatch_metrics
