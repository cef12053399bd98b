"""Group advantages, dynamic sampling and overlong shaping on hand-worked cases."""

import math

import pytest
import torch

from fusedrl.engine.advantages import group_advantages, informative_groups, overlong_penalty


def test_grpo_advantage_hand_worked():
    # Group 1: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt((4 * 0.25) / 3) = sqrt(1/3).
    # Group 2: 3, 1, 2, 2 -> mean 2, sample std sqrt((1 + 1 + 0 + 0) / 3) = sqrt(2/3).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    eps = 1e-4
    s1, s2 = math.sqrt(1 / 3) + eps, math.sqrt(2 / 3) + eps
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 1 / s2, -1 / s2, 0.0, 0.0]
    got = group_advantages(rewards, 4, normalize_std=True, eps=eps)
    assert got.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_equal_rewards_give_zero_advantage():
    got = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3, eps=1e-4)
    assert got.tolist() == [0.0] * 6


def test_dr_grpo_advantage_is_mean_centred_only():
    # Group 1: 2, 0, 1 -> mean 1; group 2: 0.5, 0.5, 2 -> mean 1.
    got = group_advantages(torch.tensor([2.0, 0.0, 1.0, 0.5, 0.5, 2.0]), 3, normalize_std=False)
    assert got.tolist() == pytest.approx([1.0, -1.0, 0.0, -0.5, -0.5, 1.0], abs=1e-7)


def test_group_of_one_without_std():
    assert group_advantages(torch.tensor([0.3, 0.9]), 1, normalize_std=False).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([0.3, 0.9]), 1, normalize_std=True)


def test_rewards_not_a_multiple_of_group_size():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_dynamic_sampling_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0,   # varied: kept
                            1.0, 1.0, 1.0, 1.0,   # all correct: dropped
                            0.0, 0.0, 0.0, 0.0,   # all wrong: dropped
                            0.5, 0.5, 0.5, 0.25])  # varied in the last response only: kept
    keep = informative_groups(rewards, 4)
    assert keep.tolist() == [True] * 4 + [False] * 8 + [True] * 4


def test_overlong_penalty_hand_worked():
    # max 10 tokens, buffer 4: free up to 6 tokens, then -penalty * (L - 6) / 4.
    lengths = torch.tensor([3, 6, 7, 8, 10])
    got = overlong_penalty(lengths, max_length=10, buffer=4, penalty=0.5)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5])


def test_overlong_penalty_off():
    assert overlong_penalty(torch.tensor([10, 64]), max_length=64, buffer=0).tolist() == [0.0, 0.0]
