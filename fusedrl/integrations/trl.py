"""`FusedGRPOTrainer`: TRL's GRPOTrainer with its loss computed by fusedrl's `FusedPolicyLoss`.

It is a one-line change for a TRL user: the constructor and `GRPOConfig` are TRL's own. What changes:

- The training loss runs through `FusedPolicyLoss` on the fused linear path: the model's final hidden
  states and its output embedding go in, and log-probabilities and entropies of the completion tokens
  come out of one streaming pass over the vocabulary. The `[tokens x vocab]` logits never exist.
- The rollout-time ("old") and reference log-probabilities that TRL computes between generation and
  training come from fusedrl's `linear_logprobs_and_entropy` too (TRL asks the model for them with
  `fused_lm_head=True`; this trainer answers that call with fusedrl's op).
- `top_entropy_quantile` works (TRL's own Liger path refuses it). TRL keeps the tokens whose entropy is
  at least `torch.quantile(valid_entropies, 1 - top_entropy_quantile)` and normalises by all valid tokens;
  that is exactly `FusedPolicyLoss(top_entropy_fraction=top_entropy_quantile, normalize_by="valid")`.

Honoured `GRPOConfig` fields: `loss_type` (grpo, bnpo, dr_grpo, dapo), `epsilon`, `epsilon_high`, `beta`
(k3 estimator, as TRL), `use_bias_correction_kl` (TRL's default True: the per-token KL is multiplied by
the importance ratio, gradient included; `FusedPolicyLoss(kl_importance_weighted=True)`), `temperature`,
`top_entropy_quantile`, `max_completion_length` (dr_grpo) and the gradient-accumulation scaling of each
loss type. Options whose TRL semantics the fused loss does not
reproduce are refused at construction with a ValueError naming the option.

Logged metrics keep TRL's names: `entropy`, `kl` (when beta > 0), `clip_ratio/low_mean`,
`clip_ratio/high_mean`, `clip_ratio/region_mean`, each a token-weighted mean over all processes as
TRL computes them. TRL's per-sequence extremes `clip_ratio/low_min` and `clip_ratio/high_max` are not
logged: they need per-token ratios, which the fused loss does not hand out.
"""

from __future__ import annotations

import functools
import types

import torch

try:
    from accelerate.utils import is_peft_model
    from transformers.modeling_outputs import BaseModelOutput
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as err:  # pragma: no cover - exercised only where trl is absent
    raise ImportError(
        "fusedrl.integrations.trl needs TRL (and transformers, accelerate). Install it with "
        "`pip install 'fusedrl[trl]'` or `pip install trl`."
    ) from err

from fusedrl.engine.loss import FusedPolicyLoss
from fusedrl.kernels import linear_logprobs_and_entropy

__all__ = ["FusedGRPOTrainer"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# FusedPolicyLoss metric -> TRL metric name. Each is a mean over the valid tokens of the micro-batch,
# re-weighted by token count across processes before logging, as TRL's `global_masked_mean` does.
_TRL_METRICS = {
    "entropy/mean": "entropy",
    "kl": "kl",
    "clip_ratio/low_mean": "clip_ratio/low_mean",
    "clip_ratio/high_mean": "clip_ratio/high_mean",
    "clip_ratio/region_mean": "clip_ratio/region_mean",
}

# Model inputs of vision-language models; the fused path here feeds text models only.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids")


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy loss runs through `fusedrl.FusedPolicyLoss` from hidden states.

    Same constructor and `GRPOConfig` as `trl.GRPOTrainer`; see the module docstring for what is
    honoured, what is refused and which metrics are logged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_supported(self)
        self.fused_loss = FusedPolicyLoss(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            kl_estimator="k3",
            top_entropy_fraction=self.top_entropy_quantile,
            normalize_by="valid",
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
            kl_importance_weighted=self.args.use_bias_correction_kl,
            # TRL takes the entropy quantile over the micro-batches of all processes at once.
            process_group=torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None,
        )
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        for model in (policy, self.ref_model):
            if model is not None:
                _add_fusedrl_forward(model, self.temperature, self.args.cast_lm_head_to_fp32)

    def _compute_loss(self, model, inputs):
        present = [key for key in _MULTIMODAL_KEYS if inputs.get(key) is not None]
        if present:
            raise ValueError(f"FusedGRPOTrainer supports text-only models; the batch has {present}")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # Through the (possibly DDP/FSDP-wrapped) model, so that distributed hooks see the forward; the
        # head operands inside autocast, so that the fused op runs in the dtype TRL's head would.
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, fusedrl_hidden_states=True)
            # Position t's hidden state predicts token t + 1: the completion is scored from the positions
            # just before it, as TRL's fused LM head does.
            hidden = hidden.last_hidden_state[:, -completion_ids.size(1) - 1 : -1]
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            hidden, weight, bias = _head_operands(hidden, head, self.args.cast_lm_head_to_fp32)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items_in_batch = None
        if self.loss_type == "dapo":
            # As TRL: `num_items_in_batch` spans the generation batch on all processes; rescale it to one
            # accumulation window on this process.
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items_in_batch = num_items_in_batch * accumulation / self.args.steps_per_generation

        loss, metrics = self.fused_loss(
            completion_ids,
            mask,
            inputs["advantages"],
            hidden=hidden,
            weight=weight,
            bias=bias,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            num_items_in_batch=num_items_in_batch,
        )
        if self.loss_type != "dapo":
            loss = loss / accumulation
        self._log_fused_metrics(mode, metrics, mask)
        return loss

    def _log_fused_metrics(self, mode: str, metrics: dict, mask: torch.Tensor) -> None:
        """Token-weighted means over all processes, under TRL's metric names."""
        count = mask.sum().float()
        for ours, theirs in _TRL_METRICS.items():
            if ours not in metrics:
                continue
            local = torch.as_tensor(metrics[ours], dtype=torch.float32, device=count.device)
            totals = self.accelerator.reduce(torch.stack([local * count, count]), reduction="sum")
            self._metrics[mode][theirs].append((totals[0] / totals[1].clamp(min=1.0)).item())


