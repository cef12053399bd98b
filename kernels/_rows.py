"""Row addressing for ops that treat a [..., D] tensor as N = prod(leading) rows of length D.

The leading dimensions may have any strides: `logits[:, :-1, :]` of a [B, L + 1, V] tensor is the
common case, and copying it would cost a full [N, V] tensor. Adjacent leading dimensions whose
strides chain (stride[i] == stride[i + 1] * size[i + 1]) merge into one; size-1 dimensions drop
out. Two dimensions remain at most for every slice of a contiguous tensor along one leading axis,
so kernels address flat row r as

    offset(r) = (r // inner) * stride_outer + (r % inner) * stride_inner

with int64 arithmetic. Leading shapes that do not reduce to two levels (rare: slices along two
separate axes of a 4-D tensor) have no such form; `row_layout` returns None and callers copy.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Flat row r of a [..., D] tensor starts at (r // inner) * stride_outer + (r % inner) * stride_inner."""

    n_rows: int
    inner: int  # rows per outer step; >= 1
    stride_outer: int
    stride_inner: int

    @property
    def outer(self) -> int:
        return self.n_rows // self.inner if self.n_rows else 0


def row_layout(t: torch.Tensor) -> RowLayout | None:
    """The two-level row layout of t's leading dimensions, or None when they need three or more."""
    dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    n_rows = 1
    for size, _ in dims:
        n_rows *= size
    merged: list[tuple[int, int]] = []
    for size, stride in reversed(dims):
        if merged and stride == merged[-1][1] * merged[-1][0]:
            inner_size, inner_stride = merged.pop()
            merged.append((size * inner_size, inner_stride))
        else:
            merged.append((size, stride))
    merged.reverse()
    if n_rows == 0:
        return RowLayout(0, 1, 0, 0)
    if len(merged) > 2:
        return None
    if len(merged) == 2:
        (_, stride_outer), (inner, stride_inner) = merged
        return RowLayout(n_rows, inner, stride_outer, stride_inner)
    if len(merged) == 1:
        return RowLayout(n_rows, n_rows, 0, merged[0][1])
    return RowLayout(1, 1, 0, 0)


def rows_are_disjoint(t: torch.Tensor) -> bool:
    """True when no two rows of t share memory, so that writing every row in place is well defined.

    Sufficient test: ordered by stride, each leading level must step past the whole extent of the
    finer ones (an expanded tensor, with a zero stride, fails it).
    """
    layout = row_layout(t)
    if layout is None:
        return False
    levels = [(layout.stride_inner, layout.inner), (layout.stride_outer, layout.outer)]
    levels = sorted((stride, size) for stride, size in levels if size > 1)
    extent = t.shape[-1]
    for stride, size in levels:
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True
