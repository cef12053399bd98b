"""SPO's probability mask (docs/algorithms.md section 5): only tokens the rollout policy found unlikely.

Tokens the old policy sampled with probability at least `threshold` carry little learning signal; SPO
keeps the loss on the others. A plain elementwise op: no batch statistic, so no process group.
"""

from __future__ import annotations

import torch

from fusedrl.kernels._checks import FLOAT_DTYPES, check_float, check_fraction, check_same_device
from fusedrl.kernels.top_entropy_mask import check_mask


def probability_mask(old_logprobs: torch.Tensor, mask: torch.Tensor, *, threshold: float = 0.9) -> torch.Tensor:
    """Valid tokens with exp(old_logprobs) < threshold.

    Args:
        old_logprobs: float tensor of any shape, the rollout policy's log-probs of the sampled tokens.
        mask: same shape; nonzero marks a valid token.
        threshold: rho in (0, 1]; SPO uses 0.9. 1.0 keeps every token the policy was not certain of.

    Returns a bool tensor of old_logprobs' shape; the probability is taken in float64.
    """
    check_float("old_logprobs", old_logprobs, FLOAT_DTYPES + (torch.float64,))
    valid = check_mask("mask", mask, old_logprobs.shape)
    check_same_device(old_logprobs=old_logprobs, mask=mask)
    rho = check_fraction("threshold", threshold)
    return valid & (old_logprobs.detach().to(torch.float64).exp() < rho)
