"""Group-relative advantages and the DAPO reward shaping (docs/algorithms.md section 4).

Rewards arrive as one flat tensor [P * G] where rows i*G .. i*G+G-1 are the G responses to prompt i.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps), or r_i - mean_g r without the std (Dr. GRPO).

    The std is the sample std (Bessel-corrected), as TRL's GRPOTrainer computes it.
    """
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if normalize_std:
        if group_size < 2:
            raise ValueError("group_size: std normalisation needs groups of at least 2")
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling: a per-response bool, False for every response of a group whose rewards
    are all equal (its advantages are all zero, so it only dilutes the batch)."""
    groups = _grouped(rewards, group_size)
    varied = (groups != groups[:, :1]).any(1)
    return varied.repeat_interleave(group_size)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a value <= 0 to add to each reward.

    0 up to max_length - buffer tokens, then falling linearly to -penalty at max_length (and staying
    there beyond it). buffer = 0 turns it off.
    """
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0, max=buffer)
    return -penalty * excess / buffer


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor whose length is a multiple of group_size "
                         f"({group_size}); got shape {tuple(rewards.shape)}")
    return rewards.float().reshape(-1, group_size)