def _check_supported(trainer: GRPOTrainer) -> None:
    """Refuse the GRPOConfig options whose TRL semantics the fused loss does not reproduce."""
    args = trainer.args
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for FusedGRPOTrainer, got {trainer.loss_type!r}"
        )
    refused = {
        "importance_sampling_level": trainer.importance_sampling_level != "token",
        "delta": args.delta is not None,
        "off_policy_mask_threshold": trainer.off_policy_mask_threshold is not None,
        "vllm_importance_sampling_correction": trainer.use_vllm and trainer.vllm_importance_sampling_correction,
        "entropy_coef": trainer.entropy_coef != 0.0,
        "use_adaptive_entropy": trainer.use_adaptive_entropy,
        "router_aux_loss_coef": trainer.aux_loss_enabled,
    }
    names = [name for name, is_set in refused.items() if is_set]
    if names:
        raise ValueError(f"FusedGRPOTrainer does not support these GRPOConfig options as set: {names}")
    text_config = trainer.model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1.0):
            raise ValueError(f"FusedGRPOTrainer does not support models that transform their logits ({name} is set)")


def _head_operands(hidden: torch.Tensor, head: torch.nn.Module, fp32: bool):
    """hidden, weight, bias in one dtype for the fused op, as the LM head's matmul would see them.

    Under autocast the LM head would run in the autocast dtype; with `cast_lm_head_to_fp32` in float32.
    FSDP2 shards the head as DTensors: the fused op needs the full weight, as TRL's head does.
    """
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    if fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = weight.dtype
    hidden = hidden.to(device=weight.device, dtype=dtype)
    return hidden, weight.to(dtype), None if bias is None else bias.to(dtype)


def _add_fusedrl_forward(model: torch.nn.Module, temperature: float, fp32: bool) -> None:
    """Patch `model.forward` so that TRL's fused calls run on fusedrl's ops.

    - `fused_lm_head=True` (TRL's call for old and reference log-probs): the backbone runs, then
      `linear_logprobs_and_entropy` scores each next-token label that is not -100.
    - `fusedrl_hidden_states=True`: only the backbone runs; its final hidden states come back, for the
      trainer's fused loss.
    - Otherwise (generation): the forward it replaces, unchanged.
    """
    previous_forward = model.forward

    # Keep the signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, fusedrl_hidden_states=False, labels=None, **kwargs):
        if not (fused_lm_head or fusedrl_hidden_states):
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if fusedrl_hidden_states:
            return BaseModelOutput(last_hidden_state=hidden)
        hidden, weight, bias = _head_operands(hidden[:, :-1], self.get_output_embeddings(), fp32)
        labels = labels[:, 1:].to(weight.device)
        log_probs, entropy = linear_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=-100
        )
        return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy, label_mask=labels != -100)

    model.forward = types.MethodType(forward, model)
