"""The logit tile of the fused-linear op, shared by its kernels and by its kept-set search
(_linear_kept_set.py): every kernel that computes a tile of z = (h W^T + b) / T calls this one
function with the same block sizes, so all of them see bitwise the same logits (a token exactly at the
top-k / top-p threshold is then in or out of the kept set in every pass alike)."""

import triton
import triton.language as tl


@triton.jit
def grouped(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """Flat program id -> (row block, column index), GROUP_N row blocks side by side (L2 reuse)."""
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def logit_tile(
    hidden_ptr, weight_ptr, bias_ptr,
    rows, cols,  # int64 row / vocabulary indices of the tile
    n_rows, hidden_size, k_stop, vocab_size, stride_h, stride_w, inv_temperature,  # k_stop: H, or 0 to skip
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    floor=None,  # [BLOCK_N] fp32: logits below it are -inf too (the sampler's kept set); None: none
):
    """(h[rows] @ W[cols]^T + b[cols]) / T in fp32; lanes past V are -inf so they add nothing.

    k_stop = 0 skips the matmul (tiles whose rows are all ignored: prompt tokens in RL batches)."""
    offs_h = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    col_ok = cols < vocab_size
    h_ptrs = hidden_ptr + rows[:, None] * stride_h + offs_h[None, :]
    w_ptrs = weight_ptr + cols[None, :] * stride_w + offs_h[:, None]  # W^T tile, [BLOCK_H, BLOCK_V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, k_stop, BLOCK_H):
        h_ok = offs_h + k < hidden_size  # masked, so any H works (not only multiples of BLOCK_H)
        h = tl.load(h_ptrs + k, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temperature
    keep = col_ok[None, :]
    if floor is not None:
        keep = keep & (z >= floor[:, None])  # in the one select: no second [BLOCK_N, BLOCK_V] tensor
    return tl.where(keep, z, float("-inf"))
