"""fusedrl inside verl: entropy-aware policy losses in verl's registry and a fused model forward.

Policy losses, registered under verl's `actor.policy_loss.loss_mode` names, with the call signature of
verl's `PolicyLossFn` (verl 0.9):

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       config=None, rollout_is_weights=None) -> (loss, metrics)

- `fusedrl_clip_cov`: Clip-Cov (Cui et al. 2025) with k = max(1, int(clip_cov_ratio * N)) candidates
  drawn among tokens with clip_cov_lb < Cov < clip_cov_ub that the PPO clip left alone.
- `fusedrl_kl_cov`: KL-Cov: no PPO clip; the k tokens of largest Cov get ppo_kl_coef * |lp - old lp|.
- `fusedrl_top_entropy`: the PPO clip loss on the top-rho entropy tokens only ("Beyond the 80/20
  rule"), rho = `policy_loss.top_entropy_fraction` when the config carries it, else 0.2.

What differs from verl's own clip_cov / kl_cov: the covariance is centred, and the entropy quantile
taken, over the valid tokens of every data-parallel rank (fusedrl's exact batch-wide selection ops,
all-reducing sums and histograms over the process group), not per micro-batch on one device. The
group is the `dp_group` verl hands its loss function once `install()` has run, else the default
world group when torch.distributed is initialised. Statistics span the micro-batch being computed on
all ranks; with `ppo_micro_batch_size_per_gpu` equal to the mini-batch per GPU (which the fused
forward's O(N) memory makes affordable) that is the whole mini-batch.

verl's `PolicyLossFn` receives no entropy, so `fusedrl_top_entropy` reads the micro-batch's entropy
from the wrapper that `install()` puts around verl's `ppo_loss` (and needs `actor.calculate_entropy`).

Model forward: `patch_model_forward(model)` makes a Hugging Face causal LM return per-token
`log_probs` and `entropy` from `fusedrl.kernels.linear_logprobs_and_entropy` (hidden states and output
embedding in, never the logits), in the form verl's `use_fused_kernels` path reads.

`install()` does all three inside verl: registers the losses, wraps `ppo_loss`, and makes verl's
fused-kernel patch (`actor_rollout_ref.model.use_fused_kernels=True`) install fusedrl's forward.
Set `VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl_plugin` so every verl process runs it.
"""

from __future__ import annotations

import contextvars
import functools
import types
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from fusedrl.kernels import covariance_mask, linear_logprobs_and_entropy, top_entropy_mask

__all__ = ["POLICY_LOSSES", "install", "patch_model_forward", "register"]

DEFAULT_TOP_ENTROPY_FRACTION = 0.2

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


def _option(config, name: str, default):
    """policy_loss.<name> when set, else the default (verl's own losses read their options so)."""
    policy_loss = config.get("policy_loss", None)
    value = None if policy_loss is None else policy_loss.get(name, None)
    return default if value is None else value


def _aggregate(loss_mat, response_mask, loss_agg_mode, config):
    """verl's own aggregation (token-mean, seq-mean-..., with its global batch sizes)."""
    from verl.trainer.ppo.core_algos import agg_loss

    global_batch_info = config.get("global_batch_info", None) or {}
    return agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **global_batch_info)


@dataclass(frozen=True)
class _Clip:
    ratio: torch.Tensor  # exp(lp - old lp)
    unclipped: torch.Tensor  # -A ratio
    clipped: torch.Tensor  # -A clip(ratio, 1 - eps_low, 1 + eps_high)
    log_ratio: torch.Tensor


def _ppo_terms(old_log_prob, log_prob, advantages, config) -> _Clip:
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    return _Clip(ratio, -advantages * ratio, -advantages * torch.clamp(ratio, 1 - low, 1 + high), log_ratio)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    return (torch.where(mask, values.float(), 0.0).sum() / mask.sum().clamp(min=1)).item()


def _finish(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights):
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return _aggregate(pg_losses, response_mask, loss_agg_mode, config)


