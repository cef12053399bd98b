"""Vocabulary-parallel lp and H: each rank of a process group holds one contiguous slice of the
vocabulary (of the logits, or of the output embedding) and the ranks combine per-row statistics.

Every rank streams its slice as the one-process op does and ends with, per row, its slice's max m_r,
log S_r = log sum_slice exp((x - m_r) / T), entropy H_r of the softmax restricted to the slice, and,
on the rank that holds the target, the slice-local lp_r = (x_y - m_r) / T - log S_r. With
log w_r = log S_r + (m_r - M) / T, M the global max, the slice's share of the probability mass is
pi_r = w_r / sum_r w_r, and (the entropy of a mixture of disjoint supports)

    H = sum_r pi_r (H_r - log pi_r),        lp = lp_owner + log pi_owner.

Both sums have non-negative terms only, so a peaked row's tiny H keeps its relative precision, as in
the one-process op (lse - sum p z would cancel). Three collectives of [rows] floats: an all-reduce of
the max, then all-gathers of w and of H and lp together, summed in rank order (so each row's result
does not depend on the batch: see ordered_sum). With one rank pi = 1 and the outputs are the slice's
own, bit for bit.

The backward needs no communication: given the global M and log S every rank writes d logits for its
own slice, as long as the upstream gradients of lp and H are the same on every rank (they are when
every tensor-parallel rank computes the same loss, as Megatron's vocab-parallel cross entropy assumes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusedrl.kernels._select import all_reduce


def check_vocab_slices(vocab_start, local_vocab: int, group, device) -> int:
    """The full vocabulary size, after checking that the ranks' slices tile [0, V) in rank order
    without gaps or overlaps (one all-gather of two ints, on `device`, the data's: NCCL groups take
    only CUDA tensors). ValueError names the argument otherwise."""
    if isinstance(vocab_start, bool) or not hasattr(vocab_start, "__index__") or int(vocab_start) < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if group is None:
        if int(vocab_start) != 0:
            raise ValueError(f"vocab_start must be 0 without a process_group, got {vocab_start!r}")
        return local_vocab
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {group!r}")
    mine = torch.tensor([int(vocab_start), local_vocab], dtype=torch.int64, device=device)
    slices = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(slices, mine, group=group)
    end = 0
    for rank, (start, size) in enumerate(t.tolist() for t in slices):
        if start != end:
            raise ValueError(
                f"vocab_start must tile the vocabulary in rank order: rank {rank} starts at {start}, expected {end}"
            )
        end = start + size
    return end


def owner_mask(targets: torch.Tensor, vocab_start: int, local_vocab: int) -> torch.Tensor:
    """Rows whose target id lies in this rank's slice (the caller leaves out ignored rows)."""
    return (targets >= vocab_start) & (targets < vocab_start + local_vocab)


def combine_slices(row_max, log_sum, entropy, lp, owner, inv_temperature: float, group):
    """Global (max M, log S relative to M, H, lp) per row from this rank's slice statistics (module docstring).

    row_max in the units the caller subtracts before scaling by inv_temperature (raw logits for the
    logits op, scaled logits with inv_temperature = 1 for the fused-linear op). A slice whose logits
    are all -inf (m_r = -inf) has pi_r = 0 and adds nothing; its nan H_r never enters.
    """
    top = all_reduce(row_max.clone(), group, dist.ReduceOp.MAX)
    top_safe = torch.where(top == float("-inf"), 0.0, top)
    log_w = torch.where(row_max == float("-inf"), float("-inf"), log_sum + (row_max - top_safe) * inv_temperature)
    log_total = torch.log(ordered_sum(torch.exp(log_w), group))
    log_pi = log_w - log_total
    pi = torch.exp(log_pi)
    parts = torch.stack([
        torch.where(pi > 0, pi * (entropy - log_pi), 0.0),
        # A target logit of -inf on a slice of -inf logits (lp_r = nan there) still means lp = -inf.
        torch.where(owner, torch.where(log_w == float("-inf"), float("-inf"), lp + log_pi), 0.0),
    ])
    entropy, lp = ordered_sum(parts, group).unbind(0)
    return top, log_total, entropy, lp


def combine_lse_slices(lp, entropy, lse, targets, valid, vocab_start: int, local_vocab: int, group):
    """combine_slices for ops that keep lse = max + log S as one number (the fused-linear op, whose
    logits are already divided by T): global (lp, H, lse) per row; lp and H are 0 on rows that are not
    valid, and lse stays finite there (the torch backend's backward computes p on every row)."""
    owner = owner_mask(targets, vocab_start, local_vocab) & valid
    top, log_total, entropy, lp = combine_slices(lse, torch.zeros_like(lse), entropy, lp, owner, 1.0, group)
    return torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0), top + log_total


def ordered_sum(t: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks of t, added in rank order: an all-gather, then a local sum. Unlike an
    all-reduce (NCCL's ring adds each element in an order that depends on where it falls in the
    tensor, so on the tensor's length), every element's sum is the same whatever the batch."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def sum_hidden_grad(grad: torch.Tensor | None, dtype: torch.dtype, group, batch_invariant: bool):
    """Sum the ranks' fp32 partial gradients of a replicated input (the hidden states, whose every rank
    multiplies only its own slice of the embedding), then round once to `dtype`. batch_invariant: in
    rank order (ordered_sum, world-size times the gradient's memory), else one all-reduce."""
    if grad is None:
        return None
    return (ordered_sum(grad, group) if batch_invariant else all_reduce(grad, group)).to(dtype)
