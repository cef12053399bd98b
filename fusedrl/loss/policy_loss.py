"""The fused policy loss: PPO / GRPO / DAPO with entropy-aware token selection (docs/algorithms.md 2 to 5).

One module for every policy-gradient loss of fusedrl. The per-token log-prob lp and entropy H come
from one fused pass over the vocabulary, from logits or straight from hidden states and the output
embedding (so no [B, T, V] tensor need exist); the token masks read detached copies of them.

Per valid token t, with the importance weight ratio = exp(lp - olp) (or GSPO's sequence-level
weight, `importance_sampling_level`; objectives.py):
    pg_t   = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))        (PPO clip)
    pg_t   = min(pg_t, -A c)  where A < 0                                     (dual clip, optional)
    pg_t   = -A ratio + kl_cov_coef |lp - olp| [t in KL-Cov]                 (cov_mode="kl_cov": no clip)
    pg_t   = CISPO's, SAPO's or VESPO's term instead (loss_type cispo, sapo, vespo; objectives.py)
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

from dataclasses import replace

import torch
from torch import nn

from fusedrl import kernels
from fusedrl.kernels import covariance_mask, probability_mask, top_entropy_mask
from fusedrl.kernels._checks import check_same_device, check_temperature
from fusedrl.kernels._kept_set import check_top_k, check_top_p
from fusedrl.kernels._select import all_reduce
from fusedrl.kernels.covariance_mask import broadcast_advantages, token_covariance
from fusedrl.kernels.top_entropy_mask import check_mask
from fusedrl.loss import objectives
from fusedrl.loss.options import CLIP_LOSS_TYPES, LossOptions
from fusedrl.loss.selection import Selection

# Metrics that are extremes, not means: how two micro-batches' values combine (NaN = none; fmin and
# fmax skip it).
EXTREME_METRICS = {"clip_ratio/low_min": torch.fmin, "clip_ratio/high_max": torch.fmax, "cov/max": torch.fmax}


def metrics_to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors (the loss's metrics, or sums of them) as Python floats, with one device-to-host copy."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


class FusedPolicyLoss(nn.Module):
    """Policy-gradient loss on fused per-token log-probs and entropies.

    `FusedPolicyLoss(loss_type="dapo", top_entropy_fraction=0.2, temperature=0.7)`, or
    `FusedPolicyLoss(options, temperature=0.7)` with a LossOptions (options.py: every option, its
    default and its range, in one place; keyword arguments of the same names override its fields).
    A bad option raises OptionError (a ValueError) naming it.

    Arguments that describe the sampler and the data rather than the objective:
        temperature: the sampling temperature the logits are divided by.
        top_k, top_p: the sampler's kept set (None: the full softmax; top_p = 1 is None). lp and H are then
            those of the renormalised distribution the sampler drew from (vLLM's order: temperature,
            top-k, top-p; ties kept whole; docs/logprobs_and_entropy.md), so the importance ratio and
            the KL compare the distributions that sampled, and every entropy the loss reads (the
            top-entropy threshold, the entropy bonus, entropy/mean) is the kept set's. A token outside
            the kept set (lp = -inf: the policy moved, or rounding at the set's edge) keeps its place in
            every token count but gets no policy-gradient term and takes no part in the batch-wide
            masks; its entropy term stays. The same for old log-probs of -inf; a reference log-prob of
            -inf (the token is outside the reference's kept set: an infinite KL) drops that token's KL
            term. Both are counted (mask/outside_kept_set, kl/outside_kept_set), never NaN.
        max_completion_length: dr_grpo's constant denominator B * max_completion_length.
        ignore_index: the id the fused ops skip; padded positions are set to it before the pass.
        process_group: a torch.distributed group for the batch statistics (entropy quantile, covariance
            means, top-k, selected counts), so that every rank selects from the global batch.
        generator: the random source of Clip-Cov's draw (seeded, runs reproduce).
        check_values: refuse (ValueError naming the argument) ignore_index in completion_ids and NaN / inf
            advantages, old or reference log-probs at valid positions; one device-to-host sync per call.

    The loss answers what a trainer that splits a batch into micro-batches must know (`batch_wide`,
    `micro_batch_share`, `token_count_argument`), so that no caller re-derives it from the loss type.
    """

    def __init__(self, options: LossOptions | None = None, /, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, max_completion_length: int | None = None,
                 ignore_index: int = -100, process_group=None, generator: torch.Generator | None = None,
                 check_values: bool = True, **option_fields):
        super().__init__()
        if options is None:
            options = LossOptions(**option_fields)
        elif not isinstance(options, LossOptions):
            raise ValueError(f"options must be a LossOptions, got {type(options).__name__}")
        elif option_fields:
            options = replace(options, **option_fields)
        self.options = options
        if options.loss_type == "dr_grpo" and (
            isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int)
            or max_completion_length < 1
        ):
            raise ValueError(
                f"max_completion_length must be a positive int for loss_type='dr_grpo', got {max_completion_length!r}"
            )
        self.max_completion_length = None if max_completion_length is None else int(max_completion_length)
        self.temperature = check_temperature(temperature)
        self.top_k = check_top_k(top_k)
        top_p = check_top_p(top_p)
        self.top_p = None if top_p == 1.0 else top_p  # keeps every token, as the kernels read it
        self.ignore_index = int(ignore_index)
        self.process_group = process_group
        self.generator = generator
        self.check_values = bool(check_values)

    def __getattr__(self, name: str):
        # The options read as attributes of the loss (loss_fn.loss_type, loss_fn.cov_mode, ...).
        options = self.__dict__.get("options")
        if options is not None and name in LossOptions.__dataclass_fields__:
            return getattr(options, name)
        return super().__getattr__(name)

    @property
    def aggregation(self) -> str:
        return self.options.aggregation

    @property
    def kept_set(self) -> bool:
        """Whether lp and H are of the sampler's kept set (top_k or top_p given), not the full softmax."""
        return self.top_k is not None or self.top_p is not None

    @property
    def batch_wide(self) -> bool:
        """Whether a call reads statistics of the whole batch, so that micro-batched calls need one
        `select` over the whole batch: the top-entropy threshold, Clip-Cov / KL-Cov, or the selected
        tokens' count of dapo and bnpo with normalize_by="selected"."""
        return self.options.batch_wide

    @property
    def _counts_selected(self) -> bool:
        return self.options.counts_selected

    def micro_batch_share(self, rows: int, tokens: int, batch_rows: int, batch_tokens: int) -> float:
        """The factor a micro-batch's loss (`rows` responses, `tokens` valid tokens) takes so that the
        micro-batches' weighted losses add up to the loss of one call on the whole batch.

        dapo divides by the batch's token count itself (`token_count_argument`, or with
        normalize_by="selected" the Selection's count): share 1. grpo, dr_grpo and luspo average over
        responses: the micro-batch's share of the rows. bnpo averages over tokens: its share of the
        valid tokens (with "selected" the loss rescales its part to fit).
        """
        if self.aggregation == "dapo":
            return 1.0
        if self.aggregation == "bnpo":
            return tokens / max(1, batch_tokens)
        return rows / max(1, batch_rows)

    def token_count_argument(self, batch_tokens: int) -> int | None:
        """The `num_items_in_batch` a micro-batch's call must get: the batch's valid-token count for the
        losses that divide by it (dapo's aggregation), None for the others."""
        return batch_tokens if self.aggregation == "dapo" else None

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
        logprobs: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
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
        (and bias [V]); hidden may instead be [N, H], the valid tokens' hidden states only, in row-major
        order of completion_mask (a packed micro-batch: the fused op then sees no padding); or logprobs
        [B, T]: the sampled tokens' log-probs that the caller's own forward
        computed (a trainer such as verl; differentiable), with their entropy [B, T] where the options
        read it (top_entropy_fraction < 1, entropy_coef), and completion_ids may then be None; the loss
        is computed in logprobs' dtype (float64 stays float64), else in float32.
        old_logprobs / ref_logprobs [B, T]; old_logprobs=None means on-policy.
        selection: these rows of a Selection that `select` made over the whole batch
        (`Selection.rows`); without it the batch-wide masks come from this call's tokens alone.
        rollout_is_weights [B] or [B, T]: constant weights of each token's policy-gradient term, the
        correction from the sampling engine's policy to the trainer's (TRL's vLLM
        importance_sampling_ratio, verl's rollout_is_weights); vespo folds them into its weight instead.
        sampling_logprobs [B, T]: the sampling engine's log-probs, for off_policy_mask_threshold
        (default: old_logprobs); NaN where the sampler gave none.
        Gradients flow to logits, or to hidden, weight and bias, or to logprobs (and entropy).

        Metrics: entropy/mean (where H is known), loss/pg, mask/*, kl (with ref_logprobs), and the loss
        type's clip statistics: clip_ratio/low_mean, high_mean, region_mean (shares of valid tokens; of
        responses when the weight is per response, a sequence level with advantages [B]) and
        clip_ratio/low_min, high_max (the least and most clipped response's share, NaN without one) for
        the PPO clip; clip_ratio/cispo_mean (weight above the cap with A > 0) for cispo; vespo/phi_mean
        for vespo.

        A batch of 0 rows (B = 0) gives a zero loss, still differentiable (zero gradients), and the
        metrics of a batch without valid tokens: means 0, extremes NaN (cov/max -inf).
        Values: ignore_index in completion_ids, or a NaN / inf advantage, old or reference log-prob, at a
        valid position raises ValueError naming the argument (see `check_values`); padding may hold anything.
        """
        name, first = ("completion_ids", completion_ids)
        if completion_ids is None and logprobs is not None:
            name, first = "logprobs", logprobs
        if not isinstance(first, torch.Tensor) or first.dim() != 2:
            raise ValueError(f"{name} must be a [B, T] tensor, got {getattr(first, 'shape', first)!r}")
        shape = first.shape
        valid = check_mask("completion_mask", completion_mask, shape)
        dtype = torch.float32 if logprobs is None else torch.promote_types(logprobs.dtype, torch.float32)
        adv = broadcast_advantages(advantages, shape).detach().to(dtype)
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
            rollout_is_weights = objectives.check_rollout_weights(rollout_is_weights, shape, dtype)
        check_same_device(completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages,
                          logits=logits, hidden=hidden, weight=weight, bias=bias, logprobs=logprobs, entropy=entropy,
                          old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights,
                          sampling_logprobs=sampling_logprobs)
        self._check_values(valid, completion_ids=completion_ids, advantages=adv, old_logprobs=old_logprobs,
                           ref_logprobs=ref_logprobs)

        lp, entropy = self._logprobs_entropy(completion_ids, valid, logits, hidden, weight, bias, logprobs, entropy)
        lp = torch.where(valid, lp, 0.0)
        if entropy is not None:
            entropy = torch.where(valid, entropy, 0.0)
        olp = lp.detach() if old_logprobs is None else torch.where(valid, old_logprobs.detach().to(dtype), 0.0)
        # Tokens outside the kept set (lp or old lp = -inf) get lp = old lp = 0 with no gradient, so that
        # no inf reaches a ratio, a mean or a backward; `scored` leaves them out of the policy-gradient terms.
        outside = self._outside_kept_set(valid, lp.detach(), olp)
        scored = valid & ~outside
        lp, olp = torch.where(outside, 0.0, lp), torch.where(outside, 0.0, olp)

        log_ratio = lp - olp
        ratio = torch.exp(objectives.log_importance_weights(log_ratio, valid, self.importance_sampling_level))
        unclipped, clipped = self._ppo_terms(adv, ratio)
        batch_counts = selection is not None
        if selection is None:
            selection = self._select(lp.detach(), None if entropy is None else entropy.detach(), adv, valid,
                                     clipped > unclipped, olp, scored)
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
            pg = objectives.sapo_terms(ratio, adv, self.sapo_temperature_pos, self.sapo_temperature_neg)
        elif self.loss_type == "vespo":
            phi = objectives.vespo_weights(log_ratio, valid, adv, (self.vespo_k_pos, self.vespo_k_neg),
                                          (self.vespo_lambda_pos, self.vespo_lambda_neg), rollout_is_weights)
            pg = -phi * adv * lp
            metrics["vespo/phi_mean"] = (objectives.row_mean(phi[:, 0]) if advantages.dim() == 1
                                         else (phi * valid).sum() / n_valid)
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
        keep = self._kept(scored, selection)
        if self.kept_set:
            metrics["mask/outside_kept_set"] = frac(outside)
        if self.cov_mode is not None:
            metrics["mask/cov"] = frac(selection.covariance)
        if self.top_entropy_fraction < 1.0:
            # The share of valid tokens the entropy mask keeps (the low side with entropy_tokens="low").
            metrics["mask/top_entropy"] = frac(self._entropy_kept(selection))
        if self.prob_mask_threshold is not None:
            metrics["mask/probability"] = frac(selection.probability)
        if self.off_policy_mask_threshold is not None:
            # Per call, from this call's current log-probs: refused where a batch-wide selected count
            # would need it (see __init__).
            sampled = olp if sampling_logprobs is None else sampling_logprobs.detach().to(dtype)
            near = objectives.off_policy_keep(lp.detach(), sampled, scored, adv, self.off_policy_mask_threshold)
            keep = keep & near
            metrics["mask/off_policy"] = frac(near)

        pg_loss = self._aggregate_pg(torch.where(keep, pg, 0.0), keep, valid, selection, batch_counts,
                                     num_items_in_batch)
        loss = pg_loss
        if ref_logprobs is not None:
            ref = torch.where(valid, ref_logprobs.detach().to(dtype), 0.0)
            # No KL term where a log-prob is -inf (outside a kept set): the estimate would be infinite.
            # The where keeps every value finite, so that no inf * 0 reaches the backward.
            no_kl = outside | (valid & (ref == -torch.inf))
            ref = torch.where(no_kl, lp.detach(), ref)
            kl = self._kl(lp, ref)
            if self.kl_importance_weighted:
                kl = ratio * kl  # the ratio keeps its gradient: this is the point of the correction
            kl = torch.where(no_kl, 0.0, kl)
            metrics["kl"] = (kl.detach() * valid).sum() / n_valid
            if self.kept_set:
                metrics["kl/outside_kept_set"] = frac(no_kl)
        if self.beta > 0:
            kl_loss = self._aggregate(self.beta * torch.where(valid, kl, 0.0), valid, num_items_in_batch)
            loss = loss + kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if self.entropy_coef != 0:
            entropy_loss = self._aggregate(-self.entropy_coef * entropy, valid, num_items_in_batch)
            loss = loss + entropy_loss
            metrics["loss/entropy"] = entropy_loss.detach()

        metrics["loss/pg"] = pg_loss.detach()
        if entropy is not None:
            metrics["entropy/mean"] = entropy.detach().sum() / n_valid
        if self.loss_type in CLIP_LOSS_TYPES:
            metrics.update(objectives.clip_metrics(ratio, adv, valid, self.epsilon_low, self.epsilon_high, per_response))
        metrics["mask/selected"] = frac(keep)
        if self.cov_mode is not None:
            cov = torch.where(valid, selection.covariance_values, 0.0)
            metrics["cov/mean"] = (cov.sum() / n_valid).float()
            # One -inf entry more, as for a batch without valid tokens: max() of 0 rows would raise.
            metrics["cov/max"] = torch.cat([torch.where(valid, cov, -torch.inf).reshape(-1),
                                            cov.new_full((1,), -torch.inf)]).max().float()
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
        self._check_values(valid, advantages=adv, old_logprobs=old_logprobs)
        lp = torch.where(valid, logprobs.float(), 0.0)
        olp = lp if old_logprobs is None else torch.where(valid, old_logprobs.float(), 0.0)
        outside = self._outside_kept_set(valid, lp, olp)  # as in forward
        lp, olp = torch.where(outside, 0.0, lp), torch.where(outside, 0.0, olp)
        unclipped, clipped = self._ppo_terms(adv, torch.exp(lp - olp))
        return self._select(lp, torch.where(valid, entropy.float(), 0.0), adv, valid, clipped > unclipped, olp,
                            valid & ~outside)

    def _select(self, lp, entropy, adv, valid, clipped, olp, scored) -> Selection:
        """The masks from detached lp, H and old lp; `clipped` marks the tokens the PPO clip already clipped.
        The masks choose among the `scored` tokens (valid, inside the kept set); counts of valid tokens
        count all `valid` ones."""
        high_entropy = covariance = covariance_values = probability = None
        if self.top_entropy_fraction < 1.0:
            high_entropy = top_entropy_mask(entropy, scored, top_fraction=self.top_entropy_fraction,
                                            process_group=self.process_group)
        if self.cov_mode is not None:
            covariance_values = token_covariance(lp, adv, scored, self.process_group)
            covariance = covariance_mask(
                lp, adv, scored, mode=self.cov_mode, ratio=self.cov_ratio, lower=self.cov_lower, upper=self.cov_upper,
                exclude=clipped if self.cov_mode == "clip_cov" else None, generator=self.generator,
                process_group=self.process_group,
            )
        if self.prob_mask_threshold is not None:
            probability = probability_mask(olp, scored, threshold=self.prob_mask_threshold)
        selection = Selection(high_entropy=high_entropy, covariance=covariance, covariance_values=covariance_values,
                              probability=probability)
        if not self._counts_selected:
            return selection
        selected = self._kept(scored, selection).sum()
        if self.process_group is not None:
            # The batch spans the ranks: bnpo's micro-batch rescaling needs the whole batch's ratio.
            selected = all_reduce(selected, self.process_group)
            return replace(selection, valid_count=all_reduce(valid.sum(), self.process_group),
                           selected_count=selected, global_selected_count=selected)
        return replace(selection, valid_count=valid.sum(), selected_count=selected, global_selected_count=selected)

    def _outside_kept_set(self, valid: torch.Tensor, lp: torch.Tensor, olp: torch.Tensor) -> torch.Tensor:
        """The valid tokens outside the kept set: lp or old lp -inf (none without a kept set)."""
        if not self.kept_set:
            return torch.zeros_like(valid)
        return valid & ((lp == -torch.inf) | (olp == -torch.inf))

    def _kept(self, valid: torch.Tensor, selection: Selection) -> torch.Tensor:
        """The valid tokens whose policy-gradient term every active mask keeps (M_t)."""
        keep = valid
        if self.cov_mode == "clip_cov":
            keep = keep & ~selection.covariance
        if self.top_entropy_fraction < 1.0:
            keep = keep & self._entropy_kept(selection)
        if self.prob_mask_threshold is not None:
            keep = keep & selection.probability
        return keep

    def _entropy_kept(self, selection: Selection) -> torch.Tensor:
        """The tokens the entropy mask keeps: the top fraction, or with entropy_tokens="low" the rest."""
        return selection.high_entropy if self.entropy_tokens == "high" else ~selection.high_entropy

    def _check_values(self, valid: torch.Tensor, **tensors: torch.Tensor | None) -> None:
        """Refuses, naming the argument, what would silently make a wrong or NaN loss: completion_ids equal
        to ignore_index at a valid position (the fused op would skip the token: lp = H = 0), and a NaN or
        inf advantage, old or reference log-prob at one (with a kept set, -inf log-probs are tokens outside
        it: see the class docstring). Padding may hold anything. All the checks
        are one reduction read back once: one device-to-host sync per call on a GPU (`check_values=False`
        skips them, for a trainer that checks its inputs itself)."""
        if not self.check_values:
            return
        bad = {}
        for name, t in tensors.items():
            if t is not None:
                if name == "completion_ids":
                    wrong = t == self.ignore_index
                elif self.kept_set and name != "advantages":
                    wrong = torch.isnan(t) | (t == torch.inf)
                else:
                    wrong = ~torch.isfinite(t)
                bad[name] = (valid & wrong).any()
        if not bad:
            return
        # With a process group every rank learns of a bad value on any rank: all raise, none waits for the others.
        flags = all_reduce(torch.stack(list(bad.values())).to(torch.int64), self.process_group)
        for name, found in zip(bad, flags.tolist()):
            if not found:
                continue
            if name == "completion_ids":
                raise ValueError(f"completion_ids holds ignore_index ({self.ignore_index}) at a valid position "
                                 "(completion_mask nonzero): give the sampled token there, or mask it out")
            allowed = " (or -inf, outside the kept set)" if self.kept_set and name != "advantages" else ""
            raise ValueError(f"{name} must be finite{allowed} at valid positions (completion_mask nonzero); "
                             "found NaN or inf")

    def _check_selection(self, selection, shape) -> None:
        """A Selection fits this loss's options and this call's [B, T]."""
        if not isinstance(selection, Selection):
            raise ValueError(f"selection must be a Selection (from FusedPolicyLoss.select), got {type(selection).__name__}")
        counts = self._counts_selected
        needed = {"high_entropy": self.top_entropy_fraction < 1.0, "covariance": self.cov_mode is not None,
                  "covariance_values": self.cov_mode is not None, "probability": self.prob_mask_threshold is not None,
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

    def _logprobs_entropy(self, ids, valid, logits, hidden, weight, bias, logprobs, entropy):
        """lp and H of the sampled tokens, [B, T] each: float32 from the one fused pass, or the caller's."""
        if sum(t is not None for t in (logits, hidden, logprobs)) != 1:
            raise ValueError("exactly one of logits or hidden (or logprobs) must be given")
        if logprobs is not None:
            if weight is not None or bias is not None:
                raise ValueError("weight and bias belong to the hidden path; pass them with hidden, not logprobs")
            for name, t in (("logprobs", logprobs), ("entropy", entropy)):
                if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()
                                      or tuple(t.shape) != tuple(valid.shape)):
                    raise ValueError(f"{name} must be a float tensor of shape {tuple(valid.shape)}, got "
                                     f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if entropy is None and (self.top_entropy_fraction < 1.0 or self.entropy_coef != 0):
                raise ValueError("entropy must be given with logprobs when top_entropy_fraction < 1 or entropy_coef != 0")
            return logprobs, entropy
        if entropy is not None:
            raise ValueError("entropy is an input only with logprobs; the fused pass computes it from logits or hidden")
        # Padded positions may hold any id (even out of the vocabulary); the ops skip ignore_index.
        targets = ids.masked_fill(~valid, self.ignore_index)
        options = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, ignore_index=self.ignore_index,
                       backend=self.backend)
        if logits is not None:
            if weight is not None or bias is not None:
                raise ValueError("weight and bias belong to the hidden path; pass them with hidden, not logits")
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise ValueError(f"logits must have shape [B, T, V] with [B, T] = {tuple(ids.shape)}, got {tuple(logits.shape)}")
            return kernels.logprobs_and_entropy(logits, targets, **options)
        if weight is None:
            raise ValueError("weight (the output embedding [V, H]) must be given with hidden")
        if hidden.dim() == 2:
            # Packed: the valid tokens' hidden states only, so the fused op runs on no padding.
            count = int(valid.sum())
            if hidden.shape[0] != count:
                raise ValueError(f"hidden of shape [N, H] must hold the {count} valid tokens, got {tuple(hidden.shape)}")
            lp, entropy = kernels.linear_logprobs_and_entropy(hidden, weight, ids[valid], bias=bias, **options)
            zeros = torch.zeros(ids.shape, dtype=lp.dtype, device=lp.device)
            return zeros.masked_scatter(valid, lp), zeros.masked_scatter(valid, entropy)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"hidden must have shape [B, T, H] or [N, H] with [B, T] = {tuple(ids.shape)}, "
                             f"got {tuple(hidden.shape)}")
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
            return objectives.row_mean(per_response)
        if self.aggregation == "dr_grpo":
            return values.sum() / (max(1, values.shape[0]) * self.max_completion_length)
        if self.aggregation == "luspo":
            return values.sum() / max(1, values.shape[0])
        if self.aggregation == "dapo" and num_items_in_batch is not None:
            return values.sum() / num_items_in_batch
        return values.sum() / counted.sum().clamp(min=1)
