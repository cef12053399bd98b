"""Top-rho entropy selection over the whole batch ("Beyond the 80/20 rule", docs/algorithms.md section 2).

The threshold tau is the (1 - rho) quantile of the entropies of all valid tokens, with the linear
interpolation and the float arithmetic of torch.quantile, so that the mask equals TRL's
`H >= torch.quantile(H[valid], 1 - rho)` wherever torch.quantile runs. The two order statistics it
interpolates come from an exact selection (kernels/_select.py: torch.topk or one sort on a single
process, a radix select with a process group): no 2^24 limit, and with a process group one global
tau from all-reduced histograms, never gathering the entropies themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusedrl.kernels._checks import FLOAT_DTYPES, check_float, check_fraction, check_same_device
from fusedrl.kernels._select import all_reduce, float_keys, key_to_float, kth_smallest_key

_EXACT_FLOAT32_RANKS = 1 << 24  # float32 holds every integer rank up to here


def check_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A mask of `shape` (bool, integer or float; nonzero = valid), returned as bool."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool() if mask.dtype == torch.bool else mask != 0


def entropy_quantile(entropy: torch.Tensor, valid: torch.Tensor, q: float, process_group=None) -> torch.Tensor:
    """torch.quantile(entropy[valid], q) (linear) over all ranks, as a 0-dim tensor of the values' dtype.

    NaN if any valid entropy is NaN or no token is valid (torch.quantile returns NaN for the first
    and refuses the second).
    """
    dtype = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    values = entropy.to(dtype)
    keys = float_keys(values)
    counts = torch.stack([valid.sum(), (valid & values.isnan()).sum()]).to(torch.int64)
    n, nans = all_reduce(counts, process_group).unbind()
    last = (n - 1).clamp(min=0)
    # torch.quantile: rank = q * last_index in the input dtype, below = trunc(rank), weight = rank - below,
    # above = ceil(rank), then lerp. Past 2^24 float32 no longer holds every integer rank (where
    # torch.quantile refuses); there the rank is taken in float64 so that it stays exact.
    torch_rank = torch.full((), q, dtype=dtype, device=entropy.device) * last.to(dtype)
    wide_rank = q * last.to(torch.float64)
    rank = torch.where(last <= _EXACT_FLOAT32_RANKS, torch_rank.to(torch.float64), wide_rank)
    below = rank.to(torch.int64)
    weight = (rank - below).to(dtype)
    above = torch.ceil(rank).to(torch.int64)
    low_key = kth_smallest_key(keys, valid, below, _key_bits(dtype), process_group)
    # The next order statistic: the same key while it repeats past `below`, else the smallest larger key.
    at_most = all_reduce((valid & (keys <= low_key)).sum().to(torch.int64), process_group)
    # The sentinel keeps the minimum defined on a rank holding no tokens (it still joins the all-reduce).
    sentinel = keys.new_full((1,), torch.iinfo(torch.int64).max)
    larger = torch.cat([torch.where(valid & (keys > low_key), keys, sentinel).reshape(-1), sentinel]).min()
    if process_group is not None:
        dist.all_reduce(larger, op=dist.ReduceOp.MIN, group=process_group)
    high_key = torch.where((above == below) | (at_most > above), low_key, larger)
    low = key_to_float(low_key, dtype).reshape(1)
    high = key_to_float(high_key, dtype).reshape(1)
    tau = low.lerp_(high, weight.reshape(1)).reshape(())
    return torch.where((nans > 0) | (n == 0), torch.full_like(tau, float("nan")), tau)


def _key_bits(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def top_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, *, top_fraction: float = 0.2, process_group=None
) -> torch.Tensor:
    """Valid tokens whose entropy is at least the batch's (1 - top_fraction) quantile.

    Args:
        entropy: float tensor of any shape (float32 from the fused ops; float64, bfloat16, float16 too).
        mask: same shape; nonzero marks a valid token. Padding never enters the quantile.
        top_fraction: rho in (0, 1]; 1.0 keeps every valid token.
        process_group: a torch.distributed group; tau is then the quantile over the valid tokens of all
            its ranks (each rank passes its own tokens and gets its own part of the global mask).

    Returns a bool tensor of entropy's shape: valid & (entropy >= tau), with tau exactly
    torch.quantile(valid_entropies, 1 - top_fraction) (linear interpolation). Not differentiable.
    """
    check_float("entropy", entropy, FLOAT_DTYPES + (torch.float64,))
    valid = check_mask("mask", mask, entropy.shape)
    rho = check_fraction("top_fraction", top_fraction)
    check_same_device(entropy=entropy, mask=mask)
    entropy = entropy.detach()
    tau = entropy_quantile(entropy, valid, 1.0 - rho, process_group)
    return valid & (entropy.to(tau.dtype) >= tau)