def fusedrl_clip_cov(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None
):
    """Clip-Cov with batch-wide covariance centring (see the module docstring)."""
    valid = response_mask.bool()
    terms = _ppo_terms(old_log_prob, log_prob, advantages, config)
    clipped_by_ppo = terms.clipped > terms.unclipped
    drawn = covariance_mask(
        log_prob.detach(), advantages.detach(), valid, mode="clip_cov",
        ratio=_option(config, "clip_cov_ratio", 2e-4), lower=_option(config, "clip_cov_lb", 1.0),
        upper=_option(config, "clip_cov_ub", 5.0), exclude=clipped_by_ppo, process_group=_process_group(),
    )  # fmt: skip
    pg_losses = torch.where(drawn, 0.0, torch.maximum(terms.unclipped, terms.clipped))
    loss = _finish(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, {
        "actor/pg_clipfrac": _masked_mean(drawn.float(), valid),
        "actor/ppo_kl": _masked_mean(-terms.log_ratio.detach(), valid),
    }


def fusedrl_kl_cov(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None
):
    """KL-Cov with batch-wide covariance and top-k (see the module docstring)."""
    valid = response_mask.bool()
    terms = _ppo_terms(old_log_prob, log_prob, advantages, config)
    chosen = covariance_mask(
        log_prob.detach(), advantages.detach(), valid, mode="kl_cov",
        ratio=_option(config, "kl_cov_ratio", 2e-4), process_group=_process_group(),
    )  # fmt: skip
    penalty = _option(config, "ppo_kl_coef", 1.0) * terms.log_ratio.abs()
    pg_losses = terms.unclipped + torch.where(chosen, penalty, 0.0)
    loss = _finish(pg_losses, response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, {
        "actor/ppo_kl": _masked_mean(terms.log_ratio.detach().abs(), valid),
        "actor/kl_cov_frac": _masked_mean(chosen.float(), valid),
    }


def fusedrl_top_entropy(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None
):
    """PPO clip (with verl's dual clip) on the top-rho entropy tokens of the whole batch."""
    entropy = _entropy.get()
    if entropy is None:
        raise RuntimeError(
            "fusedrl_top_entropy needs the per-token entropy: run fusedrl.integrations.verl.install() in every verl "
            "process (VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl_plugin) and set actor.calculate_entropy=True"
        )
    if entropy.shape != log_prob.shape:
        raise ValueError(f"entropy must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(entropy.shape)}")
    valid = response_mask.bool()
    terms = _ppo_terms(old_log_prob, log_prob, advantages, config)
    pg = torch.maximum(terms.unclipped, terms.clipped)
    dual = -advantages * config.get("clip_ratio_c", 3.0)
    pg = torch.where(advantages < 0, torch.minimum(pg, dual), pg)
    fraction = _option(config, "top_entropy_fraction", DEFAULT_TOP_ENTROPY_FRACTION)
    selected = top_entropy_mask(entropy.detach(), valid, top_fraction=fraction, process_group=_process_group())
    loss = _finish(torch.where(selected, pg, 0.0), response_mask, loss_agg_mode, config, rollout_is_weights)
    return loss, {
        "actor/pg_clipfrac": _masked_mean((terms.clipped > terms.unclipped).float(), valid),
        "actor/ppo_kl": _masked_mean(-terms.log_ratio.detach(), valid),
        "actor/top_entropy_frac": _masked_mean(selected.float(), valid),
    }


POLICY_LOSSES = {
    "fusedrl_clip_cov": fusedrl_clip_cov,
    "fusedrl_kl_cov": fusedrl_kl_cov,
    "fusedrl_top_entropy": fusedrl_top_entropy,
}


def register(register_policy_loss=None) -> None:
    """Add POLICY_LOSSES to verl's registry (or to the given `register_policy_loss(name)` decorator)."""
    if register_policy_loss is None:
        register_policy_loss = _verl("verl.trainer.ppo.core_algos").register_policy_loss
    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)


def with_entropy_context(ppo_loss):
    """Wrap verl's `ppo_loss(config, model_output, data, dp_group=None)` so that the registered losses see
    the micro-batch's entropy (padded like log_prob) and verl's data-parallel group."""

    @functools.wraps(ppo_loss)
    def wrapped(config, model_output, data, dp_group=None):
        entropy = model_output.get("entropy", None)
        if entropy is not None:
            padding = _verl("verl.workers.utils.padding")
            entropy = padding.no_padding_2_padding(entropy, data)
        entropy_token, group_token = _entropy.set(entropy), _dp_group.set(dp_group)
        try:
            return ppo_loss(config, model_output, data, dp_group=dp_group)
        finally:
            _entropy.reset(entropy_token)
            _dp_group.reset(group_token)

    wrapped.__fusedrl_wrapped__ = True
    return wrapped


def install() -> None:
    """Register the losses, wrap verl's ppo_loss, and route verl's fused-kernel forward to fusedrl's."""
    import sys

    register()
    losses = _verl("verl.workers.utils.losses")
    if not getattr(losses.ppo_loss, "__fusedrl_wrapped__", False):
        losses.ppo_loss = with_entropy_context(losses.ppo_loss)
    # engine_workers binds ppo_loss at its import; patch its name too if it is already imported.
    workers = sys.modules.get("verl.workers.engine_workers")
    if workers is not None and not getattr(workers.ppo_loss, "__fusedrl_wrapped__", False):
        workers.ppo_loss = with_entropy_context(workers.ppo_loss)

    monkey_patch = _verl("verl.models.transformers.monkey_patch")
    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "__fusedrl_wrapped__", False):
        return

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        if use_fused_kernels:
            patch_model_forward(model)

    patch_forward_with_backends.__fusedrl_wrapped__ = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


def _verl(module: str) -> types.ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this part of fusedrl.integrations.verl needs verl ({module}): pip install verl") from err


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
    Labels equal to -100 give lp = H = 0 and no gradient.
    """

    def forward(self, input_ids=None, labels=None, shift_labels=None, temperature=1.0, return_dict=True, **kwargs):
        for unused in ("logits_to_keep", "num_items_in_batch"):
            kwargs.pop(unused, None)
        kwargs["use_cache"] = False
        outputs = self.base_model(input_ids=input_ids, **kwargs)
        if shift_labels is not None:
            targets = shift_labels
        elif labels is not None:
            targets = torch.roll(labels, shifts=-1, dims=-1)
        elif input_ids is not None:
            targets = torch.roll(input_ids, shifts=-1, dims=-1)
        else:
            raise ValueError("input_ids, labels or shift_labels must be given to score the next tokens")
        head = self.get_output_embeddings()
        hidden = outputs.last_hidden_state.to(head.weight.dtype)
        log_probs, entropy = linear_logprobs_and_entropy(
            hidden, head.weight, targets, bias=head.bias, temperature=temperature, ignore_index=-100, backend=backend
        )
        return FusedCausalLMOutput(
            log_probs=log_probs, entropy=entropy, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    model.forward = types.MethodType(forward, model)
