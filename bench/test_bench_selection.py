"""Batch-wide token selection: top_entropy_mask and covariance_mask against plain PyTorch.

top_entropy_mask is compared with the rule TRL's GRPOTrainer uses, `H >= torch.quantile(H[valid],
1 - rho)`, and with an exact sort of the valid entropies, which is what one falls back to past 2^24
valid tokens, where torch.quantile refuses its input. The largest size of each device sits past that
limit, so the torch.quantile row is skipped there with the reason in pytest's summary.

The bytes an op must move: top_entropy_mask reads the entropy (4 B) and the mask (1 B) and writes the
selection (1 B) per token; covariance_mask reads log-probs and advantages (4 B each) and the mask, and
writes the selection.
"""

from __future__ import annotations

import pytest
import torch

from bench._runner import run_case
from fusedrl.kernels import covariance_mask, top_entropy_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUANTILE_LIMIT = 1 << 24  # torch.quantile raises on more elements than this
# The largest size of each device is past the limit (on CPU by one element, the smallest refused size).
SIZES = [1 << 20, 1 << 24, 1 << 26] if DEVICE == "cuda" else [1 << 16, QUANTILE_LIMIT + 1]
RHO = 0.2
ROUNDS = 10 if DEVICE == "cuda" else 3


def _entropies(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CoT-like entropies (over half below 0.01, a long tail) with 10% padding, on DEVICE."""
    low = torch.rand(n, device=DEVICE) * 0.01
    high = torch.empty(n, device=DEVICE).exponential_(1.0 / 0.7)
    entropy = torch.where(torch.rand(n, device=DEVICE) < 0.55, low, high)
    mask = torch.rand(n, device=DEVICE) >= 0.1
    return entropy, mask


def _by_quantile(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask & (entropy >= torch.quantile(entropy[mask], 1.0 - RHO))


def _by_sort(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch.quantile's linear interpolation on a sorted copy of the valid entropies (no size limit)."""
    values = entropy[mask].sort().values
    rank = (1.0 - RHO) * (values.numel() - 1)
    below = int(rank)
    above = min(below + 1, values.numel() - 1)
    tau = torch.lerp(values[below], values[above], rank - below)
    return mask & (entropy >= tau)


TOP_ENTROPY_IMPLS = {
    "fusedrl": lambda entropy, mask: top_entropy_mask(entropy, mask, top_fraction=RHO),
    "torch.quantile": _by_quantile,
    "torch.sort": _by_sort,
}


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N={n}")
@pytest.mark.parametrize("impl", TOP_ENTROPY_IMPLS)
def test_top_entropy_mask(benchmark, ceilings, device, impl, n):
    if impl == "torch.quantile" and n > QUANTILE_LIMIT:
        pytest.skip(f"torch.quantile refuses more than 2^24 elements (N = {n})")
    entropy, mask = _entropies(n)
    fn = TOP_ENTROPY_IMPLS[impl]
    expected = _by_sort(entropy, mask)
    # A benchmark of a wrong answer is worth nothing: every implementation picks the same tokens.
    assert torch.equal(fn(entropy, mask), expected)
    run_case(benchmark, ceilings, lambda: fn(entropy, mask), device=device, bytes_moved=6 * n,
             rounds=1 if DEVICE == "cpu" and n > QUANTILE_LIMIT else ROUNDS, op="top_entropy_mask", impl=impl,
             mode="fwd", shape=f"N={n}")


def _covariance_inputs(n: int):
    logprobs = -torch.empty(n, device=DEVICE).exponential_(2.0)
    advantages = torch.randn(n, device=DEVICE)
    mask = torch.rand(n, device=DEVICE) >= 0.1
    return logprobs, advantages, mask


def _centred_covariance(logprobs, advantages, mask):
    valid = mask.to(logprobs.dtype)
    count = valid.sum()
    lp_mean = (logprobs * valid).sum() / count
    adv_mean = (advantages * valid).sum() / count
    return (logprobs - lp_mean) * (advantages - adv_mean)


def _torch_kl_cov(logprobs, advantages, mask, ratio):
    cov = _centred_covariance(logprobs, advantages, mask).masked_fill(~mask, float("-inf"))
    k = max(1, int(ratio * int(mask.sum())))
    selected = torch.zeros_like(mask)
    selected[cov.topk(k).indices] = True
    return selected


def _torch_clip_cov(logprobs, advantages, mask, ratio, generator):
    cov = _centred_covariance(logprobs, advantages, mask)
    candidates = (mask & (cov > 1.0) & (cov < 5.0)).nonzero().squeeze(1)
    k = min(max(1, int(ratio * int(mask.sum()))), candidates.numel())
    pick = torch.randperm(candidates.numel(), generator=generator, device=DEVICE)[:k]
    selected = torch.zeros_like(mask)
    selected[candidates[pick]] = True
    return selected


@pytest.mark.parametrize("n", SIZES[:-1], ids=lambda n: f"N={n}")
@pytest.mark.parametrize("impl", ["fusedrl", "torch"])
@pytest.mark.parametrize("mode", ["kl_cov", "clip_cov"])
def test_covariance_mask(benchmark, ceilings, device, mode, impl, n):
    logprobs, advantages, mask = _covariance_inputs(n)
    ratio = 2e-3
    generator = torch.Generator(device=DEVICE)
    if impl == "fusedrl":
        def fn():
            return covariance_mask(logprobs, advantages, mask, mode=mode, ratio=ratio, generator=generator)
    elif mode == "kl_cov":
        def fn():
            return _torch_kl_cov(logprobs, advantages, mask, ratio)
    else:
        def fn():
            return _torch_clip_cov(logprobs, advantages, mask, ratio, generator)
    selected = fn()
    k = max(1, int(ratio * int(mask.sum())))
    if mode == "kl_cov":
        assert torch.equal(selected, _torch_kl_cov(logprobs, advantages, mask, ratio))
    else:
        cov = _centred_covariance(logprobs, advantages, mask)
        assert bool((mask & (cov > 1.0) & (cov < 5.0))[selected].all())
        assert int(selected.sum()) == min(k, int((mask & (cov > 1.0) & (cov < 5.0)).sum()))
    run_case(benchmark, ceilings, fn, device=device, bytes_moved=10 * n, rounds=ROUNDS,
             op=f"covariance_mask[{mode}]", impl=impl, mode="fwd", shape=f"N={n}")
