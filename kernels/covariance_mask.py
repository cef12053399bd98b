"""Clip-Cov and KL-Cov token selection (Cui et al. 2025, docs/algorithms.md section 3).

Cov_i = (lp_i - mean lp)(A_i - mean A), both means over the valid tokens of the whole batch: with a
process group the sums and counts are all-reduced, because per-micro-batch centring is a reported
source of instability. Statistics are taken in float64 and padding never enters them (masked with
`where`, so even a NaN in a padded slot changes nothing).

- clip_cov: k = max(1, int(ratio * N_valid)) tokens drawn uniformly at random among the candidates
  (valid, lower < Cov < upper, not marked by `exclude`); fewer when there are fewer candidates.
  Every token gets a random 63-bit key and the k largest keys over all ranks win (exact selection,
  kernels/_select.py), which is a uniform k-subset of the candidates. Keys come from a counter-based
  hash of the token's global position, seeded from rank 0's `generator`.
- kl_cov: the k tokens with the largest Cov over all ranks.

Reproducibility: the same inputs and generator state give the same mask, on any number of ranks:
both modes equal the single-process mask of the concatenated batch (ranks in order), given the same
generator state on rank 0. Every rank draws from its own generator, so all generators advance alike.
"""

from __future__ import annotations

import torch

from fusedrl.kernels._checks import FLOAT_DTYPES, check_float, check_fraction, check_same_device
from fusedrl.kernels._select import all_reduce, float_keys, random_keys, top_k_mask
from fusedrl.kernels.top_entropy_mask import check_mask

_MODES = ("clip_cov", "kl_cov")


def broadcast_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """advantages [B] (one per response) or of the full token shape, as a tensor of `shape`."""
    check_float("advantages", advantages, FLOAT_DTYPES + (torch.float64,))
    if advantages.dim() == 1 and len(shape) >= 1 and advantages.shape[0] == shape[0]:
        return advantages.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
    if tuple(advantages.shape) != tuple(shape):
        raise ValueError(
            f"advantages must have shape ({shape[0] if len(shape) else '?'},) or {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    return advantages


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, process_group=None) -> torch.Tensor:
    """Cov_i = (lp_i - mean lp)(A_i - mean A) in float64, means over the valid tokens of all ranks; 0 on padding."""
    check_float("logprobs", logprobs, FLOAT_DTYPES + (torch.float64,))
    valid = check_mask("mask", mask, logprobs.shape)
    adv = broadcast_advantages(advantages, logprobs.shape)
    check_same_device(logprobs=logprobs, advantages=advantages, mask=mask)
    lp = torch.where(valid, logprobs.detach().to(torch.float64), 0.0)
    a = torch.where(valid, adv.detach().to(torch.float64), 0.0)
    sums = all_reduce(torch.stack([lp.sum(), a.sum(), valid.sum().to(torch.float64)]), process_group)
    count = sums[2].clamp(min=1.0)
    cov = (lp - sums[0] / count) * (a - sums[1] / count)
    return torch.where(valid, cov, 0.0)


def covariance_mask(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    ratio: float,
    lower: float = 1.0,
    upper: float = 5.0,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    process_group=None,
) -> torch.Tensor:
    """Tokens selected by Clip-Cov (`mode="clip_cov"`) or KL-Cov (`mode="kl_cov"`).

    Args:
        logprobs: current log-probs of the sampled tokens, any shape [B, ...] (read detached).
        advantages: [B] (broadcast over the tokens of each response) or logprobs' shape.
        mask: logprobs' shape; nonzero marks a valid token.
        mode: "clip_cov" or "kl_cov".
        ratio: r in (0, 1]; k = max(1, int(r * N_valid)) with N_valid over all ranks.
        lower, upper: clip_cov's open interval for Cov (lower < upper).
        exclude: bool, logprobs' shape; tokens never drawn by clip_cov (those the PPO clip already clipped).
        generator: the source of clip_cov's random draw (default: torch's global generator for the
            tensors' device); on any device, a CPU generator draws the same mask as for CPU tensors.
        process_group: a torch.distributed group over which the batch is spread.

    Returns a bool tensor of logprobs' shape, at most k tokens set over all ranks. A NaN or inf
    log-prob or advantage at a valid position is refused (ValueError): its covariance would order
    arbitrarily. On a GPU that check is the one host sync.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    r = check_fraction("ratio", ratio)
    if mode == "clip_cov" and not float(lower) < float(upper):
        raise ValueError(f"lower must be below upper for clip_cov, got lower={lower!r}, upper={upper!r}")
    cov = token_covariance(logprobs, advantages, mask, process_group)  # checks the arguments first
    valid = check_mask("mask", mask, logprobs.shape)
    adv = broadcast_advantages(advantages, logprobs.shape)
    # Every rank learns of a bad value on any rank, so that all raise together rather than some waiting.
    flags = torch.stack([(valid & ~torch.isfinite(t)).any() for t in (logprobs.detach(), adv.detach())])
    for name, bad in zip(("logprobs", "advantages"), all_reduce(flags.to(torch.int64), process_group).tolist()):
        if bad:
            raise ValueError(f"{name} must be finite at valid positions (mask nonzero); found NaN or inf")
    n = all_reduce(valid.sum().to(torch.int64), process_group)
    # int(r * N) as Python computes it: the float64 product, truncated.
    k = (r * n.to(torch.float64)).floor().to(torch.int64).clamp(min=1)
    if mode == "kl_cov":
        return top_k_mask(float_keys(cov), valid, k, 64, process_group)
    candidates = valid & (cov > float(lower)) & (cov < float(upper))
    if exclude is not None:
        check_same_device(logprobs=logprobs, exclude=exclude)
        candidates = candidates & ~check_mask("exclude", exclude, logprobs.shape)
    keys = random_keys(logprobs.shape, generator, logprobs.device, process_group, needed=candidates)
    return top_k_mask(keys, candidates, k, 64, process_group)
