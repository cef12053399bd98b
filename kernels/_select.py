"""Exact batch-wide order statistics for the selection ops, across ranks, without host syncs.

A radix select over order-preserving integer keys: each pass histograms one 16-bit digit of the keys
still in the running (one all-reduce of 65,536 counts per pass), picks the bucket that holds the
wanted rank, and narrows the prefix. Float32 values take two passes, int64 / float64 keys four. Work is
O(N) per pass, nothing is sorted, no rank ever sees another rank's values, and every quantity (ranks,
counts, the selected key) stays a device tensor, so no step waits on the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DIGIT_BITS = 8
_BINS = 1 << _DIGIT_BITS
_KEY_BITS = {torch.float32: 32, torch.float64: 64, torch.int64: 64}


def all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce over `group` (sum by default); a no-op without a process group."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def world(group) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without a process group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 / float64 values of x (-0.0 sorts just below +0.0).

    Bit patterns of non-negative floats already order as signed integers; for negative ones the
    magnitude bits are flipped so that larger magnitudes give smaller keys.
    """
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = x.view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def key_to_float(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of float_keys for a 0-dim key."""
    if dtype == torch.float32:
        bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
        return bits.view(torch.float32)
    return torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).view(torch.float64)


def kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, key_bits: int, group) -> torch.Tensor:
    """The key of rank k (0-based, a 0-dim int64 tensor) among the valid keys of all ranks.

    keys: int64 of any shape holding signed `key_bits`-bit values; valid: bool of the same shape.
    k must lie in [0, global valid count); the caller guards the empty case.
    """
    keys, valid = keys.reshape(-1), valid.reshape(-1)
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)  # signed value of the chosen high bits
    running = valid  # keys whose high digits equal the prefix so far
    rank = k.clone()
    one = torch.ones((), dtype=torch.int64, device=keys.device).expand(keys.shape)
    top = key_bits - _DIGIT_BITS
    for shift in range(top, -1, -_DIGIT_BITS):
        digit = (keys >> shift) & (_BINS - 1)
        if shift == top:
            digit = digit ^ (_BINS >> 1)  # the top digit carries the sign: flip it into ascending order
        # Keys out of the running land in an extra bin that is never read.
        hist = torch.zeros(_BINS + 1, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(0, digit.masked_fill_(~running, _BINS), one)
        hist = all_reduce(hist[:_BINS].contiguous(), group)
        cum = hist.cumsum(0)
        chosen = torch.searchsorted(cum, rank.reshape(1), right=True).reshape(()).clamp_(max=_BINS - 1)
        rank = rank - (cum[chosen] - hist[chosen])
        prefix = chosen - (_BINS >> 1) if shift == top else prefix * _BINS + chosen
        if shift:
            running = running & (digit == chosen)
    return prefix


def top_k_mask(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, key_bits: int, group) -> torch.Tensor:
    """Exactly min(k, n) valid entries with the largest keys over all ranks (k: 0-dim int64 tensor).

    Ties at the threshold go to the lowest flat index, rank 0 first: the same tokens the mask of the
    concatenated batch would pick on one process.
    """
    valid = valid.bool()
    n = all_reduce(valid.sum().to(torch.int64), group)
    k = torch.minimum(k.to(torch.int64), n)
    # The k-th largest is the (n - k)-th smallest; with k = 0 nothing is kept below.
    threshold = kth_smallest_key(keys, valid, (n - k).clamp(max=n - 1).clamp(min=0), key_bits, group)
    above = valid & (keys > threshold)
    tied = valid & (keys == threshold)
    quota = k - all_reduce(above.sum().to(torch.int64), group)
    rank, size = world(group)
    tied_per_rank = torch.zeros(size, dtype=torch.int64, device=keys.device)
    tied_per_rank[rank] = tied.sum()
    tied_before = all_reduce(tied_per_rank, group)[:rank].sum()
    order = tied.reshape(-1).cumsum(0).reshape(tied.shape) + tied_before  # 1-based global tie order
    return (above | (tied & (order <= quota))) & (k > 0)
