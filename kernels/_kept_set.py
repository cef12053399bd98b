"""The sampler's kept set (top-k, top-p): one logit threshold per row, found without sorting.

Semantics (vLLM's order: temperature, then top-k, then top-p). With z = logits / T:
- top-k keeps every token whose logit is >= the k-th largest logit of the row, counted with
  multiplicity: #{z > z_j} < k. Ties at the k-th value are all kept (as vLLM does), so a row may keep
  more than k tokens.
- top-p then keeps, of those, every token whose logit has less than p of the top-k set's mass
  strictly above it: sum_{i kept by top-k, z_i > z_j} e^{z_i} < p sum_{i kept by top-k} e^{z_i}.
  The largest token is always kept. Ties are kept or dropped as a group (a value threshold), where
  vLLM's sort may keep part of a tied group at the top-p boundary; otherwise the sets agree except
  where the cumulative mass is within rounding of p (vLLM sums fp32 probabilities in sorted order).
Both steps keep an upper set of logit values, so the kept set is {j : z_j >= tau} for one value tau
per row, tau = max(tau_k, tau_p). The ops then compute lp and H of the renormalised distribution on
that set by treating every logit below tau as -inf (see the ops' docstrings for a target below tau).

Search. A radix select over order-preserving 32-bit keys of the fp32 logits (_select.float_keys),
digits of 10, 11 and 11 bits from the top, three streaming passes over the row per statistic: each
pass histograms the digit of the tokens still in the running (whose higher digits equal the prefix
chosen so far), with the count (top-k) or the probability mass (top-p) per bucket, and picks the
bucket where the cumulative count or mass from the top first reaches the goal. Masses are
e^{(z - max)} rounded down to integer multiples of 2^-40 and summed in int64: integer sums are exact
and do not depend on the order of accumulation (so the threshold is deterministic on any device and
batch-invariant), each bucket's mass is exactly the sum of its sub-buckets' (so the passes never
disagree), and the rounding (2^-40 of the largest token's mass) is far below any fp32 effect. With a
process group (vocabulary parallelism) every histogram and the row max are all-reduced over the
ranks' slices. Nothing of size [N, V] is allocated: the caller streams pieces of its rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusedrl.kernels._rows import row_layout
from fusedrl.kernels._select import all_reduce, float_keys, key_to_float

MASS_UNIT = float(2**40)  # fixed-point unit: int64 sums of up to 2^23 tokens of mass <= 1 cannot overflow
_DIGITS = ((22, 10), (11, 11), (0, 11))  # (shift, bits) of the three passes, top digit first
_ALL = 2**32 - 1


def check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not hasattr(top_k, "__index__") or int(top_k) < 1:
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    return int(top_k)


def check_top_p(top_p) -> float | None:
    if top_p is None:
        return None
    try:
        value = float(top_p)
    except (TypeError, ValueError):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}") from None
    if isinstance(top_p, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return value


def effective(top_k: int | None, top_p: float | None, vocab: int) -> tuple[int | None, float | None]:
    """(top_k, top_p) with the settings that keep every token (top_k >= V, top_p = 1) as None."""
    return (None if top_k is None or top_k >= vocab else top_k), (None if top_p is None or top_p >= 1.0 else top_p)


# Rows per search block: the histograms of a block are 2 x 256 x 2049 int64 (8 MiB); a fixed number,
# so that every rank of a vocabulary-parallel group walks the same blocks.
BLOCK_ROWS = 256


def kept_threshold(source, n_rows: int, top_k, top_p, device, group=None, block_rows: int = BLOCK_ROWS):
    """tau [N] fp32: the lowest kept logit of each row, in the units of the source's logits, for
    effective() settings (at least one not None). `source` gives this rank's row maxima and
    histograms (PieceHistograms, or a kernel's); `block_rows` must be the same on every rank."""
    tau = torch.empty(n_rows, dtype=torch.float32, device=device)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(n_rows, r0 + block_rows)
        top = all_reduce(source.row_max(r0, r1), group, dist.ReduceOp.MAX)
        top = torch.where(torch.isfinite(top), top, 0.0)  # all -inf (or nan) rows: no mass anywhere
        block = _Search(source, r0, r1, top, device, group)
        tau_k = block.kth_largest(top_k) if top_k is not None else None
        tau_p = block.mass_threshold(top_p, tau_k) if top_p is not None else None
        tau[r0:r1] = tau_k if tau_p is None else tau_p if tau_k is None else torch.maximum(tau_k, tau_p)
    return tau


def descending_keys(z: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32), ascending as the fp32 values of z descend (the largest has key 0)."""
    return _ALL - (float_keys(z) + 2**31)


def mass_units(z: torch.Tensor, top: torch.Tensor, scale: float) -> torch.Tensor:
    """exp((z - top) * scale) in int64 units of 2^-40, rounded down (top: the row max, [rows, 1])."""
    return torch.exp((z - top) * scale).mul_(MASS_UNIT).long()


class PieceHistograms:
    """Row maxima and histograms for kept_threshold from pieces of rows, in plain PyTorch.

    pieces(r0, r1) yields (a, b, z): fp32 z [b - a, c] covering rows [a, b) of [r0, r1) and some of
    the row's columns; together the pieces of a block cover every column of this rank's slice once.
    The probability of z is proportional to exp(z * scale).
    """

    def __init__(self, pieces, scale: float, device):
        self.pieces, self.scale, self.device = pieces, scale, device

    def row_max(self, r0, r1):
        top = torch.full((r1 - r0,), float("-inf"), device=self.device)
        for a, b, z in self.pieces(r0, r1):
            top[a - r0 : b - r0] = torch.maximum(top[a - r0 : b - r0], z.amax(1))
        return top

    def histograms(self, r0, r1, prefix, shift, bits, floor, top, with_mass):
        """Per-row count (and fixed-point mass) of the running tokens in each bucket of the digit at
        `shift`; running: the key's bits above shift + bits equal prefix, and z >= floor (if given)."""
        n, bins = r1 - r0, 1 << bits
        counts = torch.zeros(n * (bins + 1), dtype=torch.int64, device=self.device)
        masses = torch.zeros_like(counts) if with_mass else None
        for a, b, z in self.pieces(r0, r1):
            rows = slice(a - r0, b - r0)
            key = descending_keys(z)
            running = (key >> (shift + bits)) == prefix[rows, None]
            if floor is not None:
                running &= z >= floor[rows, None]
            digit = ((key >> shift) & (bins - 1)).masked_fill_(~running, bins)  # the extra bin is never read
            index = digit + torch.arange(a - r0, b - r0, device=self.device)[:, None] * (bins + 1)
            counts.scatter_add_(0, index.reshape(-1), running.reshape(-1).long())
            if with_mass:
                mass = mass_units(z, top[rows, None], self.scale).masked_fill_(~running, 0)
                masses.scatter_add_(0, index.reshape(-1), mass.reshape(-1))
        counts = counts.view(n, bins + 1)[:, :bins]
        return counts, masses.view(n, bins + 1)[:, :bins] if with_mass else None


class _Search:
    """The radix passes over one block of rows (module docstring)."""

    def __init__(self, source, r0, r1, top, device, group):
        self.source, self.r0, self.r1, self.top, self.device, self.group = source, r0, r1, top, device, group

    def _histograms(self, prefix, shift, bits, floor, with_mass):
        counts, masses = self.source.histograms(self.r0, self.r1, prefix, shift, bits, floor, self.top, with_mass)
        hist = all_reduce((masses if with_mass else counts).contiguous(), self.group)
        return hist

    def _descend(self, goal, floor, with_mass):
        """The key of the first token (largest logit first) at which the cumulative count or mass
        reaches `goal` [rows] (int64 count, or float64 mass)."""
        n = self.r1 - self.r0
        prefix = torch.zeros(n, dtype=torch.int64, device=self.device)
        above = torch.zeros(n, dtype=torch.int64, device=self.device)  # count / mass before the range
        for shift, bits in _DIGITS:
            hist = self._histograms(prefix, shift, bits, floor, with_mass)
            cum = above[:, None] + hist.cumsum(1)  # exact int64; rounded to float64 only to compare
            chosen = (cum.to(goal.dtype) < goal[:, None]).sum(1).clamp_(max=(1 << bits) - 1)  # first reaching it
            above = cum.gather(1, chosen[:, None])[:, 0] - hist.gather(1, chosen[:, None])[:, 0]
            prefix = (prefix << bits) | chosen
        return key_to_float(_ALL - prefix - 2**31, torch.float32)

    def kth_largest(self, k: int) -> torch.Tensor:
        goal = torch.full((self.r1 - self.r0,), k, dtype=torch.int64, device=self.device)
        return self._descend(goal, None, with_mass=False)

    def mass_threshold(self, p: float, floor: torch.Tensor | None) -> torch.Tensor:
        """The smallest logit with less than p of the mass of {z >= floor} strictly above it."""
        zero = torch.zeros(self.r1 - self.r0, dtype=torch.int64, device=self.device)
        # The total mass of the top-k set is the sum of any first-pass histogram of it.
        shift, bits = _DIGITS[0]
        goal = p * self._histograms(zero, shift, bits, floor, with_mass=True).sum(1).double()
        return self._descend(goal, floor, with_mass=True)


def _grid(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits as an [outer, inner, V] view (no copy), and inner."""
    layout = row_layout(logits)
    shape, strides = (layout.outer, layout.inner, logits.shape[-1]), (layout.stride_outer, layout.stride_inner, 1)
    return torch.as_strided(logits, shape, strides, logits.storage_offset()), layout.inner


def logits_threshold(logits: torch.Tensor, top_k, top_p, temperature: float, chunk_bytes: int, group):
    """kept_threshold for [..., V] logits (raw units), or None when top_k and top_p keep everything."""
    if top_k is None and top_p is None:
        return None
    source = PieceHistograms(logits_pieces(logits, chunk_bytes), 1.0 / temperature, logits.device)
    return kept_threshold(source, logits[..., 0].numel(), top_k, top_p, logits.device, group)


def target_kept(logits: torch.Tensor, local_targets: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Whether each row's target column (clamped into the slice) is in the kept set: [N] bool."""
    grid, inner = _grid(logits)
    flat = torch.arange(local_targets.numel(), device=logits.device)
    return grid[flat // inner, flat % inner, local_targets].float() >= tau


def logits_pieces(logits: torch.Tensor, chunk_bytes: int):
    """pieces() of kept_threshold for [..., V] logits with a two-level row layout (_rows.py): whole
    rows, copied to fp32 a few at a time (about 8 int64-sized temporaries per element fit chunk_bytes)."""
    grid, inner = _grid(logits)
    rows_per_piece = max(1, chunk_bytes // (64 * logits.shape[-1]))

    def pieces(r0, r1):
        for a in range(r0, r1, rows_per_piece):
            b = min(r1, a + rows_per_piece)
            flat = torch.arange(a, b, device=logits.device)
            yield a, b, grid[flat // inner, flat % inner].float()

    return pieces
