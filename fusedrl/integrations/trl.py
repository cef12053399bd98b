"""`FusedGRPOTrainer`: TRL's GRPOTrainer with its loss computed by fusedrl's `FusedPolicyLoss`.

It is a one-line change for a TRL user: the constructor and `GRPOConfig` are TRL's own. What changes:

- The training loss runs through `FusedPolicyLoss` on the fused linear path: the model's final hidden
  states and its output embedding go in, and log-probabilities and entropies of the completion tokens
  come out of one streaming pass over the vocabulary. The `[tokens x vocab]` logits never exist.
- The rollout-time ("old") and reference log-probabilities that TRL computes between generation and
  training come from fusedrl's `linear_logprobs_and_entropy` too (TRL asks the model for them with
  `fused_lm_head=True`; this trainer answers that call with fusedrl's op).
- `top_entropy_quantile` (TRL 1.16.0 supports it on its own fused LM head too). TRL keeps the tokens whose entropy is
  at least `torch.quantile(valid_entropies, 1 - top_entropy_quantile)` (the valid tokens of the current
  micro-batch on every process) and normalises by all valid tokens; that is exactly
  `FusedPolicyLoss(top_entropy_fraction=top_entropy_quantile, normalize_by="valid")` with the world group.

Honoured `GRPOConfig` fields: `loss_type` (every one TRL 1.16 has: grpo, bnpo, dr_grpo, dapo, luspo,
cispo, sapo, vespo), `importance_sampling_level` (token, sequence: GSPO), `epsilon`, `epsilon_high`
(CISPO's cap under cispo, as TRL), `delta` (the two-sided clip; it must exceed 1 + epsilon_high, where
it is `FusedPolicyLoss(dual_clip=delta)`), `sapo_temperature_pos` / `_neg`, `vespo_k_pos` /
`_lambda_pos` / `_k_neg` / `_lambda_neg`, `beta` (k3 estimator, as TRL), `use_bias_correction_kl`
(TRL's default True: the per-token KL is multiplied by the importance ratio, gradient included;
`FusedPolicyLoss(kl_importance_weighted=True)`), `temperature`, `top_entropy_quantile`,
`max_completion_length` (dr_grpo), `off_policy_mask_threshold` (DeepSeek-V3.2's off-policy sequence
mask, on vLLM's sampling log-probs where present), vLLM's `importance_sampling_ratio` when
`vllm_importance_sampling_correction` is on (`rollout_is_weights=`), and the gradient-accumulation
scaling of each loss type. Options whose TRL semantics the fused loss does not reproduce are refused
at construction with a ValueError naming the option.

Logged metrics are TRL's, under its names and with its reductions over processes: `entropy`, `kl`
(when beta > 0), and per loss type `clip_ratio/low_mean`, `clip_ratio/high_mean`,
`clip_ratio/region_mean` (token- or, with a sequence-level weight, response-weighted means),
`clip_ratio/low_min`, `clip_ratio/high_max` (the extreme response over all processes), or
`cispo_clip_ratio`, or `vespo/phi_seq_mean`. The loss hands them over as 0-dim device tensors; they
are reduced and read back once per call, here.
"""

from __future__ import annotations

import functools
import types

import torch

try:
    from accelerate.utils import is_peft_model
    from transformers.modeling_outputs import BaseModelOutput
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as err:  # pragma: no cover - exercised only where trl is absent
    raise ImportError(
        "fusedrl.integrations.trl needs TRL (and transformers, accelerate). Install it with "
        "`pip install 'fusedrl[trl]'` or `pip install trl`."
    ) from err

from fusedrl.integrations._output_layer import check_plain_logits, head_operands
from fusedrl.loss import FusedPolicyLoss
from fusedrl.loss.options import CLIP_LOSS_TYPES, LOSS_TYPES
from fusedrl.kernels import linear_logprobs_and_entropy

__all__ = ["FusedGRPOTrainer"]

SUPPORTED_LOSS_TYPES = LOSS_TYPES

