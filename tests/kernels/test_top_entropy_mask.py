"""top_entropy_mask: TRL's rule `valid & (H >= torch.quantile(H[valid], 1 - rho))`, exactly, beyond
torch.quantile's 2^24 limit and across ranks."""

from __future__ import annotations

import pytest
import torch
from spawn_helpers import run_ranks

from fusedrl.kernels import top_entropy_mask
from fusedrl.kernels.top_entropy_mask import entropy_quantile


def quantile_rule(h: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    valid = mask.bool()
    tau = torch.quantile(h[valid], 1 - rho)
    return valid & (h >= tau)


def random_entropies(n: int, kind: int, g: torch.Generator) -> torch.Tensor:
    """Continuous, heavily tied, rounded and CoT-like (most tokens near zero) entropies."""
    if kind == 0:
        return torch.rand(n, generator=g) * 4
    if kind == 1:
        return torch.randint(0, 4, (n,), generator=g).float() * 0.25
    if kind == 2:
        return (torch.rand(n, generator=g) * 3).round(decimals=1)
    return torch.where(torch.rand(n, generator=g) < 0.6, 1e-4 * torch.rand(n, generator=g), torch.rand(n, generator=g) * 2)


def test_hand_worked():
    # q = 0.6: rank 0.6 * 4 = 2.4 between the sorted values 0.5 and 0.7: tau = 0.58
    h = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.7, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert top_entropy_mask(h, mask, top_fraction=0.4).tolist() == [[False, False, False, True, True, False]]
    assert torch.isclose(entropy_quantile(h, mask.bool(), 0.6), torch.tensor(0.58))
    assert top_entropy_mask(h, mask, top_fraction=1.0).tolist() == [[True] * 5 + [False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_quantile_rule_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(7)
    for trial in range(200):
        n = int(torch.randint(1, 400, (), generator=g))
        h = random_entropies(n, trial % 4, g).to(dtype).reshape(1, n)
        mask = torch.rand(1, n, generator=g) < 0.8
        if not mask.any():
            continue
        rho = [0.2, 0.5, 1.0, float(torch.rand((), generator=g)) or 0.3][trial % 4]
        want_tau = torch.quantile(h[mask], 1 - rho)
        got_tau = entropy_quantile(h, mask, 1 - rho)
        assert got_tau.dtype == want_tau.dtype
        assert got_tau.item() == want_tau.item(), (trial, n, rho)
        assert torch.equal(top_entropy_mask(h, mask, top_fraction=rho), quantile_rule(h, mask, rho)), (trial, n, rho)


def test_padding_never_enters():
    g = torch.Generator().manual_seed(3)
    h = torch.rand(4, 50, generator=g)
    mask = torch.rand(4, 50, generator=g) < 0.5
    expected = top_entropy_mask(h, mask, top_fraction=0.2)
    for junk in (float("nan"), float("inf"), -float("inf"), 1e30):
        assert torch.equal(top_entropy_mask(torch.where(mask, h, junk), mask, top_fraction=0.2), expected)


def test_negative_values_and_signed_zero():
    h = torch.tensor([-3.0, -0.0, 0.0, -1e-30, 2.0, -2.0, 1e-30, 5.0])
    mask = torch.ones(8)
    for rho in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        assert torch.equal(top_entropy_mask(h, mask, top_fraction=rho), quantile_rule(h, mask, rho)), rho


def test_nan_and_empty_select_nothing():
    h = torch.tensor([0.1, float("nan"), 0.3])
    assert not top_entropy_mask(h, torch.ones(3), top_fraction=0.5).any()  # torch.quantile gives NaN
    assert not top_entropy_mask(h, torch.zeros(3), top_fraction=0.5).any()


def test_bfloat16_entropies():
    h = torch.rand(3, 40).to(torch.bfloat16)
    mask = torch.ones(3, 40)
    assert torch.equal(top_entropy_mask(h, mask, top_fraction=0.25), quantile_rule(h.float(), mask, 0.25))


@pytest.mark.slow
def test_beyond_two_to_the_24():
    """17M valid tokens with many ties: torch.quantile refuses; the mask equals the exact order statistic."""
    n = (1 << 24) + 4097  # n - 1 divisible by 4 and 8: rho = 0.25 gives an integral rank
    g = torch.Generator().manual_seed(11)
    h = torch.randint(0, 1 << 20, (n + 100,), generator=g).float() * 1e-3
    mask = torch.ones(n + 100, dtype=torch.bool)
    mask[-100:] = False
    h[-100:] = 1e9  # padding above every valid value would shift the quantile if it entered
    with pytest.raises(RuntimeError):
        torch.quantile(h[:n], 0.5)
    ordered = h[:n].sort().values
    for rho in (0.25, 0.3):
        rank = (1 - rho) * (n - 1)
        below = int(rank)
        weight = torch.tensor(rank - below, dtype=torch.float32)
        tau = torch.lerp(ordered[below], ordered[min(below + 1, n - 1)], weight)
        if rho == 0.25:
            assert rank == below and tau == ordered[below]
        got = top_entropy_mask(h, mask, top_fraction=rho)
        assert int(got.sum()) == int((ordered >= tau).sum())
        assert torch.equal(got, mask & (h >= tau))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_equals_concatenated_batch(world_size):
    g = torch.Generator().manual_seed(world_size)
    lengths = [(2, 33), (3, 17), (1, 5)][:world_size]
    parts, masks = [], []
    for r, (b, t) in enumerate(lengths):
        parts.append((torch.rand(b, t, generator=g) * 3).round(decimals=1))
        masks.append(torch.rand(b, t, generator=g) < 0.7 if r != 1 else torch.zeros(b, t, dtype=torch.bool))
    rhos = (0.2, 0.5, 1.0)
    jobs = [(top_entropy_mask, [(h, m) for h, m in zip(parts, masks)], dict(top_fraction=rho)) for rho in rhos]
    results = run_ranks(world_size, jobs)
    flat_h = torch.cat([h.reshape(-1) for h in parts])
    flat_m = torch.cat([m.reshape(-1) for m in masks])
    for rho, per_rank in zip(rhos, results):
        for r, (h, got) in enumerate(zip(parts, per_rank)):
            assert got.shape == h.shape, r
        got = torch.cat([m.reshape(-1) for m in per_rank])
        assert torch.equal(got, quantile_rule(flat_h, flat_m, rho)), rho


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(top_fraction=0.0), "top_fraction"),
        (dict(top_fraction=1.01), "top_fraction"),
        (dict(top_fraction="many"), "top_fraction"),
    ],
)
def test_bad_fraction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        top_entropy_mask(torch.rand(2, 3), torch.ones(2, 3), **kwargs)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="mask"):
        top_entropy_mask(torch.rand(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="entropy"):
        top_entropy_mask(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))


def test_inputs_on_two_devices_name_the_argument(fake_gpu):
    with pytest.raises(ValueError, match="mask on cpu"):
        top_entropy_mask(torch.zeros(2, 3, device=fake_gpu.DEVICE), torch.ones(2, 3))


def test_on_another_device_equals_the_cpu_mask(fake_gpu):
    """Off the CPU the order statistics come from a sort instead of torch.topk: the same tau, bit for bit."""
    device = fake_gpu.DEVICE
    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        h = random_entropies(300, trial % 4, g).reshape(3, 100)
        mask = torch.rand(3, 100, generator=g) < 0.8
        on_device = top_entropy_mask(h.to(device), mask.to(device), top_fraction=0.2)
        assert on_device.device == device
        assert torch.equal(on_device.cpu(), top_entropy_mask(h, mask, top_fraction=0.2)), trial
