"""LossOptions: every option of the policy loss, declared once.

FusedPolicyLoss takes them (as a LossOptions or as keyword arguments of the same names), the engine's
config embeds this dataclass as its `loss` section, and the TRL and verl integrations build one from
their own configs. Each field has one default and one check, in `__post_init__`: a bad value raises an
OptionError naming the field, so that the engine's config can name the key (`loss.<field>`) without
reading the message. Values that describe the sampler rather than the objective (the temperature,
dr_grpo's max_completion_length) are FusedPolicyLoss's own arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# The loss types built on the PPO clip; the others replace it with their own term (objectives.py).
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# How each loss type reduces its per-token terms: cispo and vespo as dapo, sapo as grpo (TRL's pairings).
AGGREGATION = {**{name: name for name in CLIP_LOSS_TYPES}, "cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}
KL_ESTIMATORS = ("k1", "k2", "k3")
COV_MODES = (None, "clip_cov", "kl_cov")
NORMALIZERS = ("valid", "selected")
ENTROPY_TOKENS = ("high", "low")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
BACKENDS = ("auto", "triton", "torch")


class OptionError(ValueError):
    """A loss option out of range or in a meaningless combination; `option` is the field's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class LossOptions:
    """The policy loss's options; the module docstring of policy_loss.py gives the formulas.

    Options whose meaning needs more than their one line:
    - importance_sampling_level: "token" (exp(lp - olp) per token), "sequence" (GSPO: the exponent
      averaged over each response's valid tokens, for all of them; the gradient reaches every token
      through the mean) or "sequence_token" (GSPO-token: the sequence weight in value, each token's own
      gradient, so that token masks restrict it). The clip, CISPO's truncation, SAPO's gate and the
      bias-corrected KL then read the sequence weight; top-entropy and probability masks still pick
      tokens. Not with cov_mode (Clip-Cov and KL-Cov act on single tokens' ratios) or vespo (which
      weighs whole responses itself).
    - kl_importance_weighted: each token's KL estimate times its importance ratio exp(lp - old_lp),
      gradient included (so it changes the KL gradient even on-policy, where the ratio is 1), as TRL's
      `use_bias_correction_kl` (DeepSeek-V3.2): with k3 the gradient becomes an unbiased estimate of the
      reverse KL's when the samples come from the old policy. The "kl" metric reports the weighted value.
    - normalize_by="selected": dapo divides by the selected tokens of the whole batch on every rank,
      bnpo by those of the local batch, grpo each response's sum by its own selected tokens.
    - off_policy_mask_threshold: delta >= 0; a response with A < 0 whose mean of (sampling lp - lp)
      exceeds delta loses its policy-gradient terms (sampling lp: the call's sampling_logprobs, else
      old_logprobs).
    - dual_clip: TRL's `delta` (INTELLECT-2's two-sided clip) is this c when delta > 1 + epsilon_high.
    """

    loss_type: str = "dapo"
    """PPO clip aggregated as grpo, bnpo, dr_grpo, dapo or luspo; or cispo, sapo, vespo (their own terms)."""
    epsilon_low: float = 0.2
    """Lower PPO clip range: the ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper PPO clip range (DAPO's clip-higher uses 0.28)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 bounding the loss of A < 0 tokens by -A c (null: off)."""
    beta: float = 0.0
    """Weight of the KL to the reference policy (needs reference log-probs when > 0)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (Schulman)."""
    kl_importance_weighted: bool = False
    """Weight each token's KL by its importance ratio, gradient included (TRL's use_bias_correction_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient: the loss gets -entropy_coef * H."""
    top_entropy_fraction: float = 1.0
    """Train on this fraction of highest-entropy tokens of the batch (0.2 in the 80/20 paper; 1 keeps all)."""
    entropy_tokens: str = "high"
    """Which side of the top_entropy_fraction threshold trains: high (the top fraction) or low (the rest: the 80/20 paper's ablation)."""
    prob_mask_threshold: Optional[float] = None
    """SPO's probability mask: keep tokens whose rollout probability is below this (null: off)."""
    cov_mode: Optional[str] = None
    """clip_cov or kl_cov (Cui et al. 2025; null: off)."""
    cov_ratio: float = 2e-4
    """Fraction of valid tokens Clip-Cov / KL-Cov act on: k = max(1, int(cov_ratio * N))."""
    cov_lower: float = 1.0
    """Clip-Cov's lower covariance bound."""
    cov_upper: float = 5.0
    """Clip-Cov's upper covariance bound."""
    kl_cov_coef: float = 1.0
    """KL-Cov's weight on |lp - old lp| of its selected tokens."""
    normalize_by: str = "valid"
    """Divide the policy-gradient part by all valid tokens (valid) or by the selected ones (selected)."""
    importance_sampling_level: str = "token"
    """Importance ratio per token, per response (sequence: GSPO) or sequence_token (GSPO-token)."""
    cispo_max_weight: float = 5.0
    """CISPO's cap on the importance weight (ScaleRL's eps_max)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for A > 0."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for A <= 0."""
    vespo_k_pos: float = 2.0
    """VESPO's Gamma-weight exponent k for A >= 0."""
    vespo_lambda_pos: float = 3.0
    """VESPO's Gamma-weight rate lambda for A >= 0."""
    vespo_k_neg: float = 3.0
    """VESPO's k for A < 0."""
    vespo_lambda_neg: float = 2.0
    """VESPO's lambda for A < 0."""
    off_policy_mask_threshold: Optional[float] = None
    """DeepSeek-V3.2's off-policy sequence mask: drop A < 0 responses drifted past this mean log-ratio (null: off)."""
    backend: str = "auto"
    """Fused-op backend: auto (Triton on CUDA, plain PyTorch elsewhere), triton or torch."""

    def __post_init__(self):
        for name, options in (("loss_type", LOSS_TYPES), ("kl_estimator", KL_ESTIMATORS), ("cov_mode", COV_MODES),
                              ("normalize_by", NORMALIZERS), ("backend", BACKENDS), ("entropy_tokens", ENTROPY_TOKENS),
                              ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
            _choice(name, getattr(self, name), options)
        # Numbers are stored as floats whatever the caller passed (YAML ints, numpy scalars).
        _number(self, "epsilon_low", low=0.0)
        if self.epsilon_low >= 1.0:
            raise OptionError("epsilon_low", f"epsilon_low must be in [0, 1) (the clip's lower bound is 1 - "
                                             f"epsilon_low), got {self.epsilon_low!r}")
        _number(self, "epsilon_high", low=0.0)
        _number(self, "dual_clip", low=1.0, low_open=True, optional=True)
        _number(self, "beta", low=0.0)
        _number(self, "entropy_coef")
        _fraction(self, "top_entropy_fraction")
        _fraction(self, "prob_mask_threshold", optional=True)
        _fraction(self, "cov_ratio")
        _number(self, "cov_lower")
        _number(self, "cov_upper")
        _number(self, "kl_cov_coef", low=0.0)
        _number(self, "cispo_max_weight", low=0.0, low_open=True)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            _number(self, name, low=0.0, low_open=True)
        _number(self, "vespo_k_pos", low=0.0)
        _number(self, "vespo_k_neg", low=0.0)
        _number(self, "off_policy_mask_threshold", low=0.0, optional=True)
        if not isinstance(self.kl_importance_weighted, bool):
            raise OptionError("kl_importance_weighted",
                              f"kl_importance_weighted must be a bool, got {self.kl_importance_weighted!r}")
        self._check_combinations()

    @property
    def aggregation(self) -> str:
        """How the per-token terms are reduced: grpo, bnpo, dr_grpo, dapo or luspo."""
        return AGGREGATION[self.loss_type]

    @property
    def counts_selected(self) -> bool:
        """dapo and bnpo over the selected tokens divide by a count of the whole (global / local) batch."""
        return self.normalize_by == "selected" and self.aggregation in ("dapo", "bnpo")

    @property
    def batch_wide(self) -> bool:
        """Whether a loss call reads statistics of the whole batch (the top-entropy threshold, Clip-Cov /
        KL-Cov, a selected-token count), so that micro-batched calls need one `select` over it first."""
        return self.top_entropy_fraction < 1.0 or self.cov_mode is not None or self.counts_selected

    def _check_combinations(self) -> None:
        """The combinations of loss type, importance-sampling level, masks and normaliser that have a meaning."""
        if self.loss_type not in CLIP_LOSS_TYPES:
            for name in ("dual_clip", "cov_mode"):
                if getattr(self, name) is not None:
                    raise OptionError(name, f"{name} must be None with loss_type={self.loss_type!r}, which has no "
                                            "PPO clip to build on")
        if not self.cov_lower < self.cov_upper:
            raise OptionError("cov_lower", f"cov_lower must be below cov_upper, got {self.cov_lower!r} and "
                                           f"{self.cov_upper!r}")
        if self.cov_mode == "kl_cov" and self.dual_clip is not None:
            raise OptionError("dual_clip", "dual_clip must be None with cov_mode='kl_cov': KL-Cov drops the PPO clip")
        if self.entropy_tokens == "low" and self.top_entropy_fraction == 1.0:
            raise OptionError("entropy_tokens", "entropy_tokens='low' keeps the tokens below the top_entropy_fraction "
                                                "threshold: set top_entropy_fraction < 1 (0.2 keeps the lowest 80%)")
        level = self.importance_sampling_level
        if self.cov_mode is not None and level != "token":
            raise OptionError("importance_sampling_level", "importance_sampling_level must be 'token' with cov_mode: "
                                                           "Clip-Cov and KL-Cov act on single tokens' ratios")
        if self.loss_type == "vespo" and level != "token":
            raise OptionError("importance_sampling_level", "importance_sampling_level must be 'token' with "
                                                           "loss_type='vespo', which weighs whole responses itself")
        if self.normalize_by == "selected" and self.loss_type in ("luspo", "dr_grpo"):
            denominator = "the number of responses" if self.loss_type == "luspo" else "a constant"
            raise OptionError("normalize_by", f"normalize_by must be 'valid' for loss_type={self.loss_type!r}, "
                                              f"whose denominator is {denominator}")
        if self.off_policy_mask_threshold is not None and self.counts_selected:
            raise OptionError(
                "off_policy_mask_threshold",
                "off_policy_mask_threshold needs normalize_by='valid' (or loss_type grpo / sapo) with "
                f"loss_type={self.loss_type!r}: its selected-token count is a batch statistic, and the "
                "off-policy mask reads each call's current log-probs",
            )


def _choice(name: str, value, options: tuple) -> None:
    if value not in options:
        raise OptionError(name, f"{name} must be one of {', '.join(map(str, options))}; got {value!r}")


def _number(options: LossOptions, name: str, *, low: float | None = None, low_open: bool = False,
            optional: bool = False) -> None:
    """Field `name` as a finite float, at least (or above, with low_open) `low`; None allowed if optional."""
    value = getattr(options, name)
    if value is None and optional:
        return
    bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
    message = f"{name} must be a finite number{bound}{' or None' if optional else ''}, got {value!r}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(name, message) from None
    if isinstance(value, bool) or not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low))):
        raise OptionError(name, message)
    object.__setattr__(options, name, v)


def _fraction(options: LossOptions, name: str, optional: bool = False) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    _number(options, name, optional=optional)
    if not 0.0 < getattr(options, name) <= 1.0:
        raise OptionError(name, f"{name} must be in (0, 1], got {value!r}")
