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

Everything that depends on the loss's options is asked of the loss: the temperature, kept set (top_k /
top_p) and backend of the no-grad passes (old, reference and selection log-probs are then of the
distribution the loss computes), each micro-batch's share of its mini-batch's loss (`micro_batch_share`) and the
token count it divides by (`token_count_argument`). So the micro-batch layout, a memory knob, never
changes the objective.

Under torchrun the schedule is global (engine/distributed.py): every rank draws the same permutation of
the global rows (ranks' rows in rank order) and trains on its own rows of each mini-batch; the row and
token counts a micro-batch's share divides by, the batch-wide selection (the loss holds the process
group) and the metrics span every rank; each rank runs as many micro-batches as the busiest one (idle
ones on a row of its own, with no valid token), so that FSDP's collectives stay in step. A rank with
no rows at all passes batch=None and still joins them. With one process all of this reduces to the
single-process update.

Micro-batches are packed (engine/packing.py: whole sequences end to end in one row of up to
micro_batch_tokens tokens, no padding, and only the loss's tokens' hidden states go to the fused op) where
the model's attention can run them (`Session.packed`, optim.micro_batch_layout), else padded rows.

With rollout.engine=vllm the no-grad pass of old log-probs always runs: the mismatch between them and
the sampler's own (Batch.sampler_logprobs) is measured and corrected (engine/mismatch.py: weights into
the loss as rollout_is_weights, or tokens masked out of it); the metrics are this rank's.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from fusedrl.engine import distributed, mismatch, rollout
from fusedrl.engine.config import Config, loss_kept_set
from fusedrl.engine.errors import RunError
from fusedrl.engine.model import (completion_hidden, output_projection, packed_hidden, packed_token_logprobs,
                                  token_logprobs)
from fusedrl.engine.packing import SequenceLengths, balanced_bins, pack
from fusedrl.engine.optim import accumulate_gradients
from fusedrl.engine.session import Session
from fusedrl.loss import EXTREME_METRICS, FusedPolicyLoss, Selection, metrics_to_floats


def make_loss(cfg: Config, process_group=None, **option_overrides) -> FusedPolicyLoss:
    """FusedPolicyLoss from the loss section, at the rollout's temperature and, with rollout.train_on=sampler,
    on the sampler's top_k / top_p kept set; dr_grpo's constant length is rollout.max_new_tokens; its
    batch statistics span `process_group` (the ranks, under torchrun).
    `option_overrides` replace loss options for this loop (PPO with the KL in the reward gives the loss
    no KL term)."""
    top_k, top_p = loss_kept_set(cfg.rollout)
    return FusedPolicyLoss(cfg.loss, temperature=cfg.rollout.temperature, top_k=top_k, top_p=top_p,
                           process_group=process_group, max_completion_length=cfg.rollout.max_new_tokens,
                           **option_overrides)


def micro_batches(batch: rollout.Batch, rows: torch.Tensor, token_budget: int,
                  packed: bool = False) -> list[torch.Tensor]:
    """Splits `rows` into micro-batches of at most `token_budget` tokens: packed, the sequences' own
    tokens (balanced bin packing, engine/packing.py); padded, rows x (longest prompt + longest response),
    rows sorted by length first so that similar lengths share padding. A sequence longer than the budget
    is a micro-batch of its own. The groups are CPU index tensors (they index device tensors; the lengths
    are read from the device once)."""
    rows = torch.as_tensor(rows).cpu()
    if packed:
        lengths = SequenceLengths.of(batch)
        return [rows[group] for group in balanced_bins([lengths.total(r) for r in rows.tolist()], token_budget)]
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


def per_token(model, batch: rollout.Batch, plan: list[list[torch.Tensor]], loss_fn: FusedPolicyLoss,
              packed: bool = False) -> torch.Tensor:
    """No-grad log-probs [B, T] of every response token, computed micro-batch by micro-batch."""
    return per_token_lp_entropy(model, batch, plan, loss_fn, packed)[0]


