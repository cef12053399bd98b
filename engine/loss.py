"""TEMP stand-in for FusedPolicyLoss (issue 4): plain PyTorch, same constructor and call signature.

Covers what the engine exercises; Clip-Cov / KL-Cov are not in the stand-in.
"""

import torch
from torch import nn

from fusedrl.kernels import linear_logprobs_and_entropy


class FusedPolicyLoss(nn.Module):
    def __init__(self, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, beta=0.0,
                 kl_estimator="k3", entropy_coef=0.0, top_entropy_fraction=1.0, prob_mask_threshold=None,
                 cov_mode=None, cov_ratio=2e-4, cov_lower=1.0, cov_upper=5.0, kl_cov_coef=1.0,
                 normalize_by="valid", max_completion_length=None, temperature=1.0):
        super().__init__()
        if cov_mode is not None:
            raise NotImplementedError("the stand-in loss has no Clip-Cov / KL-Cov")
        self.__dict__.update({k: v for k, v in locals().items() if k not in ("self", "__class__")})

    def forward(self, completion_ids, completion_mask, advantages, *, logits=None, hidden=None, weight=None,
                bias=None, old_logprobs=None, ref_logprobs=None, num_items_in_batch=None):
        if logits is not None:
            z = logits.float() / self.temperature
            logp_all = torch.log_softmax(z, -1)
            lp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            lp, entropy = linear_logprobs_and_entropy(hidden, weight, completion_ids, bias=bias,
                                                      temperature=self.temperature)
        mask = completion_mask.bool()
        m = mask.float()
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(lp)
        olp = lp.detach() if old_logprobs is None else old_logprobs
        ratio = torch.exp(lp - olp)
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        if self.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * self.dual_clip), pg)
        select = mask.clone()
        metrics = {}
        if self.top_entropy_fraction < 1.0:
            tau = torch.quantile(entropy.detach()[mask], 1 - self.top_entropy_fraction)
            top = mask & (entropy.detach() >= tau)
            select &= top
            metrics["mask/top_entropy"] = top.sum() / m.sum()
        if self.prob_mask_threshold is not None:
            low = mask & (olp.exp() < self.prob_mask_threshold)
            select &= low
            metrics["mask/probability"] = low.sum() / m.sum()
        per_token = pg * select.float()
        if self.beta:
            d = ref_logprobs - lp
            kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[self.kl_estimator]
            per_token = per_token + self.beta * kl
            metrics["kl"] = (kl.detach() * m).sum() / m.sum()
        if self.entropy_coef:
            per_token = per_token - self.entropy_coef * entropy
        denom = select.float() if self.normalize_by == "selected" else m
        if self.loss_type == "grpo":
            loss = ((per_token * m).sum(-1) / denom.sum(-1).clamp(min=1)).mean()
        elif self.loss_type == "dr_grpo":
            loss = (per_token * m).sum() / (lp.shape[0] * self.max_completion_length)
        elif self.loss_type == "dapo" and num_items_in_batch is not None:
            loss = (per_token * m).sum() / num_items_in_batch
        else:
            loss = (per_token * m).sum() / denom.sum().clamp(min=1)
        low = (ratio < 1 - self.epsilon_low) & (adv < 0) & mask
        high = (ratio > 1 + self.epsilon_high) & (adv > 0) & mask
        metrics["entropy/mean"] = (entropy.detach() * m).sum() / m.sum()
        metrics["clip_ratio/low_mean"] = low.sum() / m.sum()
        metrics["clip_ratio/high_mean"] = high.sum() / m.sum()
        metrics["clip_ratio/region_mean"] = (low | high).sum() / m.sum()
        metrics["loss/pg"] = loss.detach()
        metrics["mask/selected"] = select.sum() / m.sum()
        return loss, {k: v.detach() for k, v in metrics.items()}
