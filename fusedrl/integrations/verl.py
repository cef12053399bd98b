"""fusedrl inside verl: verl's PPO losses computed by `FusedPolicyLoss`, fusedrl's token masks set from
verl's own config, and a fused model forward. Written against verl 0.9.1.

Policy losses, registered under verl's `actor.policy_loss.loss_mode` names with the signature of verl's
`PolicyLossFn`; each is verl's loss of the same name, computed by `FusedPolicyLoss` from the log-probs
that verl's model forward produced:

- `fusedrl_vanilla`: verl's `vanilla` (the PPO clip at `clip_ratio_low` / `clip_ratio_high`, the dual
  clip at `clip_ratio_c`).
- `fusedrl_clip_cov`: verl's `clip_cov` (`clip_cov_ratio`, `clip_cov_lb`, `clip_cov_ub`).
- `fusedrl_kl_cov`: verl's `kl_cov` (`kl_cov_ratio`, `ppo_kl_coef`).

Each takes fusedrl's token masks from `policy_loss.top_entropy_fraction` (train on the top-rho entropy
tokens, "Beyond the 80/20 rule"; needs `actor.calculate_entropy=True`; `entropy_tokens=low` trains on
the rest instead) and `policy_loss.prob_mask_threshold` (SPO's probability mask): fields of
`PolicyLossConfig` below, which a run selects with
`actor_rollout_ref.actor.policy_loss._target_=fusedrl.integrations.verl.PolicyLossConfig` (verl's own
config class has no room for them). Without them the three equal verl's losses.

verl's `loss_agg_mode` and its global batch sizes (`dp_size`, `batch_num_tokens`, `global_batch_size`,
`loss_scale_factor`) choose the aggregation (`_aggregation`). What differs from verl's own losses:
the batch statistics (covariance centring, Clip-Cov's draw, KL-Cov's top-k, the entropy quantile) span
the micro-batch on every data-parallel rank (fusedrl's selection ops all-reduce over the `dp_group`
verl hands its loss), not one device's micro-batch; `vanilla`'s log-ratio is not clamped to
[-20, 20] before the exponential; `seq-mean-token-mean` divides each response by its token count, not
by the count plus verl's 1e-8.

verl's `PolicyLossFn` receives no entropy and no process group: `install()` wraps verl's `ppo_loss`
so that the losses read both from the call they are inside.

Model forward: `patch_model_forward(model)` makes a Hugging Face causal LM return per-token
`log_probs` and `entropy` from `fusedrl.kernels.linear_logprobs_and_entropy` (hidden states and the
output embedding in, never the logits), the fields verl's fused-kernel path reads. `install()` makes
verl's forward patch install it for `actor_rollout_ref.model.fused_kernel_options.impl_backend=fusedrl`
(with `use_fused_kernels=True`); verl's own backends are left alone.

`install()` runs in every verl process on `import verl` through the `verl.plugins` entry point that
fusedrl's package declares (or `VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl_plugin`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Optional

import torch

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
except ImportError as err:  # pragma: no cover - exercised only where verl is absent
    raise ImportError(
        "fusedrl.integrations.verl needs verl (and transformers). Install it with `pip install 'fusedrl[verl]'`."
    ) from err

from fusedrl.integrations._output_layer import check_plain_logits, head_operands
from fusedrl.kernels import linear_logprobs_and_entropy
from fusedrl.loss import FusedPolicyLoss, LossOptions, OptionError, metrics_to_floats

__all__ = ["POLICY_LOSSES", "PolicyLossConfig", "install", "patch_model_forward", "register"]

FUSED_KERNELS_BACKEND = "fusedrl"


@dataclass
class PolicyLossConfig(VerlPolicyLossConfig):
    """verl's `actor.policy_loss` with fusedrl's token masks (read by the fusedrl_* loss modes)."""

    top_entropy_fraction: float = 1.0
    """Train on this fraction of highest-entropy tokens (1 keeps all; needs actor.calculate_entropy=True)."""
    entropy_tokens: str = "high"
    """Which side of the top_entropy_fraction threshold trains: high, or low (the 80/20 paper's ablation)."""
    prob_mask_threshold: Optional[float] = None
    """SPO's probability mask: keep the tokens whose rollout probability is below this (null: off)."""

    def __post_init__(self):
        # Checked where the run's config is built (verl's driver and every worker), by the loss's own rule.
        try:
            LossOptions(top_entropy_fraction=self.top_entropy_fraction, entropy_tokens=self.entropy_tokens,
                        prob_mask_threshold=self.prob_mask_threshold)
        except OptionError as err:
            raise ValueError(f"actor.policy_loss.{err.option}: {err}") from None


# The loss-call context that verl's PolicyLossFn signature has no room for: set around each call of
# verl's `ppo_loss` by the wrapper that install() adds.
_entropy: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("fusedrl_entropy", default=None)
_dp_group: contextvars.ContextVar = contextvars.ContextVar("fusedrl_dp_group", default=None)


def _process_group():
    group = _dp_group.get()
    if group is not None:
        return group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def _field(section, name: str, default):
    """section.<name> where set, else the default (verl's own losses read their options so)."""
    value = section.get(name, None)
    return default if value is None else value


# LossOptions field -> the verl key it was read from, for error messages.
_VERL_KEYS = {
    "epsilon_low": "actor.clip_ratio_low", "epsilon_high": "actor.clip_ratio_high", "dual_clip": "actor.clip_ratio_c",
    "cov_lower": "actor.policy_loss.clip_cov_lb", "cov_upper": "actor.policy_loss.clip_cov_ub",
    "kl_cov_coef": "actor.policy_loss.ppo_kl_coef",
}


def _loss_options(mode: str, config, loss_type: str = "dapo") -> LossOptions:
    """The LossOptions of verl's loss `mode` (vanilla, clip_cov, kl_cov) under an actor config."""
    policy_loss = config.policy_loss
    clip = config.clip_ratio
    options = {
        "loss_type": loss_type,
        "epsilon_low": _field(config, "clip_ratio_low", clip),
        "epsilon_high": _field(config, "clip_ratio_high", clip),
        "top_entropy_fraction": _field(policy_loss, "top_entropy_fraction", 1.0),
        "entropy_tokens": _field(policy_loss, "entropy_tokens", "high"),
        "prob_mask_threshold": _field(policy_loss, "prob_mask_threshold", None),
    }
    # verl's defaults where a field is null, as its own losses read them.
    if mode == "vanilla":
        options["dual_clip"] = _field(config, "clip_ratio_c", 3.0)
    elif mode == "clip_cov":
        options.update(cov_mode="clip_cov", cov_ratio=_field(policy_loss, "clip_cov_ratio", 2e-4),
                       cov_lower=_field(policy_loss, "clip_cov_lb", 1.0),
                       cov_upper=_field(policy_loss, "clip_cov_ub", 5.0))
    else:
        options.update(cov_mode="kl_cov", cov_ratio=_field(policy_loss, "kl_cov_ratio", 2e-4),
                       kl_cov_coef=_field(policy_loss, "ppo_kl_coef", 1.0))
    try:
        return LossOptions(**options)
    except OptionError as err:
        ratio = "actor.policy_loss.clip_cov_ratio" if mode == "clip_cov" else "actor.policy_loss.kl_cov_ratio"
        key = _VERL_KEYS.get(err.option, ratio if err.option == "cov_ratio" else f"actor.policy_loss.{err.option}")
        raise ValueError(f"{key}: {err}") from None


def _aggregation(loss_agg_mode: str, mask: torch.Tensor, config) -> tuple[str, float | None, float]:
    """(loss_type, num_items_in_batch, factor): FusedPolicyLoss's aggregation that, times factor, is verl's
    `agg_loss(loss_agg_mode, **config.global_batch_info)`.

    verl divides by global counts and multiplies by dp_size, so that the data-parallel mean of the ranks'
    gradients is the global batch's; a missing count is the micro-batch's own (verl refuses that when
    dp_size > 1), at least 1 so that a micro-batch of empty responses gives 0 rather than verl's NaN.
    """
    info = config.get("global_batch_info", None) or {}
    dp_size = int(info.get("dp_size", None) or 1)

    def count(name: str, local) -> float:
        value = info.get(name, None)
        if value is None:
            if dp_size > 1:
                raise ValueError(f"global_batch_info.{name} is required when dp_size > 1 (verl's agg_loss)")
            value = max(float(local()), 1.0)
        return float(value)

    if loss_agg_mode == "token-mean":
        return "dapo", count("batch_num_tokens", mask.sum), float(dp_size)
    if loss_agg_mode == "token-sum":
        return "dapo", 1.0, float(dp_size)
    responses = count("global_batch_size", lambda: (mask.sum(-1) > 0).sum())
    if loss_agg_mode == "seq-mean-token-sum":
        return "dapo", responses, float(dp_size)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor", None) or mask.shape[-1]
        return "dapo", responses * scale, float(dp_size)
    if loss_agg_mode == "seq-mean-token-mean":
        # grpo averages each response's token mean over all the call's rows.
        return "grpo", None, mask.shape[0] * dp_size / responses
    raise ValueError(f"loss_agg_mode must be one of token-mean, token-sum, seq-mean-token-sum, "
                     f"seq-mean-token-sum-norm, seq-mean-token-mean; got {loss_agg_mode!r}")


def _policy_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """verl's `mode` loss through FusedPolicyLoss, with verl's metric names."""
    if config is None:
        raise ValueError(f"config (verl's actor config) must be given to fusedrl_{mode}")
    valid = response_mask.bool()
    loss_type, num_items, factor = _aggregation(loss_agg_mode, valid, config)
    loss_fn = FusedPolicyLoss(_loss_options(mode, config, loss_type), process_group=_process_group())
    entropy = _entropy.get()
    if loss_fn.top_entropy_fraction < 1.0 and entropy is None:
        raise ValueError(
            "actor.policy_loss.top_entropy_fraction < 1 needs the per-token entropy: set actor.calculate_entropy=True "
            "and let fusedrl's verl plugin wrap verl's ppo_loss (installed with fusedrl; see fusedrl.integrations.verl)"
        )
    loss, metrics = loss_fn(
        None, valid, advantages, logprobs=log_prob, entropy=entropy if loss_fn.top_entropy_fraction < 1.0 else None,
        old_logprobs=old_log_prob, num_items_in_batch=num_items, rollout_is_weights=rollout_is_weights,
    )
    log_ratio = (log_prob.detach() - old_log_prob)[valid]
    ppo_kl = log_ratio.abs() if mode == "kl_cov" else -log_ratio
    names = {"mask/top_entropy": "actor/top_entropy_frac", "mask/probability": "actor/prob_mask_frac"}
    if mode == "vanilla":
        names |= {"clip_ratio/region_mean": "actor/pg_clipfrac", "clip_ratio/dual_mean": "actor/pg_clipfrac_lower"}
    elif mode == "clip_cov":
        names |= {"mask/cov": "actor/pg_clipfrac"}  # verl counts Clip-Cov's drawn tokens as clipped
    else:
        names |= {"mask/cov": "actor/kl_cov_frac"}
    picked = {theirs: metrics[ours] for ours, theirs in names.items() if ours in metrics}
    picked["actor/ppo_kl"] = ppo_kl.mean() if ppo_kl.numel() else ppo_kl.new_zeros(())
    return loss * factor, metrics_to_floats(picked)


def _loss_fn(mode: str):
    def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
           rollout_is_weights=None):
        return _policy_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)

    fn.__name__ = fn.__qualname__ = f"fusedrl_{mode}"
    fn.__doc__ = f"verl's `{mode}` policy loss computed by FusedPolicyLoss (see fusedrl.integrations.verl)."
    return fn