def per_token_lp_entropy(model, batch: rollout.Batch, plan: list[list[torch.Tensor]],
                         loss_fn: FusedPolicyLoss, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad log-probs and entropies [B, T] of the response tokens of the rows in `plan` (zero
    elsewhere), micro-batch by micro-batch with the fused linear op (no logits tensor), at the loss's
    temperature, kept set (top_k / top_p) and backend: the distribution its calls compute. Under FSDP
    the model is gathered for the pass, so that ranks may run different numbers of micro-batches."""
    lp_out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    h_out = torch.zeros_like(lp_out)
    lengths = SequenceLengths.of(batch) if packed else None
    kept = dict(top_k=loss_fn.top_k, top_p=loss_fn.top_p)
    with distributed.gathered(model):
        for rows in (r for mini in plan for r in mini):
            if packed:
                micro = pack(batch, rows, lengths)
                lp, h, flat = packed_token_logprobs(model, micro, loss_fn.temperature, loss_fn.backend, **kept)
                at = rows.to(flat.device)[flat // micro.width], flat % micro.width
                lp_out[at], h_out[at] = lp, h
                continue
            sub = batch.rows(rows)
            lp, h = token_logprobs(model, sub, loss_fn.temperature, loss_fn.backend, **kept)
            lp_out[rows.to(lp_out.device), : lp.shape[1]] = lp
            h_out[rows.to(h_out.device), : h.shape[1]] = h
    return lp_out, h_out


def mini_batch_selection(model, loss_fn: FusedPolicyLoss, batch: rollout.Batch, mini: list[torch.Tensor],
                         mask: torch.Tensor, advantages: torch.Tensor, old_lp: torch.Tensor | None,
                         world: distributed.World = distributed.World(), rows: int | None = None,
                         packed: bool = False) -> Selection:
    """The batch-wide masks (top-entropy tau, Clip-Cov / KL-Cov) over the tokens of one mini-batch
    that get loss (`mask` [B, T] on its rows), from a no-grad pass under the current policy, the one
    its micro-batches' losses see. Rows outside the mini-batch count as padding; indexed by batch row.

    Only the first `rows` rows (default all; 0 on a rank without rows, whose batch is an idle row)
    take part. Clip-Cov's draw is keyed by each token's place in the [rows, width] layout of the
    ranks' rows in rank order, so every rank uses one width, the longest response: the same layout as
    one process's batch."""
    rows = len(batch) if rows is None else rows
    lp, entropy = per_token_lp_entropy(model, batch, [mini], loss_fn, packed)
    in_mini = torch.zeros(len(batch), dtype=torch.bool, device=lp.device)
    if mini:
        in_mini[torch.cat(mini).to(lp.device)] = True
    longest = int(batch.completion_mask[:rows].sum(1).max()) if rows else 1
    width = world.max([max(1, longest)])[0]

    def fit(t):
        t = t[:rows, :width]
        return torch.cat([t, t.new_zeros((rows, width - t.shape[1]))], 1) if t.shape[1] < width else t

    selection = loss_fn.select(fit(mask.bool() & in_mini[:, None]),
                               advantages[:rows] if advantages.dim() == 1 else fit(advantages),
                               entropy=fit(entropy), logprobs=fit(lp), old_logprobs=None if old_lp is None else fit(old_lp))
    extra = len(batch) - rows  # an idle row gets an empty selection, for Selection.rows
    if not extra:
        return selection
    return replace(selection, **{name: torch.cat([t, t.new_zeros((extra, width))])
                                 for name in ("high_entropy", "covariance", "covariance_values", "probability")
                                 if (t := getattr(selection, name)) is not None})


def idle_batch(session: Session) -> tuple[rollout.Batch, torch.Tensor, torch.Tensor]:
    """(batch, advantages, loss mask) of one padding row with no valid token: what a rank without rows
    computes on to join the collectives."""
    pad = session.tokenizer.pad_token_id
    batch = rollout.make_batch([[pad]], [[pad]], [False], pad, session.device)
    return batch, torch.zeros(1, device=session.device), torch.zeros((1, 1), dtype=torch.bool, device=session.device)


def global_plan(world: distributed.World, batch: rollout.Batch, rows: int, optim,
                packed: bool = False) -> list[list[list[torch.Tensor]]]:
    """passes[u][m]: this rank's micro-batches (local row indices) of mini-batch m of update pass u. The
    permutation is drawn over the global rows (every rank draws the same one) and cut into mini-batches;
    each rank keeps its own rows (ranks' rows are consecutive, in rank order)."""
    counts = world.sum([rows if r == world.rank else 0 for r in range(world.size)])
    offset, total = int(sum(counts[: world.rank])), int(sum(counts))
    passes = []
    for _ in range(optim.updates_per_batch):
        order = torch.randperm(total) if optim.mini_batches > 1 else torch.arange(total)
        plan = []
        for mini in order.tensor_split(min(optim.mini_batches, total)):
            mine = mini[(mini >= offset) & (mini < offset + rows)] - offset
            plan.append(micro_batches(batch, mine, optim.micro_batch_tokens, packed) if len(mine) else [])
        passes.append(plan)
    return passes


def update(session: Session, loss_fn: FusedPolicyLoss, optimizer, scheduler, batch: rollout.Batch | None,
           advantages: torch.Tensor | None, loss_mask: torch.Tensor | None = None,
           ref_logprobs: torch.Tensor | None = None) -> dict:
    """The policy updates on one rollout batch; returns the loss metrics averaged over tokens.

    advantages: [B] (one per response) or [B, T] (per token: PPO, SPO). loss_mask [B, T]: the response
    tokens that get loss (default: all of them; SPO-tree drops zero-advantage segments). ref_logprobs
    [B, T]: the reference's log-probs when the caller has them already (PPO, for its KL reward).
    batch=None (with advantages None): this rank holds no rows of a global batch that others do.
    """
    cfg, model, world, packed = session.cfg, session.model, session.world, session.packed
    optim = cfg.optim
    rows = 0 if batch is None else len(batch)
    if batch is None:
        batch, advantages, loss_mask = idle_batch(session)
    passes = global_plan(world, batch, rows, optim, packed)
    # With vllm decided by the config, not by the batch, so that every rank (an idle one too) runs the
    # same passes.
    need_old = (optim.updates_per_batch > 1 or optim.mini_batches > 1 or cfg.rollout.engine == "vllm"
                or batch.sampler_logprobs is not None)
    old_lp = per_token(model, batch, passes[0], loss_fn, packed) if need_old else None
    ref_lp = ref_logprobs
    if ref_lp is None and session.reference is not None:
        ref_lp = per_token(session.reference, batch, passes[0], loss_fn, packed)
    sums, extremes, tokens_seen, losses, grad_norms, skipped = {}, {}, 0, [], [], 0
    mask = batch.completion_mask if loss_mask is None else loss_mask & batch.completion_mask
    sampler_lp, rollout_weights, mismatch_metrics = batch.sampler_logprobs, None, {}
    if sampler_lp is not None:
        fix = mismatch.correct(old_lp, sampler_lp, mask, cfg.rollout.correction, cfg.rollout.correction_cap)
        mask, rollout_weights, mismatch_metrics = mask & fix.keep, fix.weights, fix.metrics
    off_policy_lp = sampler_lp if loss_fn.off_policy_mask_threshold is not None else None
    # Token counts per row, read once: the micro-batch loop below then never waits on the device (the
    # optimizer step reads the gradient norm once, StepGuard); the loss and its metrics are summed as
    # device tensors and read back once, at the end.
    row_tokens = mask.sum(1).tolist()
    if packed:  # the loss's tokens of each row, by column: where a packed row's hidden states are gathered
        lengths, loss_columns = SequenceLengths.of(batch), [row.nonzero().squeeze(1).tolist() for row in mask.cpu()]
    model.train()
    for plan in passes:
        for mini in plan:
            mini_rows, mini_tokens = (int(v) for v in world.sum(
                [sum(len(r) for r in mini), sum(row_tokens[i] for r in mini for i in r.tolist())]))
            step_losses = {}  # this step's loss terms: the micro-batches' values weighted by their shares
            micro = world.lockstep(mini)
            # Batch-wide statistics need their own no-grad pass per mini-batch; a mini-batch that is one
            # micro-batch (on every rank) skips it (its loss calls see the whole mini-batch) unless Clip-Cov
            # draws: its draw is laid out over the batch's rows, so that runs do not depend on micro_batch_tokens.
            # Nor across ranks with bnpo over the selected tokens: a call's own selection divides by its
            # rank's selected count, a given one by its share of the mini-batch's (the ranks' ratios of
            # selected to valid tokens differ).
            selection = None
            if loss_fn.batch_wide and (len(micro) > 1 or loss_fn.cov_mode == "clip_cov" or (
                    world.sharded and loss_fn.aggregation == "bnpo" and loss_fn.options.counts_selected)):
                selection = mini_batch_selection(model, loss_fn, batch, mini, mask, advantages, old_lp, world, rows,
                                                 packed)
            for part in micro:
                idle = part is None
                part = torch.tensor([0]) if idle else part
                with _naming_out_of_memory(batch, part, session.cfg):
                    if packed and not idle:  # [N, H]: the hidden states of the loss's tokens only
                        packed_rows = pack(batch, part, lengths)
                        length = packed_rows.width
                        index, _ = packed_rows.token_index([loss_columns[r] for r in part.tolist()])
                        hidden = packed_hidden(model, packed_rows)[0, index]
                    else:  # [k, T, H]; an idle rank's one padding row too
                        sub = batch.rows(part)
                        length = sub.completion_ids.shape[1]
                        hidden = completion_hidden(model, sub.input_ids, sub.attention_mask, sub.prompt_length,
                                                   length)
                    weight, bias = output_projection(model)
                    sub_adv = advantages[part] if advantages.dim() == 1 else advantages[part, :length]
                    sub_mask = mask[part, :length] & (not idle)
                    loss, metrics = loss_fn(
                        batch.completion_ids[part, :length], sub_mask, sub_adv, hidden=hidden, weight=weight, bias=bias,
                        old_logprobs=None if old_lp is None else old_lp[part, :length],
                        ref_logprobs=None if ref_lp is None else ref_lp[part, :length],
                        num_items_in_batch=loss_fn.token_count_argument(mini_tokens),
                        selection=None if selection is None else selection.rows(part, length),
                        rollout_is_weights=None if rollout_weights is None else rollout_weights[part, :length],
                        sampling_logprobs=None if off_policy_lp is None else off_policy_lp[part, :length])
                    valid = 0 if idle else sum(row_tokens[i] for i in part.tolist())
                    share = 0.0 if idle else loss_fn.micro_batch_share(len(part), valid, mini_rows, mini_tokens)
                    (loss * share).backward()
                accumulate_gradients(optimizer)  # 16-bit gradients summed in fp32 (engine/optim.py)
                if idle:
                    continue
                tokens_seen += valid
                for key, value in [("loss/policy", loss.detach()), *metrics.items()]:
                    if key.startswith("loss/"):
                        step_losses[key] = step_losses.get(key, 0.0) + value.double() * share
                    elif key in EXTREME_METRICS:
                        extremes[key] = EXTREME_METRICS[key](extremes.get(key, value.double()), value.double())
                    else:
                        sums[key] = sums.get(key, 0.0) + value.double() * valid
            norm, stepped = session.step_guard.step(optimizer, optim.max_grad_norm)  # skips a non-finite one
            skipped += not stepped
            if stepped:  # a skipped step leaves the learning-rate schedule where it was, too
                scheduler.step()
                if optim.max_grad_norm > 0:
                    grad_norms.append(norm.double())
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_losses)
    out = _reduce_metrics(world, sums, extremes, tokens_seen, losses)
    if grad_norms:
        out["grad_norm"] = float(sum(grad_norms) / len(grad_norms))
    out["lr"] = scheduler.get_last_lr()[0]
    out["optim/skipped_steps"] = skipped
    return out | mismatch_metrics


