"""covariance_mask: Clip-Cov / KL-Cov selection against float64 definitions written here."""

from __future__ import annotations

import pytest
import torch
from spawn_helpers import run_ranks

from fusedrl.kernels import covariance_mask
from fusedrl.kernels.covariance_mask import token_covariance


def oracle_cov(lp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = mask.bool()
    a = (adv if adv.shape == lp.shape else adv[:, None].expand_as(lp)).double()
    lp = lp.double()
    return (lp - lp[valid].mean()) * (a - a[valid].mean())


def batch(g: torch.Generator, b: int = 6, t: int = 40):
    lp = -torch.rand(b, t, generator=g) * 4
    adv = torch.randn(b, generator=g) * 2
    mask = torch.rand(b, t, generator=g) < 0.75
    return lp, adv, mask


def test_hand_worked_covariance():
    lp = torch.tensor([[-1.0, -3.0, 9.0], [-2.0, -2.0, 9.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # mean lp = -2, mean A = 0: Cov = (lp + 2) * A
    want = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(token_covariance(lp, adv, mask), want, rtol=0, atol=1e-15)
    # k = int(0.5 * 4) = 2: the two largest Cov are 1.0 and the first tied 0.0 (lowest index wins ties)
    got = covariance_mask(lp, adv, mask, mode="kl_cov", ratio=0.5)
    assert got.tolist() == [[True, False, False], [True, False, False]]


@pytest.mark.parametrize("ratio", [1e-3, 0.05, 0.3, 1.0])
def test_kl_cov_picks_the_true_top_k(ratio):
    g = torch.Generator().manual_seed(5)
    lp, adv, mask = batch(g)
    cov = oracle_cov(lp, adv, mask)
    n = int(mask.sum())
    k = max(1, int(ratio * n))
    threshold = cov[mask].topk(k).values.min()
    want = mask & (cov >= threshold)
    assert int(want.sum()) == k  # no ties in continuous data
    assert torch.equal(covariance_mask(lp, adv, mask, mode="kl_cov", ratio=ratio), want)


def test_kl_cov_exactly_k_under_ties():
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-3.0, -3.0, -3.0, -3.0]])
    adv = torch.tensor([1.0, -1.0])  # every token's Cov is +1
    got = covariance_mask(lp, adv, torch.ones(2, 4), mode="kl_cov", ratio=0.4)  # k = 3
    assert got.tolist() == [[True, True, True, False], [False] * 4]


@pytest.mark.parametrize("mode", ["kl_cov", "clip_cov"])
def test_padding_never_enters(mode):
    g = torch.Generator().manual_seed(9)
    lp, _, mask = batch(g)
    adv = torch.randn(lp.shape, generator=g)
    kwargs = dict(mode=mode, ratio=0.1, lower=0.0, upper=3.0, generator=torch.Generator().manual_seed(1))
    want = covariance_mask(lp, adv, mask, **kwargs)
    assert want.any() and not (want & ~mask).any()
    for junk in (float("nan"), 1e6, -float("inf")):
        lp_junk, adv_junk = torch.where(mask, lp, junk), torch.where(mask, adv, -junk)
        kwargs["generator"] = torch.Generator().manual_seed(1)
        assert torch.equal(covariance_mask(lp_junk, adv_junk, mask, **kwargs), want)
        torch.testing.assert_close(token_covariance(lp_junk, adv_junk, mask)[mask], oracle_cov(lp, adv, mask)[mask])


def clip_cov_inputs():
    g = torch.Generator().manual_seed(2)
    lp, adv, mask = batch(g, b=8, t=60)
    exclude = torch.rand(lp.shape, generator=g) < 0.2
    cov = oracle_cov(lp, adv, mask)
    candidates = mask & (cov > 0.5) & (cov < 3.0) & ~exclude
    return lp, adv, mask, exclude, candidates


def test_clip_cov_draws_k_candidates_reproducibly():
    lp, adv, mask, exclude, candidates = clip_cov_inputs()
    k = max(1, int(0.05 * int(mask.sum())))
    assert int(candidates.sum()) > k

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return covariance_mask(lp, adv, mask, mode="clip_cov", ratio=0.05, lower=0.5, upper=3.0, exclude=exclude, generator=gen)

    first = draw(0)
    assert int(first.sum()) == k
    assert not (first & ~candidates).any()
    assert torch.equal(draw(0), first)
    assert not torch.equal(draw(1), first)


def test_clip_cov_fewer_candidates_than_k():
    lp, adv, mask, exclude, candidates = clip_cov_inputs()
    got = covariance_mask(lp, adv, mask, mode="clip_cov", ratio=1.0, lower=0.5, upper=3.0, exclude=exclude)
    assert torch.equal(got, candidates)


def test_clip_cov_is_uniform_over_candidates():
    """Each of 10 candidates is drawn with probability k / 10 = 0.3 (1000 draws: std 0.0145)."""
    lp = torch.tensor([[-1.0] * 10, [-2.0] * 10])
    adv = torch.tensor([[1.0] * 10, [1.0] * 5 + [-1.0] * 5])
    mask = torch.ones(2, 10)
    # means -1.5 and 0.5: Cov = 0.25 on row 0 (the candidates), -0.25 and 0.75 on row 1
    cov_ok = torch.arange(20).reshape(2, 10) < 10
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 10)
    for _ in range(1000):
        counts += covariance_mask(lp, adv, mask, mode="clip_cov", ratio=0.15, lower=0.0, upper=0.5, generator=gen)
    assert counts[~cov_ok].sum() == 0
    freq = counts[cov_ok] / 1000
    assert (freq - 0.3).abs().max() < 0.06, freq


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_equals_concatenated_batch(world_size):
    """Both modes over several ranks (one without valid tokens) equal the single-process mask of the
    concatenated batch; clip_cov's draw with the same seed too, so it reproduces across world sizes."""
    g = torch.Generator().manual_seed(4)
    parts = [batch(g, b, t) for b, t in ((2, 30), (1, 11), (3, 25))][:world_size]
    parts[1] = (parts[1][0], parts[1][1], torch.zeros_like(parts[1][2]))
    clip = dict(mode="clip_cov", ratio=0.05, lower=0.2, upper=3.0)
    jobs = [
        (covariance_mask, parts, dict(mode="kl_cov", ratio=0.02)),
        (covariance_mask, parts, dict(mode="kl_cov", ratio=0.3)),
        (covariance_mask, parts, dict(clip, generator_seed=7)),
    ]
    kl_small, kl_large, drawn = run_ranks(world_size, jobs)
    lp, mask = (torch.cat([p[i].reshape(-1) for p in parts]) for i in (0, 2))
    adv = torch.cat([p[1][:, None].expand_as(p[0]).reshape(-1) for p in parts])
    for ratio, got in ((0.02, kl_small), (0.3, kl_large)):
        want = covariance_mask(lp, adv, mask, mode="kl_cov", ratio=ratio)
        assert torch.equal(torch.cat([m.reshape(-1) for m in got]), want), ratio
    drawn = torch.cat([m.reshape(-1) for m in drawn])
    cov = oracle_cov(lp, adv, mask)
    candidates = mask & (cov > 0.2) & (cov < 3.0)
    k = max(1, int(0.05 * int(mask.sum())))
    assert int(drawn.sum()) == k < int(candidates.sum())
    assert not (drawn & ~candidates).any()
    assert torch.equal(drawn, covariance_mask(lp, adv, mask, **clip, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(mode="cov"), "mode"),
        (dict(mode="kl_cov", ratio=0.0), "ratio"),
        (dict(mode="kl_cov", ratio=2.0), "ratio"),
        (dict(mode="clip_cov", lower=2.0, upper=1.0), "lower"),
        (dict(mode="clip_cov", exclude=torch.zeros(3, 2, dtype=torch.bool)), "exclude"),
    ],
)
def test_bad_arguments(kwargs, name):
    kwargs = {"ratio": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        covariance_mask(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), **kwargs)