POLICY_LOSSES = {f"fusedrl_{mode}": _loss_fn(mode) for mode in ("vanilla", "clip_cov", "kl_cov")}


def register() -> None:
    """Add POLICY_LOSSES to verl's policy-loss registry."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)


def with_loss_context(ppo_loss):
    """Wrap verl's `ppo_loss(config, model_output, data, dp_group=None)` so that the registered losses see
    the micro-batch's entropy (padded like log_prob) and verl's data-parallel group."""

    @functools.wraps(ppo_loss)
    def wrapped(config, model_output, data, dp_group=None):
        entropy = model_output.get("entropy", None)
        if entropy is not None:
            from verl.workers.utils.padding import no_padding_2_padding

            entropy = no_padding_2_padding(entropy, data)
        entropy_token, group_token = _entropy.set(entropy), _dp_group.set(dp_group)
        try:
            return ppo_loss(config, model_output, data, dp_group=dp_group)
        finally:
            _entropy.reset(entropy_token)
            _dp_group.reset(group_token)

    wrapped.__fusedrl_wrapped__ = True
    return wrapped


def install() -> None:
    """Register the losses, wrap verl's ppo_loss, and add the `fusedrl` fused-kernel backend. Idempotent."""
    register()
    losses = importlib.import_module("verl.workers.utils.losses")
    original = losses.ppo_loss
    if not getattr(original, "__fusedrl_wrapped__", False):
        wrapped = with_loss_context(original)
        # Modules that imported ppo_loss by name before this ran (engine_workers, distillation) hold the
        # original; those imported later take the wrapped one from verl.workers.utils.losses.
        for name, module in list(sys.modules.items()):
            if name.startswith("verl.") and module is not None and module.__dict__.get("ppo_loss") is original:
                module.ppo_loss = wrapped

    monkey_patch = importlib.import_module("verl.models.transformers.monkey_patch")
    previous = monkey_patch.patch_forward_with_backends
    if getattr(previous, "__fusedrl_wrapped__", False):
        return

    @functools.wraps(previous)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == FUSED_KERNELS_BACKEND:
            patch_model_forward(model)
        else:
            previous(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends.__fusedrl_wrapped__ = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """What verl's fused path reads from the model: per-token log-probs and entropy, float32 [B, T]
    (the fields of verl's CausalLMOutputForPPO)."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def patch_model_forward(model: torch.nn.Module, backend: str = "auto") -> None:
    """Make `model(input_ids, ..., temperature=T)` return fused per-token log-probs and entropy.

    Labels follow verl's fused forward: `shift_labels` as given, else `labels` or `input_ids` rolled
    left by one (position t is scored on token t + 1; the last position wraps and verl drops it).
    Labels equal to -100 give lp = H = 0 and no gradient. Text models only; models that transform
    their logits are refused (fusedrl.integrations._output_layer).
    """
    check_plain_logits(model, "fusedrl's verl forward")
    if getattr(model.config, "vision_config", None) is not None:
        raise ValueError("fusedrl's verl forward supports text-only models; this one has a vision_config")

    # verl's fused forward's arguments; like verl's, it hands the backbone only the standard ones.
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None,
                **unused):
        outputs = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )  # fmt: skip
        if shift_labels is not None:
            targets = shift_labels
        elif labels is not None:
            targets = torch.roll(labels, shifts=-1, dims=-1)
        elif input_ids is not None:
            targets = torch.roll(input_ids, shifts=-1, dims=-1)
        else:
            raise ValueError("input_ids, labels or shift_labels must be given to score the next tokens")
        hidden, weight, bias = head_operands(outputs.last_hidden_state, self.get_output_embeddings())
        log_probs, entropy = linear_logprobs_and_entropy(
            hidden, weight, targets.to(weight.device), bias=bias, temperature=temperature, ignore_index=-100,
            backend=backend,
        )
        return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                   hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    model.forward = types.MethodType(forward, model)
