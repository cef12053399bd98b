"""The fused policy loss: PPO / GRPO / DAPO with entropy-aware token selection (ALGORITHMS.md 2 to 5).

One module for every policy-gradient loss of the engine. The per-token log-prob lp and entropy H come
from one fused pass over the vocabulary, from logits or straight from hidden states and the output
embedding (so no [B, T, V] tensor need exist); the token masks read detached copies of them.

Per valid token t, with ratio = exp(lp - olp):
    pg_t   = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))        (PPO clip)
    pg_t   = min(pg_t, -A c)  where A < 0                                     (dual clip, optional)
    pg_t   = -A ratio + kl_cov_coef |lp - olp| [t in KL-Cov]                 (cov_mode="kl_cov": no clip)
    loss_t = M_t pg_t + beta KL_t - entropy_coef H_t
where M_t is the product of the selection masks (top-rho entropy, SPO probability, not drawn by
Clip-Cov). The policy-gradient part is aggregated over the valid tokens (`normalize_by="valid"`, TRL)
or over the selected ones (`"selected"`, the 80/20 paper's v2 and SPO); the KL and entropy parts apply
to every valid token and are always aggregated over the valid ones. `loss_type` picks the aggregation:
grpo (mean over responses of each response's token mean), bnpo (local token mean), dr_grpo (token
sum / (B * max_completion_length)) or dapo (token sum / num_items_in_batch, the global count of valid
tokens over micro-batches and ranks, else the local count).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusedrl import kernels
from fusedrl.kernels import covariance_mask, probability_mask, top_entropy_mask
from fusedrl.kernels._checks import check_fraction, check_temperature
from fusedrl.kernels.covariance_mask import broadcast_advantages, token_covariance
from fusedrl.kernels.top_entropy_mask import check_mask

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
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


def metrics_to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss's metrics as Python floats, with a single device-to-host copy."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


class FusedPolicyLoss(nn.Module):
    """Policy-gradient loss on fused per-token log-probs and entropies.

    Constructor arguments (all validated here; a bad one raises ValueError naming it):
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (aggregation, see the module docstring).
        epsilon_low, epsilon_high: the PPO clip range [1 - epsilon_low, 1 + epsilon_high].
        dual_clip: c > 1 bounds the loss of tokens with A < 0 by -A c; None disables it.
        beta: weight of the KL to the reference policy (needs ref_logprobs at call time when > 0).
        kl_estimator: "k1" (lp - rlp), "k2" ((lp - rlp)^2 / 2) or "k3" (exp(rlp - lp) - (rlp - lp) - 1).
        entropy_coef: weight of the entropy bonus -entropy_coef * H (with gradient).
        top_entropy_fraction: rho in (0, 1]; below 1 only the top-rho entropy tokens of the batch keep
            their policy-gradient term.
        prob_mask_threshold: SPO's rho in (0, 1]; only tokens with exp(old_lp) below it keep their term.
        cov_mode: None, "clip_cov" or "kl_cov" (Cui et al. 2025).
        cov_ratio, cov_lower, cov_upper: k = max(1, int(cov_ratio * N_valid)); Clip-Cov's Cov interval.
        kl_cov_coef: KL-Cov's weight on |lp - old_lp| of its selected tokens.
        normalize_by: "valid" or "selected": the token count the policy-gradient part is divided by.
        max_completion_length: dr_grpo's constant denominator B * max_completion_length.
        temperature: sampling temperature the logits are divided by.
    Keyword-only extras:
        process_group: a torch.distributed group for batch statistics (entropy quantile, covariance
            means, top-k), so that every rank selects from the global batch.
        generator: the random source of Clip-Cov's draw (seeded, runs reproduce).
        backend: passed to the fused ops ("auto", "triton" or "torch").
        ignore_index: the id the fused ops skip; padded positions are set to it before the pass.
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and a dict of detached 0-dim metric tensors (see metrics_to_floats).

        completion_ids [B, T] (the sampled tokens), completion_mask [B, T] (nonzero = valid),
        advantages [B] or [B, T]; then either logits [B, T, V] or hidden [B, T, H] with weight [V, H]
        (and bias [V]). old_logprobs / ref_logprobs [B, T]; old_logprobs=None means on-policy.
        Gradients flow to logits, or to hidden, weight and bias.
        """
        if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be a [B, T] tensor, got {getattr(completion_ids, 'shape', completion_ids)!r}")
        shape = completion_ids.shape
        valid = check_mask("completion_mask", completion_mask, shape)
        adv = broadcast_advantages(advantages, shape).detach().float()
        for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError("ref_logprobs must be given when beta > 0")
        if self.loss_type == "dapo" and self.normalize_by == "selected" and num_items_in_batch is not None:
            raise ValueError(
                "num_items_in_batch must be None with normalize_by='selected': it counts valid tokens, "
                "and the selected tokens are only known inside the loss"
            )

        lp, entropy = self._logprobs_entropy(completion_ids, valid, logits, hidden, weight, bias)
        lp = torch.where(valid, lp, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
        olp = lp.detach() if old_logprobs is None else torch.where(valid, old_logprobs.detach().float(), 0.0)

        log_ratio = lp - olp
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        metrics: dict[str, torch.Tensor] = {}
        n_valid = valid.sum().clamp(min=1)

        def frac(selection: torch.Tensor) -> torch.Tensor:
            return (selection & valid).sum() / n_valid

        keep = valid
        if self.cov_mode == "kl_cov":
            kl_cov = covariance_mask(lp, adv, valid, mode="kl_cov", ratio=self.cov_ratio, process_group=self.process_group)
            pg = unclipped + self.kl_cov_coef * log_ratio.abs() * kl_cov
            metrics["mask/cov"] = frac(kl_cov)
        else:
            pg = torch.maximum(unclipped, clipped)
            if self.dual_clip is not None:
                dual = -adv * self.dual_clip
                metrics["clip_ratio/dual_mean"] = frac((adv < 0) & (dual < pg))
                pg = torch.where(adv < 0, torch.minimum(pg, dual), pg)
        if self.cov_mode == "clip_cov":
            clip_cov = covariance_mask(
                lp, adv, valid, mode="clip_cov", ratio=self.cov_ratio, lower=self.cov_lower, upper=self.cov_upper,
                exclude=clipped > unclipped, generator=self.generator, process_group=self.process_group,
            )
            keep = keep & ~clip_cov
            metrics["mask/cov"] = frac(clip_cov)
        if self.top_entropy_fraction < 1.0:
            high_entropy = top_entropy_mask(
                entropy.detach(), valid, top_fraction=self.top_entropy_fraction, process_group=self.process_group
            )
            keep = keep & high_entropy
            metrics["mask/top_entropy"] = frac(high_entropy)
        if self.prob_mask_threshold is not None:
            unlikely = probability_mask(olp, valid, threshold=self.prob_mask_threshold)
            keep = keep & unlikely
            metrics["mask/probability"] = frac(unlikely)

        counted = keep if self.normalize_by == "selected" else valid
        pg_loss = self._aggregate(torch.where(keep, pg, 0.0), counted, num_items_in_batch)
        loss = pg_loss
        if ref_logprobs is not None:
            kl = self._kl(lp, torch.where(valid, ref_logprobs.detach().float(), 0.0))
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
        low = (ratio < 1.0 - self.epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + self.epsilon_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = frac(low)
        metrics["clip_ratio/high_mean"] = frac(high)
        metrics["clip_ratio/region_mean"] = frac(low | high)
        metrics["mask/selected"] = frac(keep)
        if self.cov_mode is not None:
            cov = token_covariance(lp, adv, valid, self.process_group)
            metrics["cov/mean"] = (cov.sum() / n_valid).float()
            metrics["cov/max"] = torch.where(valid, cov, -torch.inf).max().float()
        return loss, {k: v.detach().float() for k, v in metrics.items()}

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

    def _aggregate(self, values: torch.Tensor, counted: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Reduce per-token values (zero off `counted`) to a scalar by loss_type."""
        if self.loss_type == "grpo":
            per_response = values.sum(-1) / counted.sum(-1).clamp(min=1)
            return per_response.mean()
        if self.loss_type == "dr_grpo":
            return values.sum() / (values.shape[0] * self.max_completion_length)
        if self.loss_type == "dapo" and num_items_in_batch is not None:
            return values.sum() / num_items_in_batch
        return values.sum() / counted.sum().clamp(min=1)