def test_inputs_on_two_devices_name_the_argument(fake_gpu):
    lp, mask = torch.zeros(2, 3, device=fake_gpu.DEVICE), torch.ones(2, 3, device=fake_gpu.DEVICE)
    with pytest.raises(ValueError, match="advantages on cpu"):
        covariance_mask(lp, torch.zeros(2), mask, mode="kl_cov", ratio=0.1)
    with pytest.raises(ValueError, match="exclude on cpu"):
        covariance_mask(lp, torch.zeros(2, device=fake_gpu.DEVICE), mask, mode="clip_cov", ratio=0.1,
                        exclude=torch.zeros(2, 3, dtype=torch.bool))


def test_bad_shapes():
    with pytest.raises(ValueError, match="advantages"):
        covariance_mask(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), mode="kl_cov", ratio=0.1)
    with pytest.raises(ValueError, match="mask"):
        covariance_mask(torch.zeros(2, 3), torch.zeros(2), torch.ones(3, 3), mode="kl_cov", ratio=0.1)


@pytest.mark.parametrize("mode", ["kl_cov", "clip_cov"])
def test_on_another_device_equals_the_cpu_mask(mode, fake_gpu):
    """Off the CPU both modes take their device path (a sort instead of torch.topk, every token hashed),
    with a CPU generator for clip_cov, whose draw must not depend on where the tensors live."""
    device = fake_gpu.DEVICE
    lp, adv, mask, exclude, _ = clip_cov_inputs()
    options = dict(mode=mode, ratio=0.05, lower=0.5, upper=3.0)
    if mode == "clip_cov":
        options["exclude"] = exclude
    on_cpu = covariance_mask(lp, adv, mask, generator=torch.Generator().manual_seed(3), **options)
    moved = [t.to(device) for t in (lp, adv, mask)]
    if mode == "clip_cov":
        options["exclude"] = exclude.to(device)
    on_device = covariance_mask(*moved, generator=torch.Generator().manual_seed(3), **options)
    assert on_device.device == device
    assert on_cpu.any() and torch.equal(on_device.cpu(), on_cpu)
