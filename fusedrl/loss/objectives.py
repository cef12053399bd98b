"""Importance weights and the policy-gradient terms beyond the PPO clip, per token.

FusedPolicyLoss (policy_loss.py) reads these; each function is a formula of a published method, with
TRL 1.16's GRPOTrainer as the reference implementation that tests/integrations/test_trl.py compares
against. Notation as in docs/algorithms.md: lp the current log-prob of the sampled token, olp the
rollout-time one, A the advantage, valid the response tokens.

Importance weight w of each token (`importance_sampling_level`):
    "token"           w_t = exp(lp_t - olp_t)                                    (PPO, GRPO)
    "sequence"        w_t = s_i = exp(mean over the valid tokens t' of response i of (lp_t' - olp_t'))
                      for every token of response i (GSPO, Zheng et al. 2025); the gradient
                      reaches each token through the mean
    "sequence_token"  w_t = sg(s_i) exp(lp_t - sg(lp_t)): s_i in value, the per-token gradient
                      s_i grad lp_t (GSPO-token, same paper), so that a token mask or a per-token
                      advantage acts on the tokens it names

Objectives other than the PPO clip, per valid token (sg = stop-gradient):
    cispo   -sg(min(w_t, w_max)) A_t lp_t                   (CISPO, MiniMax-M1; ScaleRL's eps_max)
    sapo    -A_t (4 / tau) sigmoid(tau (w_t - 1)),  tau = tau_pos if A_t > 0 else tau_neg   (SAPO)
    vespo   -sg(phi_i) A_t lp_t,  phi = exp(lam + k log W - lam W) = W^k e^(lam (1 - W)),
            log W_i = sum over response i of (lp - olp) (not a mean), clamped to [ln 1e-8, 20] after
            each token's log-ratio is clamped to [-20, 20]; (k, lam) = (k_pos, lambda_pos) if A >= 0 else
            (k_neg, lambda_neg)                               (VESPO: a Gamma-shaped weight, phi(1) = 1)

The off-policy sequence mask (DeepSeek-V3.2, eq. 9) drops the responses with A < 0 on which the current
policy has drifted too far from the sampling one: mean over the response of (sampling lp - lp) > delta.
"""

from __future__ import annotations

import math

import torch

# VESPO's clamps on log W, as its reference implementation (TRL's get_gamma_weights) sets them.
_VESPO_LOG_MIN, _VESPO_LOG_MAX = math.log(1e-8), 20.0


def log_importance_weights(log_ratio: torch.Tensor, valid: torch.Tensor, level: str) -> torch.Tensor:
    """[B, T] log w of each token from log_ratio = lp - olp (0 off `valid`), per `level`.

    The sequence levels give every column of a row the row's value, padding included: a response
    with no valid token has log w = 0.
    """
    if level == "token":
        return log_ratio
    per_response = log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    per_response = per_response.expand_as(log_ratio)
    if level == "sequence":
        return per_response
    return per_response.detach() + log_ratio - log_ratio.detach()


def cispo_terms(lp: torch.Tensor, weight: torch.Tensor, adv: torch.Tensor, max_weight: float) -> torch.Tensor:
    """CISPO: the truncated weight is a constant; the gradient is sg(min(w, w_max)) A grad lp, every token's."""
    return -torch.clamp(weight, max=max_weight).detach() * adv * lp


def sapo_terms(weight: torch.Tensor, adv: torch.Tensor, temperature_pos: float, temperature_neg: float) -> torch.Tensor:
    """SAPO's soft gate: d/dw of (4 / tau) sigmoid(tau (w - 1)) is 1 at w = 1 and decays smoothly off-policy."""
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    return -adv * torch.sigmoid(tau * (weight - 1.0)) * (4.0 / tau)


