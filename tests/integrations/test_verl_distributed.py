"""fusedrl's verl losses on two gloo ranks (real processes) against one process on the whole batch.

verl's actor loss on each data-parallel rank divides by the global batch's token count and multiplies
by dp_size, and the ranks' gradients are averaged: so the ranks' mean loss, and each rank's gradient
halved, must equal one process's loss and gradient on the concatenated batch, when the batch
statistics (entropy quantile, covariance centring, Clip-Cov's candidates, KL-Cov's top-k) span both
ranks. Each rank calls verl's ppo_loss with its dp_group, as verl's FSDP engine does.
"""

from __future__ import annotations

import pytest
import torch
from _verl_data import actor_config, batch, micro_batch, require_verl
from spawn_helpers import run_ranks

require_verl()

ROWS = 8
CASES = {
    "top_entropy": ("fusedrl_vanilla", dict(top_entropy_fraction=0.25)),
    "kl_cov": ("fusedrl_kl_cov", dict(kl_cov_ratio=0.05, ppo_kl_coef=0.7)),
    # Every candidate drawn (ratio 1): the same set on one process and on two.
    "clip_cov_top_entropy": ("fusedrl_clip_cov", dict(clip_cov_ratio=1.0, clip_cov_lb=0.2, top_entropy_fraction=0.5)),
}


def _whole_batch():
    old, lp, adv, entropy, mask = batch(ROWS, 10, seed=11)
    # The second rank's tokens are the more uncertain: a per-rank entropy quantile would pick others.
    entropy[ROWS // 2 :] += 1.0
    return old, lp.detach(), adv, entropy, mask


def rank_loss(rows, case, dp_size, *, process_group):
    """This rank's ppo_loss and its gradient on rows `rows` of the whole batch, its statistics over
    `process_group` (None: this process alone)."""
    import verl.workers.utils.losses as losses

    old, lp, adv, entropy, mask = (t[rows] for t in _whole_batch())
    lp = lp.clone().requires_grad_()
    loss_mode, options = CASES[case]
    output, data = micro_batch(old, lp, adv, entropy, mask, prompt_lengths=torch.full((mask.shape[0],), 3),
                               nested_prompts=True, dp_size=dp_size, batch_num_tokens=int(_whole_batch()[-1].sum()),
                               global_batch_size=ROWS)
    loss, _ = losses.ppo_loss(actor_config(loss_mode, **options), output, data, dp_group=process_group)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


@pytest.mark.distributed
def test_statistics_span_both_ranks():
    halves = [slice(0, ROWS // 2), slice(ROWS // 2, ROWS)]
    results = run_ranks(2, [(rank_loss, [(rows, case, 2) for rows in halves], {}) for case in CASES])
    for case, per_rank in zip(CASES, results, strict=True):
        whole_loss, whole_grad = rank_loss(slice(None), case, 1, process_group=None)
        losses, grads = zip(*per_rank)
        torch.testing.assert_close(sum(losses) / 2, whole_loss, rtol=1e-12, atol=1e-14, msg=case)
        torch.testing.assert_close(torch.cat(grads) / 2, whole_grad, rtol=1e-12, atol=1e-14, msg=case)
        # Alone, the halves select other tokens: the test tells batch-wide from per-rank statistics.
        alone = sum(rank_loss(rows, case, 2, process_group=None)[0] for rows in halves) / 2
        assert not torch.allclose(alone, whole_loss, rtol=1e-9), case
