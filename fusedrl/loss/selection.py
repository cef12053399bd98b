"""Selection: the batch-wide token masks of a whole batch, made once and cut into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Selection:
    """The batch-wide token masks of a whole batch, made by FusedPolicyLoss.select.

    high_entropy: [B, T] bool, the top-entropy tokens (None when top_entropy_fraction is 1).
    covariance: [B, T] bool, the tokens Clip-Cov drops or KL-Cov penalises (None without cov_mode).
    covariance_values: [B, T] float64, each token's covariance centred over the batch, 0 on padding
        (None without cov_mode); the loss reports its mean and max.
    probability: [B, T] bool, SPO's probability mask (None without prob_mask_threshold).
    valid_count, selected_count: 0-dim int64, the batch's valid tokens and the tokens every mask keeps,
        summed over the process group when the loss has one (the batch spans the ranks);
        global_selected_count: selected_count summed over the process group (the same tensor with one).
        Made only when the loss divides by them (normalize_by "selected" with dapo or bnpo), else None.
    """

    high_entropy: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    covariance_values: torch.Tensor | None = None
    probability: torch.Tensor | None = None
    valid_count: torch.Tensor | None = None
    selected_count: torch.Tensor | None = None
    global_selected_count: torch.Tensor | None = None

    def rows(self, index, length: int | None = None) -> Selection:
        """The selection of rows `index` (anything that indexes dim 0), cut to the first `length` columns
        (a micro-batch whose trailing all-padding columns were trimmed); the counts stay the batch's."""
        def cut(t):
            return None if t is None else t[index][:, :length]
        return replace(self, high_entropy=cut(self.high_entropy), covariance=cut(self.covariance),
                       covariance_values=cut(self.covariance_values), probability=cut(self.probability))
