"""TEMP stand-in for the fused linear op (issue 3): plain PyTorch, same signature, materialises logits."""

import torch


def linear_logprobs_and_entropy(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                backend="auto"):
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    ignored = targets == ignore_index
    safe = targets.masked_fill(ignored, 0)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)
