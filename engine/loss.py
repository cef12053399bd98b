"""The fused policy loss: PPO / GRPO / DAPO with entropy-aware token selection (docs/algorithms.md 2 to 5).

One module for every policy-gradient loss of the engine. The per-token log-prob lp and entropy H come
from one fused pass over the vocabulary, from logits or straight from hidden states and the output
embedding (so no [B, T, V] tensor need exist); the token masks read detached copies of them.

Per valid token t, with the importance weight ratio = exp(lp - olp) (or GSPO's sequence-level
weight, `importance_sampling_level`; engine/objectives.py):
    pg_t   = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))        (PPO clip)
    pg_t   = min(pg_t, -A c)  where A < 0                                     (dual clip, optional)
    pg_t   = -A ratio + kl_cov_coef |lp - olp| [t in KL-Cov]                 (cov_mode="kl_cov": no clip)
    pg_t   = CISPO's, SAPO's or VESPO's term instead (loss_type cispo, sapo, vespo; engine/objectives.py)
    loss_t = M_t w_t pg_t + beta KL_t - entropy_coef H_t
    (with kl_importance_weighted, beta ratio KL_t: TRL's use_bias_correction_kl, DeepSeek-V3.2)
where M_t is the product of the selection masks (top-rho entropy, SPO probability, not drawn by
Clip-Cov, the off-policy sequence mask) and w_t the rollout importance weight given at call time (1
without). The policy-gradient part is aggregated over the valid tokens (`normalize_by="valid"`, TRL)
or over the selected ones (`"selected"`, the 80/20 paper's v2 and SPO); the KL and entropy parts apply
to every valid token and are always aggregated over the valid ones. `loss_type` picks the aggregation:
grpo (mean over responses of each response's token mean), bnpo (local token mean), dr_grpo (token
sum / (B * max_completion_length)), dapo (token sum / num_items_in_batch, the global count of valid
tokens over micro-batches and ranks, else the local count) or luspo (token sum / B: each response's
mean weighted by its length, LUSPO); cispo and vespo aggregate as dapo, sapo as grpo (TRL's
pairings). With "selected", dapo divides the policy-gradient sum by the selected tokens of the whole
batch on every rank, bnpo by those of the local batch, grpo each response's sum by its own selected
tokens.

The batch-wide statistics (the top-entropy threshold, the covariance's centring and its top-k or
random draw, and with "selected" the count of selected tokens) belong to the whole training batch. A
call computes them over its own tokens; when a batch is split into micro-batches for gradient
accumulation, `select` computes them once over the whole batch from detached lp and H, and each
micro-batch call takes its rows (`selection=`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from fusedrl import kernels
from fusedrl.engine import objectives
from fusedrl.kernels import covariance_mask, probability_mask, top_entropy_mask
from fusedrl.kernels._checks import check_fraction, check_same_device, check_temperature
from fusedrl.kernels._select import all_reduce
from fusedrl.kernels.covariance_mask import broadcast_advantages, token_covariance
from fusedrl.kernels.top_entropy_mask import check_mask

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# The loss types built on the PPO clip; the others replace it with their own term (engine/objectives.py).
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# How each loss type reduces its per-token terms (`_aggregate`).
AGGREGATION = {**{name: name for name in CLIP_LOSS_TYPES}, "cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}
KL_ESTIMATORS = ("k1", "k2", "k3")
COV_MODES = (None, "clip_cov", "kl_cov")
NORMALIZERS = ("valid", "selected")


def _number(name: str, value, *, low: float | None = None, low_open: bool = False) -> float:
    """A finite float, at least (or above, with low_open) `low`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low))):
        bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def _choice(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


# Metrics that are extremes, not means: how two micro-batches' values combine (NaN = none; fmin and
# fmax skip it).
EXTREME_METRICS = {"clip_ratio/low_min": torch.fmin, "clip_ratio/high_max": torch.fmax, "cov/max": torch.fmax}


def metrics_to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors (the loss's metrics, or sums of them) as Python floats, with one device-to-host copy."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


@dataclass(frozen=True)
class Selection:
    """The batch-wide token masks of a whole batch, made by FusedPolicyLoss.select.

    high_entropy: [B, T] bool, the top-entropy tokens (None when top_entropy_fraction is 1).
    covariance: [B, T] bool, the tokens Clip-Cov drops or KL-Cov penalises (None without cov_mode).
    cov: [B, T] float64, each token's covariance centred over the batch, 0 on padding (None without
        cov_mode); the loss reports its mean and max.
    probability: [B, T] bool, SPO's probability mask (None without prob_mask_threshold).
    valid_count, selected_count: 0-dim int64, the batch's valid tokens and the tokens every mask keeps,
        on this rank; global_selected_count: selected_count summed over the process group. Made only
        when the loss divides by them (normalize_by "selected" with dapo or bnpo), else None.
    """

    high_entropy: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    probability: torch.Tensor | None = None
    valid_count: torch.Tensor | None = None
    selected_count: torch.Tensor | None = None
    global_selected_count: torch.Tensor | None = None

    def rows(self, index, length: int | None = None) -> Selection:
        """The selection of rows `index` (anything that indexes dim 0), cut to the first `length` columns
        (a micro-batch whose trailing all-padding columns were trimmed); the counts stay the batch's."""
        def cut(t):
            return None if t is None else t[index][:, :length]
        return replace(self, high_entropy=cut(self.high_entropy), covariance=cut(self.covariance), cov=cut(self.cov),
                       probability=cut(self.probability))


class FusedPolicyLoss(nn.Module):
    """Policy-gradient loss on fused per-token log-probs and entropies.

    Constructor arguments (all validated here; a bad one raises ValueError naming it):
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "luspo" (the PPO clip, aggregated as named)
            or "cispo" | "sapo" | "vespo" (their own terms); see the module docstring.
        epsilon_low, epsilon_high: the PPO clip range [1 - epsilon_low, 1 + epsilon_high] (the clip loss
            types; cispo, sapo and vespo have no PPO clip and ignore them).
        dual_clip: c > 1 bounds the loss of tokens with A < 0 by -A c; None disables it. (TRL's `delta`,
            INTELLECT-2's two-sided clip, is this c when delta > 1 + epsilon_high.)
        beta: weight of the KL to the reference policy (needs ref_logprobs at call time when > 0).
        kl_estimator: "k1" (lp - rlp), "k2" ((lp - rlp)^2 / 2) or "k3" (exp(rlp - lp) - (rlp - lp) - 1).
        entropy_coef: weight of the entropy bonus -entropy_coef * H (with gradient).
        top_entropy_fraction: rho in (0, 1]; below 1 only the top-rho entropy tokens of the batch keep
            their policy-gradient term.
        prob_mask_threshold: SPO's rho in (0, 1]; only tokens with exp(old_lp) below it keep their term.
        cov_mode: None, "clip_cov" or "kl_cov" (Cui et al. 2025).
        cov_ratio, cov_lower, cov_upper: k = max(1, int(cov_ratio * N_valid)); Clip-Cov's Cov interval.
        kl_cov_coef: KL-Cov's weight on |lp - old_lp| of its selected tokens.
        normalize_by: "valid" or "selected": the token count the policy-gradient part is divided by
            (with "selected": dapo the whole batch's on every rank, bnpo the local batch's, grpo each
            response's own).
        max_completion_length: dr_grpo's constant denominator B * max_completion_length.
        temperature: sampling temperature the logits are divided by.
    Keyword-only extras:
        process_group: a torch.distributed group for batch statistics (entropy quantile, covariance
            means, top-k), so that every rank selects from the global batch.
        generator: the random source of Clip-Cov's draw (seeded, runs reproduce).
        backend: passed to the fused ops ("auto", "triton" or "torch").
        ignore_index: the id the fused ops skip; padded positions are set to it before the pass.
        importance_sampling_level: "token" (exp(lp - olp) per token), "sequence" (GSPO: the exponent
            averaged over each response's valid tokens, for all of them; the gradient reaches every
            token through the mean) or "sequence_token" (GSPO-token: the sequence weight in value, each
            token's own gradient, so that token masks restrict it). See engine/objectives.py. The clip,
            CISPO's truncation, SAPO's gate and the bias-corrected KL then read the sequence weight;
            top-entropy and probability masks still pick tokens (with "sequence" a masked token's
            share of the response's term goes, but its gradient through the other tokens' terms
            stays). Not with cov_mode (Clip-Cov and KL-Cov act on single tokens' ratios) or vespo
            (which weighs whole responses itself).
        cispo_max_weight: CISPO's cap on the importance weight, min(ratio, cap) (ScaleRL's eps_max,
            TRL's epsilon_high under loss_type="cispo"; 5.0 as ScaleRL recommends).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for A > 0 and A <= 0
            (1.0 and 1.05, the paper's and TRL's defaults).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma weight
            W^k exp(lambda (1 - W)) for A >= 0 and A < 0 (2, 3, 3, 2: the paper's and TRL's defaults).
        off_policy_mask_threshold: delta >= 0 of DeepSeek-V3.2's off-policy sequence mask: a response
            with A < 0 whose mean of (sampling lp - lp) exceeds delta loses its policy-gradient terms
            (sampling lp: the call's sampling_logprobs, else old_logprobs); None disables it.
        kl_importance_weighted: multiply each token's KL estimate by its importance ratio
            exp(lp - old_lp), gradient included (so it changes the KL gradient even on-policy, where
            the ratio is 1), as TRL's `use_bias_correction_kl` (DeepSeek-V3.2): with k3 the gradient
            becomes an unbiased estimate of the reverse KL's when the samples come from the old policy.
            The "kl" metric then reports the weighted estimate, as TRL logs it.
    """

    def __init__(
        self,
        loss_type: str = "dapo",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        dual_clip: float | None = None,
        beta: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        top_entropy_fraction: float = 1.0,
        prob_mask_threshold: float | None = None,
        cov_mode: str | None = None,
        cov_ratio: float = 2e-4,
        cov_lower: float = 1.0,
        cov_upper: float = 5.0,
        kl_cov_coef: float = 1.0,
        normalize_by: str = "valid",
        max_completion_length: int | None = None,
        temperature: float = 1.0,
        *,
        process_group=None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        ignore_index: int = -100,
        kl_importance_weighted: bool = False,
        importance_sampling_level: str = "token",
        cispo_max_weight: float = 5.0,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        off_policy_mask_threshold: float | None = None,
    ):
        super().__init__()
        _choice("loss_type", loss_type, LOSS_TYPES)
        _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _choice("cov_mode", cov_mode, COV_MODES)
        _choice("normalize_by", normalize_by, NORMALIZERS)
        self.loss_type = loss_type
        self.epsilon_low = _number("epsilon_low", epsilon_low, low=0.0)
        if self.epsilon_low >= 1.0:
            raise ValueError(f"epsilon_low must be in [0, 1) (the clip's lower bound is 1 - epsilon_low), got {epsilon_low!r}")
        self.epsilon_high = _number("epsilon_high", epsilon_high, low=0.0)
        self.dual_clip = None if dual_clip is None else _number("dual_clip", dual_clip, low=1.0, low_open=True)
        self.beta = _number("beta", beta, low=0.0)
        self.kl_estimator = kl_estimator
        self.entropy_coef = _number("entropy_coef", entropy_coef)
        self.top_entropy_fraction = check_fraction("top_entropy_fraction", top_entropy_fraction)
        self.prob_mask_threshold = (
            None if prob_mask_threshold is None else check_fraction("prob_mask_threshold", prob_mask_threshold)
        )
        self.cov_mode = cov_mode
        self.cov_ratio = check_fraction("cov_ratio", cov_ratio)
        self.cov_lower = _number("cov_lower", cov_lower)
        self.cov_upper = _number("cov_upper", cov_upper)
        if cov_mode == "clip_cov" and not self.cov_lower < self.cov_upper:
            raise ValueError(f"cov_lower must be below cov_upper, got {cov_lower!r} and {cov_upper!r}")
        self.kl_cov_coef = _number("kl_cov_coef", kl_cov_coef, low=0.0)
        if cov_mode == "kl_cov" and dual_clip is not None:
            raise ValueError("dual_clip must be None with cov_mode='kl_cov': KL-Cov drops the PPO clip")
        self.normalize_by = normalize_by
        self._check_objective(loss_type, dual_clip, cov_mode, normalize_by, importance_sampling_level)
        self.importance_sampling_level = importance_sampling_level
        self.aggregation = AGGREGATION[loss_type]
        self.off_policy_mask_threshold = (
            None if off_policy_mask_threshold is None
            else _number("off_policy_mask_threshold", off_policy_mask_threshold, low=0.0)
        )
        if self.off_policy_mask_threshold is not None and self._counts_selected:
            raise ValueError(
                "off_policy_mask_threshold needs normalize_by='valid' (or loss_type grpo / sapo) with "
                f"loss_type={loss_type!r}: its selected-token count is a batch statistic, and the off-policy "
                "mask reads each call's current log-probs"
            )
        self.cispo_max_weight = _number("cispo_max_weight", cispo_max_weight, low=0.0, low_open=True)
        self.sapo_temperatures = (
            _number("sapo_temperature_pos", sapo_temperature_pos, low=0.0, low_open=True),
            _number("sapo_temperature_neg", sapo_temperature_neg, low=0.0, low_open=True),
        )
        self.vespo_k = (_number("vespo_k_pos", vespo_k_pos, low=0.0), _number("vespo_k_neg", vespo_k_neg, low=0.0))
        self.vespo_lambda = (
            _number("vespo_lambda_pos", vespo_lambda_pos, low=0.0, low_open=True),
            _number("vespo_lambda_neg", vespo_lambda_neg, low=0.0, low_open=True),
        )
        if loss_type == "dr_grpo":
            if not isinstance(max_completion_length, int) or max_completion_length < 1:
                raise ValueError(
                    f"max_completion_length must be a positive int for loss_type='dr_grpo', got {max_completion_length!r}"
                )
            if normalize_by == "selected":
                raise ValueError("normalize_by must be 'valid' for loss_type='dr_grpo', whose denominator is a constant")
        self.max_completion_length = None if max_completion_length is None else int(max_completion_length)
        self.temperature = check_temperature(temperature)
        _choice("backend", backend, ("auto", "triton", "torch"))
        self.process_group = process_group
        self.generator = generator
        self.backend = backend
        self.ignore_index = int(ignore_index)
        if not isinstance(kl_importance_weighted, bool):
            raise ValueError(f"kl_importance_weighted must be a bool, got {kl_importance_weighted!r}")
        self.kl_importance_weighted = kl_importance_weighted

    @staticmethod
    def _check_objective(loss_type, dual_clip, cov_mode, normalize_by, level) -> None:
        """The combinations of loss type, importance-sampling level and masks that have a meaning."""
        _choice("importance_sampling_level", level, objectives.IMPORTANCE_SAMPLING_LEVELS)
        if loss_type not in CLIP_LOSS_TYPES:
            for name, value in (("dual_clip", dual_clip), ("cov_mode", cov_mode)):
                if value is not None:
                    raise ValueError(f"{name} must be None with loss_type={loss_type!r}, which has no PPO clip to build on")
        if cov_mode is not None and level != "token":
            raise ValueError(
                "importance_sampling_level must be 'token' with cov_mode: Clip-Cov and KL-Cov act on single tokens' ratios"
            )
        if loss_type == "vespo" and level != "token":
            raise ValueError(
                "importance_sampling_level must be 'token' with loss_type='vespo', which weighs whole responses itself"
            )
        if loss_type == "luspo" and normalize_by == "selected":
            raise ValueError("normalize_by must be 'valid' for loss_type='luspo', whose denominator is the number of responses")

    def forward(
        self,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        advantages: torch.Tensor,
        *,
        logits: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        selection: Selection | None = None,
        rollout_is_weights: torch.Tensor | None = None,
        sampling_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and a dict of detached 0-dim metric tensors (see metrics_to_floats).

        completion_ids [B, T] (the sampled tokens), completion_mask [B, T] (nonzero = valid),
        advantages [B] or [B, T]; then either logits [B, T, V] or hidden [B, T, H] with weight [V, H]
        (and bias [V]). old_logprobs / ref_logprobs [B, T]; old_logprobs=None means on-policy.
        selection: these rows of a Selection that `select` made over the whole batch
        (`Selection.rows`); without it the batch-wide masks come from this call's tokens alone.
        rollout_is_weights [B] or [B, T]: constant weights of each token's policy-gradient term, the
        correction from the sampling engine's policy to the trainer's (TRL's vLLM
        importance_sampling_ratio, verl's rollout_is_weights); vespo folds them into its weight instead.
        sampling_logprobs [B, T]: the sampling engine's log-probs, for off_policy_mask_threshold
        (default: old_logprobs); NaN where the sampler gave none.
        Gradients flow to logits, or to hidden, weight and bias.

        Metrics: entropy/mean, loss/pg, mask/*, kl (with ref_logprobs), and the loss type's clip
        statistics: clip_ratio/low_mean, high_mean, region_mean (shares of valid tokens; of responses
        when the weight is per response, a sequence level with advantages [B]) and clip_ratio/low_min,
        high_max (the least and most clipped response's share, NaN without one) for the PPO clip;
        clip_ratio/cispo_mean (weight above the cap with A > 0) for cispo; vespo/phi_mean for vespo.
        """
        if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be a [B, T] tensor, got {getattr(completion_ids, 'shape', completion_ids)!r}")
        shape = completion_ids.shape
        valid = check_mask("completion_mask", completion_mask, shape)
        adv = broadcast_advantages(advantages, shape).detach().float()
        if sampling_logprobs is not None and self.off_policy_mask_threshold is None:
            raise ValueError("sampling_logprobs is read only with off_policy_mask_threshold set")
        for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("sampling_logprobs", sampling_logprobs)):
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if selection is not None:
            self._check_selection(selection, shape)
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError("ref_logprobs must be given when beta > 0")
        if rollout_is_weights is not None:
            rollout_is_weights = objectives.check_rollout_weights(rollout_is_weights, shape)
        check_same_device(completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages,
                          logits=logits, hidden=hidden, weight=weight, bias=bias, old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights,
                          sampling_logprobs=sampling_logprobs)

        lp, entropy = self._logprobs_entropy(completion_ids, valid, logits, hidden, weight, bias)
        lp = torch.where(valid, lp, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
        olp = lp.detach() if old_logprobs is None else torch.where(valid, old_logprobs.detach().float(), 0.0)

        log_ratio = lp - olp
        ratio = torch.exp(objectives.log_importance_weights(log_ratio, valid, self.importance_sampling_level))
        unclipped, clipped = self._ppo_terms(adv, ratio)
        batch_counts = selection is not None
        if selection is None:
            selection = self._select(lp.detach(), entropy.detach(), adv, valid, clipped > unclipped, olp)
        metrics: dict[str, torch.Tensor] = {}
        n_valid = valid.sum().clamp(min=1)
        # With one weight per response and one advantage per response, every token of a response shares
        # its clip decision: the clip statistics then count responses (as TRL logs them).
        per_response = self.importance_sampling_level != "token" and advantages.dim() == 1

        def frac(mask: torch.Tensor) -> torch.Tensor:
            return (mask & valid).sum() / n_valid

        if self.loss_type == "cispo":
            pg = objectives.cispo_terms(lp, ratio, adv, self.cispo_max_weight)
            capped = (ratio > self.cispo_max_weight) & (adv > 0)
            metrics["clip_ratio/cispo_mean"] = objectives.share(capped, valid, per_response)
        elif self.loss_type == "sapo":
            pg = objectives.sapo_terms(ratio, adv, *self.sapo_temperatures)
        elif self.loss_type == "vespo":
            phi = objectives.vespo_weights(log_ratio, valid, adv, self.vespo_k, self.vespo_lambda, rollout_is_weights)
            pg = -phi * adv * lp
            metrics["vespo/phi_mean"] = phi[:, 0].mean() if advantages.dim() == 1 else (phi * valid).sum() / n_valid
        elif self.cov_mode == "kl_cov":
            pg = unclipped + self.kl_cov_coef * log_ratio.abs() * selection.covariance
        else:
            pg = torch.maximum(unclipped, clipped)
            if self.dual_clip is not None:
                dual = -adv * self.dual_clip
                metrics["clip_ratio/dual_mean"] = frac((adv < 0) & (dual < pg))
                pg = torch.where(adv < 0, torch.minimum(pg, dual), pg)
        if rollout_is_weights is not None and self.loss_type != "vespo":
            pg = pg * rollout_is_weights
        keep = self._kept(valid, selection)
        if self.cov_mode is not None:
            metrics["mask/cov"] = frac(selection.covariance)
        if self.top_entropy_fraction < 1.0:
            metrics["mask/top_entropy"] = frac(selection.high_entropy)
        if self.prob_mask_threshold is not None:
            metrics["mask/probability"] = frac(selection.probability)
        if self.off_policy_mask_threshold is not None:
            # Per call, from this call's current log-probs: refused where a batch-wide selected count
            # would need it (see __init__).
            sampled = olp if sampling_logprobs is None else sampling_logprobs.detach().float()
            near = objectives.off_policy_keep(lp.detach(), sampled, valid, adv, self.off_policy_mask_threshold)
            keep = keep & near
            metrics["mask/off_policy"] = frac(near)

        pg_loss = self._aggregate_pg(torch.where(keep, pg, 0.0), keep, valid, selection, batch_counts,
                                     num_items_in_batch)
        loss = pg_loss
        if ref_logprobs is not None:
            kl = self._kl(lp, torch.where(valid, ref_logprobs.detach().float(), 0.0))
            if self.kl_importance_weighted:
                kl = ratio * kl  # the ratio keeps its gradient: this is the point of the correction
            metrics["kl"] = (kl.detach() * valid).sum() / n_valid
        if self.beta > 0:
            kl_loss = self._aggregate(self.beta * torch.where(valid, kl, 0.0), valid, num_items_in_batch)
            loss = loss + kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if self.entropy_coef != 0:
            entropy_loss = self._aggregate(-self.entropy_coef * entropy, valid, num_items_in_batch)
            loss = loss + entropy_loss
            metrics["loss/entropy"] = entropy_loss.detach()

        metrics["loss/pg"] = pg_loss.detach()
        metrics["entropy/mean"] = entropy.detach().sum() / n_valid
        if self.loss_type in CLIP_LOSS_TYPES:
            metrics.update(objectives.clip_metrics(ratio, adv, valid, self.epsilon_low, self.epsilon_high, per_response))
        metrics["mask/selected"] = frac(keep)
        if self.cov_mode is not None:
            cov = torch.where(valid, selection.cov, 0.0)
            metrics["cov/mean"] = (cov.sum() / n_valid).float()
            metrics["cov/max"] = torch.where(valid, cov, -torch.inf).max().float()
        return loss, {k: v.detach().float() for k, v in metrics.items()}

    @torch.no_grad()
    def select(
        self,
        completion_mask: torch.Tensor,
        advantages: torch.Tensor,
        *,
        entropy: torch.Tensor,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor | None = None,
    ) -> Selection:
        """The batch-wide masks of a whole batch, for loss calls on its micro-batches.

        completion_mask [B, T] marks the batch's valid tokens; advantages [B] or [B, T]; entropy and
        logprobs [B, T] are the current policy's H and lp of the sampled tokens (detached; e.g. from a
        no-grad pass of fusedrl.kernels.linear_logprobs_and_entropy with this loss's temperature);
        old_logprobs [B, T] as the loss takes them (None: on-policy). With process_group the
        statistics span every rank, as in the loss. Pass `selection.rows(index)` to the call on rows
        `index`: as long as the policy has not changed in between, the micro-batches' losses then add
        up to the loss of one call on the whole batch.
        """
        if not isinstance(completion_mask, torch.Tensor) or completion_mask.dim() != 2:
            raise ValueError(f"completion_mask must be a [B, T] tensor, got {getattr(completion_mask, 'shape', completion_mask)!r}")
        shape = completion_mask.shape
        valid = check_mask("completion_mask", completion_mask, shape)
        adv = broadcast_advantages(advantages, shape).detach().float()
        for name, t in (("entropy", entropy), ("logprobs", logprobs), ("old_logprobs", old_logprobs)):
            if name == "old_logprobs" and t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {getattr(t, 'shape', t)!r}")
        check_same_device(completion_mask=completion_mask, advantages=advantages, entropy=entropy, logprobs=logprobs,
                          old_logprobs=old_logprobs)
        lp = torch.where(valid, logprobs.float(), 0.0)
        olp = lp if old_logprobs is None else torch.where(valid, old_logprobs.float(), 0.0)
        unclipped, clipped = self._ppo_terms(adv, torch.exp(lp - olp))
        return self._select(lp, torch.where(valid, entropy.float(), 0.0), adv, valid, clipped > unclipped, olp)

    @property
    def batch_wide(self) -> bool:
        """Whether a call reads statistics of the whole batch, so that micro-batched calls need one
        `select` over the whole batch: the top-entropy threshold, Clip-Cov / KL-Cov, or the selected
        tokens' count of dapo and bnpo with normalize_by="selected"."""
        return self.top_entropy_fraction < 1.0 or self.cov_mode is not None or self._counts_selected

    @property
    def _counts_selected(self) -> bool:
        """dapo and bnpo over the selected tokens divide by a count of the whole (global / local) batch."""
        return self.normalize_by == "selected" and self.aggregation in ("dapo", "bnpo")

    def _select(self, lp, entropy, adv, valid, clipped, olp) -> Selection:
        """The masks from detached lp, H and old lp; `clipped` marks the tokens the PPO clip already clipped."""
        high_entropy = covariance = cov = probability = None
        if self.top_entropy_fraction < 1.0:
            high_entropy = top_entropy_mask(entropy, valid, top_fraction=self.top_entropy_fraction,
                                            process_group=self.process_group)
        if self.cov_mode is not None:
            cov = token_covariance(lp, adv, valid, self.process_group)
            covariance = covariance_mask(
                lp, adv, valid, mode=self.cov_mode, ratio=self.cov_ratio, lower=self.cov_lower, upper=self.cov_upper,
                exclude=clipped if self.cov_mode == "clip_cov" else None, generator=self.generator,
                process_group=self.process_group,
            )
        if self.prob_mask_threshold is not None:
            probability = probability_mask(olp, valid, threshold=self.prob_mask_threshold)
        selection = Selection(high_entropy=high_entropy, covariance=covariance, cov=cov, probability=probability)
        if not self._counts_selected:
            return selection
        selected = self._kept(valid, selection).sum()
        return replace(selection, valid_count=valid.sum(), selected_count=selected,
                       global_selected_count=all_reduce(selected.clone(), self.process_group))

    def _kept(self, valid: torch.Tensor, selection: Selection) -> torch.Tensor:
        """The valid tokens whose policy-gradient term every active mask keeps (M_t)."""
        keep = valid
        if self.cov_mode == "clip_cov":
            keep = keep & ~selection.covariance
        if self.top_entropy_fraction < 1.0:
            keep = keep & selection.high_entropy
        if self.prob_mask_threshold is not None:
            keep = keep & selection.probability
        return keep

    def _check_selection(self, selection, shape) -> None:
        """A Selection fits this loss's options and this call's [B, T]."""
        if not isinstance(selection, Selection):
            raise ValueError(f"selection must be a Selection (from FusedPolicyLoss.select), got {type(selection).__name__}")
        counts = self._counts_selected
        needed = {"high_entropy": self.top_entropy_fraction < 1.0, "covariance": self.cov_mode is not None,
                  "cov": self.cov_mode is not None, "probability": self.prob_mask_threshold is not None,
                  "valid_count": counts, "selected_count": counts, "global_selected_count": counts}
        for name, need in needed.items():
            t = getattr(selection, name)
            if need != (t is not None):
                raise ValueError(
                    f"selection.{name} must be {'given' if need else 'None'} for this loss's options "
                    "(top_entropy_fraction, cov_mode, prob_mask_threshold, normalize_by, loss_type): make the "
                    "selection with this loss's select()"
                )
            if t is not None and name.endswith("count"):
                continue
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"selection.{name} must have shape {tuple(shape)} (this call's rows), got {tuple(t.shape)}")

    def _ppo_terms(self, adv: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-A ratio and -A clip(ratio, 1 - eps_low, 1 + eps_high): the PPO clip's two sides."""
        return -adv * ratio, -adv * torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)

    def _logprobs_entropy(self, ids, valid, logits, hidden, weight, bias):
        """lp and H of the sampled tokens, [B, T] float32 each, from the one fused pass."""
        if (logits is None) == (hidden is None):
            raise ValueError("exactly one of logits or hidden must be given")
        # Padded positions may hold any id (even out of the vocabulary); the ops skip ignore_index.
        targets = ids.masked_fill(~valid, self.ignore_index)
        options = dict(temperature=self.temperature, ignore_index=self.ignore_index, backend=self.backend)
        if logits is not None:
            if weight is not None or bias is not None:
                raise ValueError("weight and bias belong to the hidden path; pass them with hidden, not logits")
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise ValueError(f"logits must have shape [B, T, V] with [B, T] = {tuple(ids.shape)}, got {tuple(logits.shape)}")
            return kernels.logprobs_and_entropy(logits, targets, **options)
        if weight is None:
            raise ValueError("weight (the output embedding [V, H]) must be given with hidden")
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"hidden must have shape [B, T, H] with [B, T] = {tuple(ids.shape)}, got {tuple(hidden.shape)}")
        return kernels.linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, **options)

    def _kl(self, lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-token KL estimate to the reference policy (Schulman's k1, k2, k3)."""
        diff = ref - lp
        if self.kl_estimator == "k1":
            return -diff
        if self.kl_estimator == "k2":
            return 0.5 * diff * diff
        return torch.exp(diff) - diff - 1.0

    def _aggregate_pg(self, values, keep, valid, selection: Selection, batch_counts: bool,
                      num_items_in_batch) -> torch.Tensor:
        """The policy-gradient part (values zero off `keep`) reduced by loss_type and normalize_by.

        batch_counts: the selection was made over a whole batch of which this call holds some rows.
        """
        if self.normalize_by == "valid":
            return self._aggregate(values, valid, num_items_in_batch)
        if self.aggregation == "dapo":
            return values.sum() / selection.global_selected_count.clamp(min=1)
        if self.aggregation == "bnpo" and batch_counts:
            # A micro-batch's bnpo call is weighted by its share of the batch's valid tokens; dividing by
            # that share of the batch's selected count makes the weighted calls sum to the batch's
            # selected-token mean (one call on the whole batch divides by its selected count).
            share = valid.sum().double() * selection.selected_count / selection.valid_count.clamp(min=1)
            return values.sum() / torch.where(share > 0, share, 1.0).float()
        return self._aggregate(values, keep, None)

    def _aggregate(self, values: torch.Tensor, counted: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Reduce per-token values (zero off `counted`) to a scalar by the loss type's aggregation."""
        if self.aggregation == "grpo":
            per_response = values.sum(-1) / counted.sum(-1).clamp(min=1)
            return per_response.mean()
        if self.aggregation == "dr_grpo":
            return values.sum() / (values.shape[0] * self.max_completion_length)
        if self.aggregation == "luspo":
            return values.sum() / values.shape[0]
        if self.aggregation == "dapo" and num_items_in_batch is not None:
            return values.sum() / num_items_in_batch
        return values.sum() / counted.sum().clamp(min=1)