@contextlib.contextmanager
def _naming_out_of_memory(batch: rollout.Batch, rows: torch.Tensor, cfg: Config):
    """A device out-of-memory error in a micro-batch's forward or backward becomes one line that says how
    large the micro-batch was and what to change (read only then: the loop never waits on the device)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        lengths = batch.attention_mask[rows].sum(1).tolist()
        what = (f"one sequence of {lengths[0]} tokens, alone in its micro-batch" if len(lengths) == 1 else
                f"a micro-batch of {len(lengths)} sequences, {sum(lengths)} tokens, the longest {max(lengths)}")
        raise RunError(f"out of device memory in the update's forward / backward of {what} "
                       f"(optim.micro_batch_tokens={cfg.optim.micro_batch_tokens}): lower optim.micro_batch_tokens "
                       f"or rollout.max_new_tokens, set model.gradient_checkpointing=true, or shard the model over "
                       f"more GPUs with torchrun (docs/distributed.md)") from e


def _reduce_metrics(world: distributed.World, sums: dict, extremes: dict, tokens: int, losses: list) -> dict:
    """The step's loss metrics over every rank: token-weighted means, extremes, and the mean over
    optimizer steps of each step's loss terms (the ranks' shares of them summed, so that they do not
    depend on the micro-batch layout)."""
    parts = world.gather((metrics_to_floats(sums), metrics_to_floats(extremes), tokens,
                          [metrics_to_floats(step) for step in losses]))
    total_tokens = max(1, sum(p[2] for p in parts))
    out = {}
    for key in dict.fromkeys(k for p in parts for k in p[0]):
        out[key] = sum(p[0].get(key, 0.0) for p in parts) / total_tokens
    for key in dict.fromkeys(k for p in parts for k in p[1]):
        values = [torch.tensor(p[1][key], dtype=torch.float64) for p in parts if key in p[1]]
        folded = values[0]
        for v in values[1:]:
            folded = EXTREME_METRICS[key](folded, v)
        out[key] = float(folded)
    for key in dict.fromkeys(k for p in parts for step in p[3] for k in step):
        out[key] = sum(step.get(key, 0.0) for p in parts for step in p[3]) / len(losses)
    return out
