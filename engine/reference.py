"""The reference model's exponential moving average toward the policy.

Xu et al. 2024 (docs/algorithms.md section 4) found that letting the KL reference follow the policy slowly,
ref <- (1 - eta) ref + eta policy after every optimizer step (eta = 0.001), is one of the three changes
that made PPO beat DPO. eta = 0 keeps the reference frozen.

A bf16 reference cannot follow that average by itself: each step moves it by eta times its distance to
the policy, a small fraction of one bf16 spacing, which rounds away (at eta = 0.001 the reference
stays exactly where it started). With 16-bit parameters the average is kept in fp32 master copies
(`master_copies`) and the reference holds their rounding.
"""

import torch
from torch import nn


def master_copies(reference: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the reference's 16-bit parameters, by name, for ema_update_'s `master`."""
    return {name: p.detach().float() for name, p in reference.named_parameters() if p.dtype != torch.float32}


@torch.no_grad()
def ema_update_(reference: nn.Module, policy: nn.Module, eta: float,
                master: dict[str, torch.Tensor] | None = None) -> None:
    """In place, every parameter of `reference`: ref <- (1 - eta) * ref + eta * policy.

    The two models must have the same parameter names and shapes; the policy's values are cast to the
    reference's dtype. With `master` (from master_copies), the parameters it names are averaged in its
    fp32 copies and the reference takes their rounding. eta = 0 returns without touching the reference,
    so a frozen one stays bit-identical.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    ref_params = dict(reference.named_parameters())
    pol_params = dict(policy.named_parameters())
    if ref_params.keys() != pol_params.keys():
        missing = sorted(ref_params.keys() ^ pol_params.keys())[:3]
        raise ValueError(f"reference and policy have different parameters, e.g. {missing}")
    for name, p in pol_params.items():
        if ref_params[name].shape != p.shape:
            raise ValueError(f"parameter {name!r}: reference shape {tuple(ref_params[name].shape)} "
                             f"!= policy shape {tuple(p.shape)}")
    if eta == 0.0:
        return
    master = master or {}
    for name, ref in ref_params.items():
        average = master.get(name, ref)
        average.mul_(1.0 - eta).add_(pol_params[name].detach().to(average.dtype), alpha=eta)
        if average is not ref:
            ref.copy_(average)
