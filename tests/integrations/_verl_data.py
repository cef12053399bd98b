"""Batches for the verl tests, in float64, and verl's own config and micro-batch structures built from them.

The tests import verl through `require_verl()`: the main suite skips them where verl is not installed;
scripts/test_verl.sh sets FUSEDRL_TEST_VERL=1, which turns a missing verl into an error, so that its run
can never pass by skipping.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch


def require_verl():
    if os.environ.get("FUSEDRL_TEST_VERL") == "1":
        return importlib.import_module("verl")
    return pytest.importorskip("verl", reason="verl is not installed: scripts/test_verl.sh runs these tests")


def batch(rows: int, cols: int, seed: int, min_length: int = 5):
    """old lp, lp (a leaf that requires grad), per-response advantages [B, T], entropy and a right-padded
    mask with ragged lengths; lp is old lp moved by 0.5 N(0, 1), so that both clip edges and the dual
    clip of actor_config (ratio > 2 with A < 0) are reached."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3
    lp = (old + 0.5 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).contiguous()
    entropy = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(min_length, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols) < lengths[:, None]
    return old, lp, adv, entropy, mask


def actor_config(loss_mode: str, loss_agg_mode: str = "token-mean", **policy_loss):
    """verl's FSDP actor config (its own dataclass) with fusedrl's policy-loss config; clip-higher and a
    dual clip at 2 (verl's default 3 is rarely reached by a small batch)."""
    from verl.workers.config import FSDPActorConfig

    from fusedrl.integrations.verl import PolicyLossConfig

    return FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.28,
        clip_ratio_c=2.0,
        loss_agg_mode=loss_agg_mode, calculate_entropy=True,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
    )  # fmt: skip


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def micro_batch(old, lp, adv, entropy, mask, *, prompt_lengths, nested_prompts: bool, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
    """(model_output, data) as verl's FSDP engine hands them to `ppo_loss` for one micro-batch.

    The model output is packed, one value per token of prompt + response (no padding), as a nested
    tensor; the response's log-prob of token t sits at the position before it. The prompts are nested
    (verl's no-padding layout) or left-padded with an attention mask (its padded layout). Off the
    responses the packed values are junk that must never be read.
    """
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    rows = mask.shape[0]
    response_lengths = mask.sum(-1)
    sequence_offsets = _offsets(prompt_lengths + response_lengths)
    row, col = mask.nonzero(as_tuple=True)
    packed_index = sequence_offsets[row] + prompt_lengths[row] - 1 + col

    def packed(values):
        junk = torch.full((int(sequence_offsets[-1]),), 7.0, dtype=values.dtype)
        return torch.nested.nested_tensor_from_jagged(junk.index_put((packed_index,), values[mask]),
                                                      offsets=sequence_offsets)

    fields = {"response_mask": mask.long(), "old_log_probs": old, "advantages": adv}
    if nested_prompts:
        fields["prompts"] = torch.nested.nested_tensor_from_jagged(
            torch.ones(int(prompt_lengths.sum()), dtype=torch.long), offsets=_offsets(prompt_lengths))
        fields["responses"] = torch.nested.nested_tensor_from_jagged(
            torch.ones(int(response_lengths.sum()), dtype=torch.long), offsets=_offsets(response_lengths))
    else:
        width = int(prompt_lengths.max())
        prompt_mask = torch.arange(width).flip(0) < prompt_lengths[:, None]  # left-padded
        fields["prompts"] = torch.ones(rows, width, dtype=torch.long)
        fields["responses"] = torch.ones_like(mask, dtype=torch.long)
        fields["attention_mask"] = torch.cat([prompt_mask, mask], dim=1).long()
    data = TensorDict(fields, batch_size=[rows])
    # max_response_len: the padded width, as verl's left_right_2_no_padding records it.
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                         max_response_len=mask.shape[1])
    return {"log_probs": packed(lp), "entropy": packed(entropy)}, data
