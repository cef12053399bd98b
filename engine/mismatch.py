"""The sampler-to-trainer mismatch: measured every step, corrected in the loss (docs/vllm.md).

A fast sampler (vLLM) runs other kernels, at times another precision, than the trainer, so the policy
that sampled a response is not exactly the one the trainer scores: per token, the ratio
r = pi_train / pi_sampler = exp(lp_train - lp_sampler) is not 1. Left alone, the update is silently
off-policy, and the gap grows with sequence length and lower precision until training collapses
(Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; Liu et al.
2025, "When Speed Kills Stability").

Measured over the response tokens: mean |lp_train - lp_sampler|, the KL(sampler || trainer) estimate
k3 = E_sampler[r - 1 - log r] (non-negative, low variance: Schulman 2020, "Approximating KL
divergence"), and the share of tokens whose r lies outside [0.5, 2]; tokens the sampler drew outside the
trainer's top-k / top-p kept set (trainer lp -inf) leave the loss and are counted apart.

Corrected (rollout.correction) by
- tis: truncated importance sampling, each token's policy-gradient term weighted by min(r, C)
  (Yao et al. 2025, C = 2 in their runs; verl's default rollout_is_threshold is 2 as well) - the default;
- token_mask: tokens with r outside [1/C, C] leave the loss (Liu et al. 2025's masked IS, per token);
- sequence_mask: responses whose geometric-mean ratio exp(mean_t log r) lies outside [1/C, C] leave
  the loss whole (the per-sequence variant; the geometric mean keeps C meaningful at any length);
- none: measured only.
Masked tokens leave the loss mask, so they count in no token total (verl's rejection sampling does the
same); the weights enter FusedPolicyLoss as `rollout_is_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "tis", "token_mask", "sequence_mask")
# The band outside which a token's ratio counts in mismatch/ratio_outside: a factor of 2 either way.
_RATIO_BAND = (0.5, 2.0)


@dataclass
class Correction:
    """What the update applies: weights for the loss (or None) and the tokens kept in it."""

    weights: torch.Tensor | None  # [B, T] rollout_is_weights, tis only
    keep: torch.Tensor  # [B, T] bool, False where a mask correction drops the token
    metrics: dict[str, float]


@torch.no_grad()
def correct(train_lp: torch.Tensor, sampler_lp: torch.Tensor, mask: torch.Tensor, mode: str,
            cap: float) -> Correction:
    """The mismatch metrics and the correction of `mode` (one of CORRECTIONS) with bound `cap` = C > 1.

    train_lp, sampler_lp [B, T]: the trainer's rollout-time and the sampler's log-probs of the sampled
    tokens; mask [B, T]: the response tokens that get loss.
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"mode must be one of {', '.join(CORRECTIONS)}; got {mode!r}")
    if not cap > 1:
        raise ValueError(f"cap must be > 1; got {cap}")
    if train_lp.shape != sampler_lp.shape or train_lp.shape != mask.shape:
        raise ValueError(f"train_lp, sampler_lp and mask must share one shape; got {tuple(train_lp.shape)}, "
                         f"{tuple(sampler_lp.shape)}, {tuple(mask.shape)}")
    # A token the sampler drew outside the trainer's kept set (train lp -inf: the sets differ at a tie
    # on the top-p boundary, or within rounding of top_p; docs/vllm.md) has ratio 0 and an infinite
    # KL: it leaves the loss, and is counted rather than measured.
    outside = mask.bool() & (train_lp == -torch.inf)
    valid = mask.bool() & ~outside
    # Padding is zeroed first: its log-probs may be anything, and exp of a large difference is inf.
    log_r = torch.where(valid, train_lp.double() - sampler_lp.double(), 0.0)
    r = log_r.exp()
    count = valid.sum().clamp(min=1)
    low, high = _RATIO_BAND
    metrics = {"mismatch/abs_lp_diff": log_r.abs().sum() / count,
               "mismatch/kl": torch.where(valid, r - 1 - log_r, 0.0).sum() / count,
               "mismatch/ratio_outside": ((valid & ((r < low) | (r > high))).sum() / count),
               "mismatch/outside_kept_set": outside.sum() / mask.bool().sum().clamp(min=1)}
    weights, keep = None, valid
    if mode == "tis":
        weights = torch.where(valid, r.clamp(max=cap), 0.0).float()
        metrics["mismatch/is_weight_mean"] = weights.double().sum() / count
    elif mode == "token_mask":
        keep = valid & (log_r.abs() <= math.log(cap))
    elif mode == "sequence_mask":
        mean_log_r = log_r.sum(1) / valid.sum(1).clamp(min=1)
        keep = valid & (mean_log_r.abs() <= math.log(cap))[:, None]
    if mode in ("token_mask", "sequence_mask"):
        metrics["mismatch/masked"] = (valid & ~keep).sum() / count
    return Correction(weights, keep, {k: float(v) for k, v in metrics.items()})
