"""The order-statistic paths of kernels/_select.py against a stable sort, on data with many ties.

Without a process group the selection ops use torch.topk (CPU) or one sort (other devices); with one,
the radix select. All three must give the same key, so that a mask never depends on the path; the
distributed tests (test_top_entropy_mask.py, test_covariance_mask.py) compare the radix path across
ranks with the single-process one on top of this.
"""

from __future__ import annotations

import pytest
import torch

from fusedrl.kernels import _select
from fusedrl.kernels._select import (
    float_keys,
    radix_kth_smallest_key,
    random_keys,
    sort_kth_smallest_key,
    top_k_mask,
    topk_kth_smallest_key,
)

INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
PATHS = {
    "topk": lambda keys, valid, k, bits: topk_kth_smallest_key(keys, valid, k),
    "sort": lambda keys, valid, k, bits: sort_kth_smallest_key(keys, valid, k),
    "radix": lambda keys, valid, k, bits: radix_kth_smallest_key(keys, valid, k, bits, None),
}


def tied_int64_keys(g: torch.Generator, n: int) -> torch.Tensor:
    """Few distinct values, including the int64 extremes the sentinels use and both signs."""
    pool = torch.tensor([INT64_MIN, INT64_MIN + 1, -(1 << 40), -3, -1, 0, 2, 1 << 40, INT64_MAX - 1, INT64_MAX])
    return pool[torch.randint(0, pool.numel(), (n,), generator=g)]


def tied_float32_keys(g: torch.Generator, n: int) -> torch.Tensor:
    """float_keys of float32 values with ties, signed zeros and infinities (32-bit keys)."""
    pool = torch.tensor([float("-inf"), -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.25, 7.0, float("inf")])
    return float_keys(pool[torch.randint(0, pool.numel(), (n,), generator=g)])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind, bits", [("int64", 64), ("float32", 32)])
def test_every_rank_equals_the_sorted_valid_keys(path, kind, bits):
    g = torch.Generator().manual_seed(7)
    for n, valid_fraction in [(1, 1.0), (37, 0.5), (160, 0.8), (160, 0.05)]:
        keys = tied_int64_keys(g, n) if kind == "int64" else tied_float32_keys(g, n)
        valid = torch.rand(n, generator=g) < valid_fraction
        valid[0] = True  # at least one valid key
        expected = keys[valid].sort().values
        got = torch.stack([PATHS[path](keys, valid, torch.tensor(k), bits) for k in range(expected.numel())])
        assert torch.equal(got, expected), (n, valid_fraction)


def stable_top_k(keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest valid keys, ties to the lowest flat index: a stable descending sort."""
    order = torch.sort(keys[valid], descending=True, stable=True).indices[:k]
    picked = torch.zeros(int(valid.sum()), dtype=torch.bool)
    picked[order] = True
    mask = torch.zeros_like(valid)
    mask[valid] = picked
    return mask


@pytest.mark.parametrize("path", PATHS)
def test_top_k_mask_breaks_ties_by_lowest_index_on_every_path(path, monkeypatch):
    # top_k_mask without a group goes through local_kth_smallest_key; route it to each path in turn.
    monkeypatch.setattr(_select, "local_kth_smallest_key", lambda keys, valid, k: PATHS[path](keys, valid, k, 64))
    g = torch.Generator().manual_seed(11)
    keys = tied_int64_keys(g, 6 * 25).reshape(6, 25)
    valid = torch.rand(6, 25, generator=g) < 0.7
    n = int(valid.sum())
    for k in [0, 1, 2, n // 3, n - 1, n, n + 5]:
        expected = stable_top_k(keys.reshape(-1), valid.reshape(-1), min(k, n)).reshape(6, 25)
        assert torch.equal(top_k_mask(keys, valid, torch.tensor(k), 64, None), expected), k


def test_random_keys_of_the_needed_tokens_equal_the_full_draw():
    # On CPU clip_cov hashes only its candidates; their keys must be the ones every token would get.
    needed = torch.rand(5, 33, generator=torch.Generator().manual_seed(3)) < 0.2
    full = random_keys(needed.shape, torch.Generator().manual_seed(5), "cpu", None)
    sparse = random_keys(needed.shape, torch.Generator().manual_seed(5), "cpu", None, needed=needed)
    assert torch.equal(sparse[needed], full[needed])
    assert full.unique().numel() == full.numel() and bool((full >= 0).all())
