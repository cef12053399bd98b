"""The output layer as the fused ops take it, one way for every integration (TRL, verl).

The fused ops score tokens from the final hidden states and the output embedding: they compute
softmax(h W^T + b) / T and nothing else. A model whose logits go through more than that (a soft cap,
a scale) would be scored wrongly, so such models are refused, from one list.
"""

from __future__ import annotations

import torch

# Config attributes (of the text config) that transform the logits after the output embedding, as
# Gemma 2/3 (final_logit_softcapping), Cohere (logit_scale), Granite (logits_scaling) and the muP-style
# models (output_multiplier, lm_head_multiplier) name them. A value of None or 1.0 leaves them alone.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
)


def check_plain_logits(model: torch.nn.Module, who: str) -> None:
    """Raise a ValueError naming the attribute when the model transforms its logits (see LOGIT_TRANSFORMS)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) not in (None, 1.0):
            raise ValueError(f"{who} does not support models that transform their logits ({name} is set)")


def head_operands(hidden: torch.Tensor, head: torch.nn.Module, fp32: bool = False):
    """hidden, weight, bias in one dtype for the fused op, as the output layer's matmul would see them.

    Under autocast the output layer would run in the autocast dtype; with `fp32` (TRL's
    `cast_lm_head_to_fp32`) in float32; else in the weight's dtype. FSDP2 shards the layer as
    DTensors: the fused op needs the full weight, as the layer's own forward does.
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