@torch.no_grad()
def vespo_weights(
    log_ratio: torch.Tensor,
    valid: torch.Tensor,
    adv: torch.Tensor,
    k: tuple[float, float],
    lam: tuple[float, float],
    rollout_is_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T] detached phi of each token's response; k and lam are (for A >= 0, for A < 0).

    rollout_is_weights [B, T] (the sampler-to-trainer correction) enter W through their logs, as
    VESPO's sequence weight covers the whole path from the sampling policy.
    """
    log_w = (log_ratio.clamp(-20.0, 20.0) * valid).sum(-1, keepdim=True)
    if rollout_is_weights is not None:
        # A masked-out weight (0) has log -inf: the clamp turns it into a vanishing phi, not a NaN.
        log_is = torch.log(rollout_is_weights).clamp(_VESPO_LOG_MIN, _VESPO_LOG_MAX)
        log_w = log_w + (log_is * valid).sum(-1, keepdim=True)
    log_w = log_w.clamp(_VESPO_LOG_MIN, _VESPO_LOG_MAX)
    nonnegative = adv >= 0
    k_t = torch.where(nonnegative, k[0], k[1])
    lam_t = torch.where(nonnegative, lam[0], lam[1])
    return torch.exp(lam_t + k_t * log_w - lam_t * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def off_policy_keep(lp, sampling_lp, valid, adv, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, [B, T] bool: False on the tokens with A < 0 of a response
    whose mean over its valid tokens of sampling_lp - lp (the current policy's, detached) exceeds
    `threshold`. A NaN sampling log-prob (a token the sampler could not score) counts as 0, so that one
    such token cannot drop its response."""
    divergence = torch.where(valid, (sampling_lp - lp).nan_to_num(nan=0.0), 0.0)
    mean = divergence.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return (adv >= 0) | (mean <= threshold)


def check_rollout_weights(weights, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rollout_is_weights [B] or [B, T] as a detached [B, T] of the loss's dtype."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError(f"rollout_is_weights must be a float tensor, got {type(weights).__name__}")
    if weights.dim() == 1 and weights.shape[0] == shape[0]:
        weights = weights[:, None].expand(shape)
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(
            f"rollout_is_weights must have shape ({shape[0]},) or {tuple(shape)}, got {tuple(weights.shape)}"
        )
    return weights.detach().to(dtype)


def clip_metrics(ratio, adv, valid, epsilon_low: float, epsilon_high: float, per_response: bool) -> dict:
    """The shares of tokens (per_response: of responses) that the PPO clip holds below (A < 0) and above
    (A > 0), and the least low-clipped and most high-clipped response's share."""
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    return {
        "clip_ratio/low_mean": share(low, valid, per_response),
        "clip_ratio/high_mean": share(high, valid, per_response),
        "clip_ratio/region_mean": share(low | high, valid, per_response),
        "clip_ratio/low_min": nan_extreme(response_shares(low, valid, per_response), largest=False),
        "clip_ratio/high_max": nan_extreme(response_shares(high, valid, per_response), largest=True),
    }


def share(flag: torch.Tensor, valid: torch.Tensor, per_response: bool) -> torch.Tensor:
    """The share of flagged tokens among the valid ones, or (per_response: the flag is constant along
    each row) of flagged responses among all rows."""
    if per_response:
        return row_mean(flag.any(-1).float())
    return (flag & valid).sum() / valid.sum().clamp(min=1)


def row_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over responses [B]; 0 for an empty batch (0 rows), where .mean() gives NaN."""
    return values.mean() if values.shape[0] else values.sum()


def response_shares(flag: torch.Tensor, valid: torch.Tensor, per_response: bool) -> torch.Tensor:
    """[B] each response's share of flagged valid tokens, NaN for a response with none; per_response:
    the row's flag as 0 or 1 (an empty row's weight is 1, so it is never flagged by a clip)."""
    if per_response:
        return flag.any(-1).float()
    count = valid.sum(-1)
    return torch.where(count > 0, (flag & valid).sum(-1) / count.clamp(min=1), torch.nan)


def nan_extreme(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """max (largest) or min of the non-NaN entries as a 0-dim tensor, NaN when there are none; no host sync."""
    fill = -torch.inf if largest else torch.inf
    # One fill entry more: amax / amin of an empty batch (0 rows) would raise.
    filled = torch.cat([torch.where(values.isnan(), fill, values).reshape(-1), values.new_full((1,), fill)])
    extreme = filled.amax() if largest else filled.amin()
    return torch.where(values.isnan().all(), torch.nan, extreme)