# FusedPolicyLoss metric -> TRL metric name: means over the valid tokens (or rows, see
# `_per_response_metrics`) of the micro-batch, re-weighted by that count across processes before
# logging, as TRL's `global_masked_mean` does.
_TRL_MEANS = {
    "entropy/mean": "entropy",
    "kl": "kl",
    "clip_ratio/low_mean": "clip_ratio/low_mean",
    "clip_ratio/high_mean": "clip_ratio/high_mean",
    "clip_ratio/region_mean": "clip_ratio/region_mean",
    "clip_ratio/cispo_mean": "cispo_clip_ratio",
    "vespo/phi_mean": "vespo/phi_seq_mean",
}
# Per-response extremes of the micro-batch, reduced over processes with nanmin / nanmax as TRL does.
_TRL_EXTREMES = {
    "clip_ratio/low_min": ("clip_ratio/low_min", nanmin),
    "clip_ratio/high_max": ("clip_ratio/high_max", nanmax),
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
            importance_sampling_level=self.importance_sampling_level,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            **_objective_options(self),
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
            hidden, weight, bias = head_operands(hidden, head, self.args.cast_lm_head_to_fp32)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items_in_batch = None
        if self.fused_loss.aggregation == "dapo":
            # As TRL: `num_items_in_batch` spans the generation batch on all processes; rescale it to one
            # accumulation window on this process.
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items_in_batch = num_items_in_batch * accumulation / self.args.steps_per_generation

        # As TRL: the off-policy mask reads vLLM's sampling log-probs where there are some.
        sampling_logprobs = None
        if self.off_policy_mask_threshold is not None:
            sampling_logprobs = inputs.get("sampling_per_token_logps")
        rollout_is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # [B, T] in TRL's token_* modes, [B, 1] in its sequence_* modes.
            rollout_is_weights = inputs["importance_sampling_ratio"]
            if rollout_is_weights.dim() == 2 and rollout_is_weights.shape[1] == 1:
                rollout_is_weights = rollout_is_weights[:, 0]

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
            rollout_is_weights=rollout_is_weights,
            sampling_logprobs=sampling_logprobs,
        )
        if self.fused_loss.aggregation != "dapo":
            loss = loss / accumulation
        self._log_fused_metrics(mode, metrics, mask, self._per_response_metrics(inputs["advantages"]))
        return loss

    def _per_response_metrics(self, advantages: torch.Tensor) -> set[str]:
        """The means TRL takes over rows rather than tokens: those of a per-response weight (a sequence
        level's clip statistics, VESPO's phi) when the advantages are per response too."""
        if advantages.dim() != 1:
            return set()
        rows = {"vespo/phi_mean"}
        if self.importance_sampling_level != "token":
            rows |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/cispo_mean"}
        return rows

    def _log_fused_metrics(self, mode: str, metrics: dict, mask: torch.Tensor, per_response: set[str]) -> None:
        """TRL's metrics from the loss's local ones: means re-weighted over all processes, extremes
        gathered; one reduce and one gather per call."""
        means = [name for name in _TRL_MEANS if name in metrics]
        tokens, rows = mask.sum().float(), torch.tensor(float(mask.shape[0]), device=mask.device)
        counts = [rows if name in per_response else tokens for name in means]
        local = torch.stack([torch.stack([metrics[name].to(tokens.device) * c, c]) for name, c in zip(means, counts)])
        totals = self.accelerator.reduce(local, reduction="sum")
        for name, value in zip(means, (totals[:, 0] / totals[:, 1].clamp(min=1.0)).tolist()):
            self._metrics[mode][_TRL_MEANS[name]].append(value)
        extremes = [name for name in _TRL_EXTREMES if name in metrics]
        if extremes:
            local = torch.stack([metrics[name].to(tokens.device) for name in extremes])
            gathered = self.accelerator.gather(local[None])
            for i, name in enumerate(extremes):
                theirs, reduce = _TRL_EXTREMES[name]
                self._metrics[mode][theirs].append(reduce(gathered[:, i]).item())


def _check_supported(trainer: GRPOTrainer) -> None:
    """Refuse the GRPOConfig options whose TRL semantics the fused loss does not reproduce."""
    args = trainer.args
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for FusedGRPOTrainer, got {trainer.loss_type!r}"
        )
    clips = trainer.loss_type in CLIP_LOSS_TYPES
    if args.delta is not None and clips and not args.delta > 1.0 + trainer.epsilon_high:
        # Above 1 + epsilon_high TRL's min(ratio, delta) only caps the A < 0 side: fusedrl's dual clip.
        raise ValueError(
            f"delta must be above 1 + epsilon_high ({1.0 + trainer.epsilon_high}) for FusedGRPOTrainer, got {args.delta}"
        )
    refused = {
        "entropy_coef": trainer.entropy_coef != 0.0,
        "use_adaptive_entropy": trainer.use_adaptive_entropy,
        "router_aux_loss_coef": trainer.aux_loss_enabled,
    }
    names = [name for name, is_set in refused.items() if is_set]
    if names:
        raise ValueError(f"FusedGRPOTrainer does not support these GRPOConfig options as set: {names}")
    check_plain_logits(trainer.model, "FusedGRPOTrainer")


def _objective_options(trainer: GRPOTrainer) -> dict:
    """The FusedPolicyLoss options of TRL's loss type, as TRL reads them from GRPOConfig."""
    args = trainer.args
    if trainer.loss_type in CLIP_LOSS_TYPES:
        return {"dual_clip": args.delta}  # TRL applies delta in the clip loss types only
    if trainer.loss_type == "cispo":
        return {"cispo_max_weight": trainer.epsilon_high}
    if trainer.loss_type == "sapo":
        return {"sapo_temperature_pos": args.sapo_temperature_pos, "sapo_temperature_neg": args.sapo_temperature_neg}
    return {"vespo_k_pos": args.vespo_k_pos, "vespo_lambda_pos": args.vespo_lambda_pos,
            "vespo_k_neg": args.vespo_k_neg, "vespo_lambda_neg": args.vespo_lambda_neg}


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
        hidden, weight, bias = head_operands(hidden[:, :-1], self.get_output_embeddings(), fp32)
        labels = labels[:, 1:].to(weight.device)
        log_probs, entropy = linear_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=-100
        )
        return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy, label_mask=labels != -100)

    model.forward = types.MethodType(forward, model)
