"""Exact batch-wide order statistics for the selection ops, across ranks.

With a process group: a radix select over order-preserving integer keys. Each pass histograms one
11-bit digit of the keys still in the running (one all-reduce of 2,048 counts per pass), picks the
bucket that holds the wanted rank, and narrows the prefix; the top digit takes the bits left over.
Float32 values take three passes, int64 / float64 keys six. Work is O(N) per pass, nothing is sorted,
no rank ever sees another rank's values, and every quantity (ranks, counts, the selected key) stays a
device tensor, so no step waits on the host. Why 11-bit digits: measured on CPU, one thread, per
select of 64-bit keys, 8-bit digits (eight passes) took 193 us / 1.71 ms / 43 ms at 300 / 65,536 /
1M keys and 11-bit ones 151 us / 1.32 ms / 42 ms; 16-bit ones were faster from 65,536 keys on
(0.81 ms) but all-reduce 512 KB per pass instead of 16 KB.

Without one, torch's own selection answers (torch.topk on CPU, one sort elsewhere): the radix passes
cost about twice as much on CPU (each is several elementwise int64 ops over the whole batch), and on
a GPU each pass is several small launches. Both give the same key, so the masks do not depend on
the path; tests/kernels/test_select.py checks that on data with many ties.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DIGIT_BITS = 11


def all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce over `group` (sum by default); a no-op without a process group."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def world(group) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without a process group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 / float64 values of x (-0.0 sorts just below +0.0).

    Bit patterns of non-negative floats already order as signed integers; for negative ones the
    magnitude bits are flipped so that larger magnitudes give smaller keys.
    """
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = x.view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def key_to_float(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of float_keys for a 0-dim key."""
    if dtype == torch.float32:
        bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
        return bits.view(torch.float32)
    return torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).view(torch.float64)


def kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, key_bits: int, group) -> torch.Tensor:
    """The key of rank k (0-based, a 0-dim int64 tensor) among the valid keys of all ranks.

    keys: int64 of any shape holding signed `key_bits`-bit values; valid: bool of the same shape.
    k must lie in [0, global valid count); the caller guards the empty case (the key returned for
    it is arbitrary). Without a process group the exact built-ins of local_kth_smallest_key answer;
    with one, the radix select of radix_kth_smallest_key.
    """
    keys, valid = keys.reshape(-1), valid.reshape(-1)
    if group is None:
        return local_kth_smallest_key(keys, valid, k)
    return radix_kth_smallest_key(keys, valid, k, key_bits, group)


def local_kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """kth_smallest_key on one process (flat keys and valid) with torch's own selection.

    On CPU the rank is read on the host, which is free there, for topk_kth_smallest_key; on other
    devices sort_kth_smallest_key needs no host sync and replaces the radix passes' many small
    launches with one library sort.
    """
    if keys.device.type == "cpu":
        return topk_kth_smallest_key(keys, valid, k)
    return sort_kth_smallest_key(keys, valid, k)


def topk_kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """kth_smallest_key (one process) by a torch.topk of the smaller side of rank k: kl_cov's few
    largest keys, the top fifth of the entropies (measured faster than torch.kthvalue at any rank).

    Invalid keys become a sentinel past every valid key, away from the answer, so the answer is an
    order statistic of the full tensor (gathering the valid keys costs more than selecting).
    """
    rank, n = int(k), int(valid.sum())
    if rank >= n:
        return k.clone()
    lowest, highest = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    if n - rank <= rank:
        return torch.where(valid, keys, lowest).topk(n - rank, sorted=False).values.min()
    return torch.where(valid, keys, highest).topk(rank + 1, largest=False, sorted=False).values.max()


def sort_kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """kth_smallest_key (one process) without a host sync: sort with the invalid keys at the end,
    index by the rank as a device tensor."""
    if keys.numel() == 0:
        return k.clone()
    ordered = torch.where(valid, keys, torch.iinfo(torch.int64).max).sort().values
    return ordered[k.clamp(max=keys.numel() - 1)]


def radix_kth_smallest_key(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, key_bits: int, group) -> torch.Tensor:
    """kth_smallest_key by the radix select of the module docstring (flat keys and valid)."""
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)  # signed value of the chosen high bits
    running = valid  # keys whose high digits equal the prefix so far
    rank = k.clone()
    one = torch.ones((), dtype=torch.int64, device=keys.device).expand(keys.shape)
    # The top digit takes what is left over, so that the others are full-width.
    passes = -(-key_bits // _DIGIT_BITS)
    top = key_bits - _DIGIT_BITS * (passes - 1)
    for shift in range(key_bits - top, -1, -_DIGIT_BITS):
        bins = 1 << (top if shift == key_bits - top else _DIGIT_BITS)
        digit = (keys >> shift) & (bins - 1)
        if shift == key_bits - top:
            digit = digit ^ (bins >> 1)  # the top digit carries the sign: flip it into ascending order
        # Keys out of the running land in an extra bin that is never read.
        hist = torch.zeros(bins + 1, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(0, digit.masked_fill_(~running, bins), one)
        hist = all_reduce(hist[:bins].contiguous(), group)
        cum = hist.cumsum(0)
        chosen = torch.searchsorted(cum, rank.reshape(1), right=True).reshape(()).clamp_(max=bins - 1)
        rank = rank - (cum[chosen] - hist[chosen])
        prefix = chosen - (bins >> 1) if shift == key_bits - top else prefix * bins + chosen
        if shift:
            running = running & (digit == chosen)
    return prefix


def top_k_mask(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, key_bits: int, group) -> torch.Tensor:
    """Exactly min(k, n) valid entries with the largest keys over all ranks (k: 0-dim int64 tensor).

    Ties at the threshold go to the lowest flat index, rank 0 first: the same tokens the mask of the
    concatenated batch would pick on one process.
    """
    valid = valid.bool()
    n = all_reduce(valid.sum().to(torch.int64), group)
    k = torch.minimum(k.to(torch.int64), n)
    # The k-th largest is the (n - k)-th smallest; with k = 0 nothing is kept below.
    threshold = kth_smallest_key(keys, valid, (n - k).clamp(max=n - 1).clamp(min=0), key_bits, group)
    above = valid & (keys > threshold)
    tied = valid & (keys == threshold)
    quota = k - all_reduce(above.sum().to(torch.int64), group)
    rank, size = world(group)
    tied_per_rank = torch.zeros(size, dtype=torch.int64, device=keys.device)
    tied_per_rank[rank] = tied.sum()
    tied_before = all_reduce(tied_per_rank, group)[:rank].sum()
    order = tied.reshape(-1).cumsum(0).reshape(tied.shape) + tied_before  # 1-based global tie order
    return (above | (tied & (order <= quota))) & (k > 0)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in 16-bit halves of c so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) with full avalanche (Wellons' "lowbias32" integer hash)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_keys(
    shape: torch.Size, generator: torch.Generator | None, device, group, needed: torch.Tensor | None = None
) -> torch.Tensor:
    """Independent uniform 63-bit int64 keys, one per token, that depend only on the token's global
    position (ranks in order, then flat index) and on seeds drawn from rank 0's generator.

    A counter-based draw rather than torch.randint per rank: the same concatenated batch gets the same
    keys on any number of ranks, and ranks whose generators share a seed still draw different keys.
    needed (bool, `shape`): the tokens whose keys are read; on CPU only those are hashed (the hash is
    some 80 elementwise int64 ops, most of clip_cov's time when hashing every token) and the others
    get key 0. Elsewhere every token is hashed: gathering the needed ones would sync with the host.
    """
    # Drawn on the generator's own device, so that one CPU generator serves tensors on any device (and
    # draws the same keys for them); a CPU generator with GPU tensors costs one 32-byte copy.
    seeds = torch.randint(0, 1 << 32, (4,), generator=generator,
                          device=device if generator is None else generator.device).to(device)
    rank, size = world(group)
    seeds = all_reduce(seeds * (rank == 0), group)
    numel = torch.zeros(size, dtype=torch.int64, device=device)
    numel[rank] = shape.numel()
    offset = all_reduce(numel, group)[:rank].sum()
    if needed is None or torch.device(device).type != "cpu":
        index = torch.arange(shape.numel(), dtype=torch.int64, device=device) + offset
        return _position_keys(index, seeds).reshape(shape)
    positions = needed.reshape(-1).nonzero().squeeze(1)
    keys = torch.zeros(shape.numel(), dtype=torch.int64, device=device)
    keys[positions] = _position_keys(positions + offset, seeds)
    return keys.reshape(shape)


def _position_keys(index: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The 63-bit keys of random_keys for global positions `index` (int64)."""
    low, high = index & 0xFFFFFFFF, index >> 32
    # Two 32-bit halves from independent seeds; for a fixed high word each is a bijection of the low
    # word, so keys within 2^32 tokens never collide.
    upper = _hash32(_hash32(low ^ seeds[0]) ^ ((high + seeds[1]) & 0xFFFFFFFF))
    lower = _hash32(_hash32(low ^ seeds[2]) ^ ((high + seeds[3]) & 0xFFFFFFFF))
    return (upper << 31) | (lower >> 1)
