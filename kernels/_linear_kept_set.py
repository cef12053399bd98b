"""The kept-set search (top-k / top-p threshold, kernels/_kept_set.py) of the fused-linear op's Triton
backend: the radix passes histogram pieces of logits that `_logits_kernel` writes with the op's own
tile function and tile shapes, so they are bitwise the logits the forward and backward kernels then
compare with the threshold (a token exactly at the threshold, e.g. the argmax under top_k = 1, is in
the kept set in every kernel alike).

Each piece is one [SEARCH_ROWS, SEARCH_COLS] block of fp32 logits in a reused workspace; the histograms
are _kept_set.PieceHistograms' int64 scatter-adds (exact, so deterministic on the GPU too). Every pass
recomputes the logits (2 N V H flops): the row max takes one pass, top-k three, top-p four.
A histogram kernel with atomics in the tile's epilogue would save the workspace traffic, but at the
forward's 128 x 128 tile it needs 64-bit addresses and masses for 64 elements a thread and spills
(checked with the compile harness), so the histogramming stays in PyTorch for now.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedrl.kernels._linear_tiles import grouped, logit_tile

# Workspace of one piece: 1024 x 4096 fp32 (16 MiB), and about eight int64-sized temporaries of it in
# the histogram step. Both are multiples of every configuration's tile, so pieces start on tile edges.
SEARCH_ROWS = 1024
SEARCH_COLS = 4096


@triton.jit
def _logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr,  # one piece: [n, H], [v, H], [v] (if HAS_BIAS)
    out_ptr,  # [n, v] fp32
    n_rows, hidden_size, vocab_size,
    stride_h, stride_w,
    inv_temperature,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_n, pid_v = grouped(pid, tl.cdiv(n_rows, BLOCK_N), tl.cdiv(vocab_size, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, hidden_size, hidden_size, vocab_size,
                   stride_h, stride_w, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                   UPCAST_DOT)
    tl.store(out_ptr + rows[:, None] * vocab_size + cols[None, :], z,
             mask=(rows < n_rows)[:, None] & (cols < vocab_size)[None, :])


def triton_linear_pieces(hidden, weight, bias, inv_temperature: float, cfg, group_n: int):
    """pieces() of _kept_set.PieceHistograms: the logits of rows [r0, r1) in [SEARCH_COLS]-wide column
    blocks, computed by _logits_kernel with the op's block sizes `cfg` (linear_logprobs_entropy._Blocks)."""
    vocab_size, hidden_size = weight.shape
    workspace = torch.empty(SEARCH_ROWS * SEARCH_COLS, dtype=torch.float32, device=hidden.device)

    def pieces(r0, r1):
        for c0 in range(0, vocab_size, SEARCH_COLS):
            c1 = min(vocab_size, c0 + SEARCH_COLS)
            z = workspace[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            grid = (triton.cdiv(r1 - r0, cfg.block_n) * triton.cdiv(c1 - c0, cfg.block_v),)
            _logits_kernel[grid](
                hidden[r0:r1], weight[c0:c1], weight if bias is None else bias[c0:c1], z,
                r1 - r0, hidden_size, c1 - c0, hidden.stride(0), weight.stride(0), inv_temperature,
                HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                GROUP_N=group_n, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            yield r0, r1, z

    return pieces
