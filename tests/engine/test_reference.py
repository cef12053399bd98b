"""The reference model's EMA update: the formula exactly, in place, without autograd."""

import copy

import pytest
import torch
from torch import nn

from fusedrl.engine.reference import ema_update_, master_copies


def _pair(dtype=torch.float64):
    policy = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return reference, policy


def test_ema_update_is_the_convex_combination():
    reference, policy = _pair()
    before = [r.clone() for r in reference.parameters()]
    ids = [id(r) for r in reference.parameters()]
    eta = 0.25
    ema_update_(reference, policy, eta)
    for r0, r, p in zip(before, reference.parameters(), policy.parameters()):
        # float64 against the float64 formula: only the two roundings of mul and add may differ.
        torch.testing.assert_close(r, (1 - eta) * r0 + eta * p.detach(), rtol=0, atol=1e-15)
        assert r.grad is None and not r.requires_grad
    assert [id(r) for r in reference.parameters()] == ids


def test_ema_update_repeated_matches_closed_form():
    reference, policy = _pair()
    r0 = [r.clone() for r in reference.parameters()]
    eta, steps = 0.1, 7
    for _ in range(steps):
        ema_update_(reference, policy, eta)
    decay = (1 - eta) ** steps
    for a, r, p in zip(r0, reference.parameters(), policy.parameters()):
        torch.testing.assert_close(r, decay * a + (1 - decay) * p.detach(), rtol=0, atol=1e-14)


def test_eta_zero_keeps_reference_bit_identical_and_eta_one_copies_policy():
    reference, policy = _pair(torch.float32)
    before = [r.clone() for r in reference.parameters()]
    ema_update_(reference, policy, 0.0)
    assert all(torch.equal(a, r) for a, r in zip(before, reference.parameters()))
    ema_update_(reference, policy, 1.0)
    assert all(torch.equal(r, p) for r, p in zip(reference.parameters(), policy.parameters()))


def test_lower_precision_reference_takes_the_policy_cast():
    reference, policy = _pair(torch.float32)
    reference = reference.to(torch.bfloat16)
    before = [r.clone() for r in reference.parameters()]
    ema_update_(reference, policy, 0.5)
    for a, r, p in zip(before, reference.parameters(), policy.parameters()):
        assert r.dtype == torch.bfloat16
        # Three bf16 roundings (cast of p, product, sum), each within 2^-8 of its operands' size.
        error = (r.float() - (0.5 * a.float() + 0.5 * p.detach())).abs()
        assert (error <= 2 ** -7 * (a.float().abs() + p.detach().abs())).all()


def test_a_bf16_reference_follows_the_average_through_fp32_copies():
    """A policy a little way from its reference, as in RL: at eta = 0.001 a bf16 reference updated in
    place never moves (each step is a thousandth of a few bf16 spacings); with fp32 master copies it
    holds the rounding of the average (after 300 steps 26% of the way to the policy)."""
    g = torch.Generator().manual_seed(0)
    reference = nn.Linear(16, 8)
    with torch.no_grad():
        for p in reference.parameters():  # magnitudes in [0.02, 0.1], away from zero's fine bf16 spacing
            p.copy_((0.02 + 0.08 * torch.rand(p.shape, generator=g)) * torch.randn(p.shape, generator=g).sign())
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    reference, policy = reference.to(torch.bfloat16).requires_grad_(False), policy.to(torch.bfloat16)
    start = {name: r.clone() for name, r in reference.named_parameters()}
    in_place = copy.deepcopy(reference)
    master = master_copies(reference)
    assert set(master) == set(start)
    eta, steps = 0.001, 300
    for _ in range(steps):
        ema_update_(reference, policy, eta, master=master)
        ema_update_(in_place, policy, eta)
    decay = (1 - eta) ** steps
    for name, r in reference.named_parameters():
        assert torch.equal(dict(in_place.named_parameters())[name], start[name])
        exact = decay * start[name].double() + (1 - decay) * dict(policy.named_parameters())[name].detach().double()
        # 300 fp32 steps, each rounding at most 2^-24 * 0.1: 2e-6, under 1% of the distance moved (2.6e-4).
        torch.testing.assert_close(master[name].double(), exact, rtol=0, atol=2e-6)
        assert torch.equal(r, master[name].to(torch.bfloat16))
        assert not torch.equal(r, start[name])
    assert master_copies(policy.float()) == {}


def test_bad_inputs_name_the_problem():
    reference, policy = _pair()
    with pytest.raises(ValueError, match="eta"):
        ema_update_(reference, policy, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(reference, nn.Linear(4, 3).double(), 0.1)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with pytest.raises(ValueError, match="shape"):
        ema_update_(reference, other, 0.1)
