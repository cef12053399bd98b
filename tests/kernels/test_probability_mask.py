"""probability_mask: SPO's valid & exp(old_lp) < rho."""

from __future__ import annotations

import math

import pytest
import torch

from fusedrl.kernels import probability_mask


def test_hand_worked():
    old = torch.log(torch.tensor([[0.95, 0.91, 0.5, 0.89, 0.01, 0.99]]))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert probability_mask(old, mask, threshold=0.9).tolist() == [[False, False, True, True, True, False]]
    assert probability_mask(old, mask, threshold=1.0).tolist() == [[True] * 5 + [False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_random_against_float64_rule(dtype):
    old = (-torch.rand(4, 33) * 0.3).to(dtype)
    mask = torch.rand(4, 33) < 0.7
    want = mask & (old.double().exp() < 0.9)
    got = probability_mask(old, mask.int(), threshold=0.9)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert 0 < int(got.sum()) < int(mask.sum())


def test_padding_is_never_selected():
    old = torch.full((2, 3), -math.inf)
    assert not probability_mask(old, torch.zeros(2, 3)).any()


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, "high"])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        probability_mask(torch.zeros(2, 2), torch.ones(2, 2), threshold=threshold)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="mask"):
        probability_mask(torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="old_logprobs"):
        probability_mask(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))


def test_inputs_on_two_devices_name_the_argument(fake_gpu):
    with pytest.raises(ValueError, match="mask on cpu"):
        probability_mask(torch.zeros(2, 2, device=fake_gpu.DEVICE), torch.ones(2, 2))
