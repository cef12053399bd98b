"""Per-token log-prob and entropy straight from hidden states, never materialising the logits.

z = (h W^T + b) / T is computed one [BLOCK_N, BLOCK_V] tile at a time (a tensor-core `tl.dot` over H in
BLOCK_H chunks, fp32 accumulate) and reduced on the spot, so no [N, V] tensor exists at any moment.

Forward (`_forward_kernel`): a work item is one block of BLOCK_N rows times one range of the vocabulary.
It streams its logit tiles through an online max / sum-exp / sum-exp-times-shifted-logit reduction and
picks the target logit, then writes those four fp32 partials; `_combine` merges the ranges of each row
into lse, lp = z_y - lse and H = log(sum exp(z - m)) - sum p (z - m) (the shifted form of lse - sum p z,
which keeps H accurate when it is tiny). Splitting the vocabulary gives enough work items to fill the
GPU even when N is small; items are ordered so that GROUP_N row blocks run side by side: their hidden
blocks stay in L2 while the weight tiles they share stream through it once per group.

Backward: the gradient with respect to the logits, dz = (g_lp (onehot - p) - g_H p (z - lse + H)) / T,
is recomputed tile by tile (`_dlogits_kernel`, which also column-sums it in fp32 for the bias) into a
workspace of one rows x columns chunk (`_Blocks`), and two accumulating GEMMs (`_matmul_acc_kernel`)
add dz @ W to the hidden gradient and dz^T @ h to the weight gradient, both accumulated in fp32. Every
output tile has exactly one writer and the chunk order is fixed by the shapes, so the result is
deterministic (no atomics, bitwise repeatable), and the backward does the minimum of 6 N V H flops for
arbitrary per-token upstream gradients (recompute, d hidden, d weight). Two loop orders:
- rows-outer / vocab-inner (chunk_rows x chunk_cols steps): a row chunk's hidden gradient is complete
  after one sweep of the vocabulary (fp32 [chunk_rows, H] buffer), but the weight gradient needs an
  fp32 [V, H] accumulator, converted once at the end.
- vocab-outer / rows-inner (chunk_rows x vocab_outer_cols steps): a vocabulary chunk's weight gradient
  is complete after one sweep of the rows (fp32 [vocab_outer_cols, H] buffer, written once into the
  gradient), but the hidden gradient needs an fp32 [N, H] accumulator, converted once at the end.
`_loop_order` picks the one with the smaller extra memory (`backward_extra_bytes`: roughly N against V;
a frozen weight or hidden drops its accumulator). fp32 gradients are their own accumulators, so fp32
inputs need neither buffer. Extra memory beyond the returned gradients, bf16, N = 65536, V = 151936,
H = 4096 (vocab-outer is chosen): fp32 [N, H] 1 GiB + fp32 [8192, H] 128 MiB + bf16 dz workspace
2048 x 8192 = 32 MiB + ~1.6 MiB of vectors = 1.16 GiB; rows-outer would need the 2.32 GiB fp32 [V, H]
accumulator + 160 MiB. The forward's [N, splits] fp32 partials are freed before the backward starts.

Block sizes (H100/A100, bf16/fp16): 128 x 128 logit tiles with BLOCK_H = 64, 8 warps, 3 stages - the
largest tile whose fp32 accumulator plus the softmax epilogue fit in registers without spilling on
sm_80 and sm_90 (checked by tests/kernels/test_compile.py); GPU timings are not measured yet.
fp32 inputs follow torch's fp32 matmul switch: exact ("ieee") fp32 dots on smaller tiles by default,
TF32 tensor-core dots where the user allowed TF32 for torch.matmul (see _cuda_fp32_matmul_precision).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from fusedrl.kernels import torch_backend
from fusedrl.kernels._checks import check_float, check_same_device, check_targets, check_temperature, device_guard
from fusedrl.kernels._compile_check import CompileSpec
from fusedrl.kernels._kept_set import PieceHistograms, check_top_k, check_top_p, effective, kept_threshold
from fusedrl.kernels._linear_kept_set import SEARCH_ROWS, _logits_kernel, triton_linear_pieces
from fusedrl.kernels._linear_tiles import grouped, logit_tile
from fusedrl.kernels._vocab_parallel import check_vocab_slices, combine_lse_slices, sum_hidden_grad


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,  # [N, H], [V, H], [V] (if HAS_BIAS), [N] int64
    stats_ptr,  # [4, N, n_splits] fp32: running max m, sum exp(z - m), sum exp(z - m) (z - m), target logit
    threshold_ptr,  # [N] fp32 lowest kept logit of each row (if HAS_THRESHOLD): the sampler's kept set
    n_rows, hidden_size, vocab_size, n_splits, tiles_per_split, ignore_index,
    vocab_start,  # vocabulary id of weight row 0 (a vocabulary-parallel slice; else 0)
    stride_h, stride_w,
    inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_n, split = grouped(pid, tl.cdiv(n_rows, BLOCK_N), n_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    any_live = tl.max((row_ok & (y != ignore_index)).to(tl.int32), 0) > 0
    k_stop = tl.where(any_live, hidden_size, 0)
    tau = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    if HAS_THRESHOLD:
        tau = tl.load(threshold_ptr + rows, mask=row_ok, other=float("-inf"))
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    first = split * tiles_per_split
    last = tl.where(any_live, tl.minimum(first + tiles_per_split, tl.cdiv(vocab_size, BLOCK_V)), first)
    for vt in range(first, last):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        # Outside the kept set (if HAS_THRESHOLD) z = -inf: p = 0, and a target there gets lp = -inf.
        z = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, hidden_size, k_stop, vocab_size,
                       stride_h, stride_w, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                       UPCAST_DOT, tau if HAS_THRESHOLD else None)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: keep exp() finite
        alpha = tl.exp(m - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # never -inf * 0
        zc = z - m_safe[:, None]
        e = tl.exp(zc)
        t = alpha * (t + shift * s) + tl.sum(tl.where(e > 0.0, e * zc, 0.0), 1)  # p = 0 adds 0, not 0 * -inf
        s = alpha * s + tl.sum(e, 1)
        zy += tl.sum(tl.where(cols[None, :] + vocab_start == y[:, None], z, 0.0), 1)
        m = m_new
    out = stats_ptr + rows * n_splits + split
    plane = tl.cast(n_rows, tl.int64) * n_splits  # N * splits passes 2^31 at a few million rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, t, mask=row_ok)
    tl.store(out + 3 * plane, zy, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,  # one chunk: [n, H], [v, H], [v], [n]
    lse_ptr, entropy_ptr, grad_lp_ptr, grad_entropy_ptr,  # [n] fp32; the gradients are 0 on ignored rows
    threshold_ptr,  # [n] fp32 lowest kept logit (if HAS_THRESHOLD)
    dlogits_ptr,  # [n, v] workspace in the input dtype
    dbias_ptr,  # [cdiv(n, BLOCK_N), v] fp32 column sums of dz per row block (if BIAS_GRAD)
    n_rows, hidden_size, vocab_size, col_offset, ignore_index,  # col_offset: vocabulary id of column 0
    stride_h, stride_w,
    inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_n, pid_v = grouped(pid, tl.cdiv(n_rows, BLOCK_N), tl.cdiv(vocab_size, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    y = tl.load(targets_ptr + rows, mask=rows < n_rows, other=-1)
    live = (rows < n_rows) & (y != ignore_index)
    k_stop = tl.where(tl.max(live.to(tl.int32), 0) > 0, hidden_size, 0)
    col_ok = cols < vocab_size
    z = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, hidden_size, k_stop, vocab_size,
                    stride_h, stride_w, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                    UPCAST_DOT)
    lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
    ent = tl.load(entropy_ptr + rows, mask=live, other=0.0)
    g_lp = tl.load(grad_lp_ptr + rows, mask=live, other=0.0)
    g_ent = tl.load(grad_entropy_ptr + rows, mask=live, other=0.0)
    is_target = cols[None, :] + col_offset == y[:, None]
    if HAS_THRESHOLD:
        kept = z >= tl.load(threshold_ptr + rows, mask=rows < n_rows, other=float("-inf"))[:, None]
        z = tl.where(kept, z, float("-inf"))
        is_target = is_target & kept  # a target outside the kept set has lp = -inf: no one-hot term
    p = tl.exp(z - lse[:, None])  # exactly 0 on -inf logits and on masked lanes
    ent_term = tl.where(p > 0.0, p * (z - lse[:, None] + ent[:, None]), 0.0)
    onehot = is_target.to(tl.float32)
    dz = (g_lp[:, None] * (onehot - p) - g_ent[:, None] * ent_term) * inv_temperature
    dz = tl.where(live[:, None] & col_ok[None, :], dz, 0.0)  # ignored rows: exactly 0, whatever z was
    tl.store(dlogits_ptr + rows[:, None] * vocab_size + cols[None, :], dz.to(dlogits_ptr.dtype.element_ty),
             mask=(rows < n_rows)[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        tl.store(dbias_ptr + pid_n * vocab_size + cols, tl.sum(dz, 0), mask=col_ok)


@triton.jit
def _matmul_acc_kernel(
    a_ptr, b_ptr, c_ptr,  # a: [M, K] (or [K, M] stored if A_TRANSPOSED), b: [K, N], c: [M, N] fp32; rows contiguous
    k_targets_ptr,  # [K] int64 targets (if MASK_K): rows k of b whose target is ignore_index read as 0
    M, N, K,
    stride_a, stride_b, stride_c,  # row strides
    ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr, MASK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """c += a @ b with fp32 accumulation; one program per c tile, so the sum order is fixed.

    MASK_K (the weight gradient dz^T @ h): an ignored row's hidden state is never read, so that a NaN
    or inf there (padding) cannot turn its zero dz into 0 * NaN = NaN in every column."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = grouped(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if A_TRANSPOSED:
        a_ptrs = a_ptr + offs_k[None, :] * stride_a + offs_m[:, None]
    else:
        a_ptrs = a_ptr + offs_m[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_b + offs_n[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_c + offs_n[None, :]
    c_ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(c_ptrs, mask=c_ok, other=0.0)  # accumulate on top of c: no second tile live at the end
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k + k < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok
        if MASK_K:
            b_ok = k_ok & (tl.load(k_targets_ptr + offs_k + k, mask=k_ok, other=ignore_index) != ignore_index)
        b = tl.load(b_ptrs, mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_a if A_TRANSPOSED else BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    tl.store(c_ptrs, acc, mask=c_ok)


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Block sizes and chunking for one device / dtype (see the module docstring for the choice)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    gemm_block: tuple[int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K) of the accumulating GEMM
    gemm_warps: int
    gemm_stages: int
    chunk_rows: int  # backward workspace: rows x columns of dz per step
    chunk_cols: int
    vocab_outer_cols: int  # columns per step in the vocab-outer order (its fp32 [cols, H] buffer stays small)
    dot_precision: str
    upcast_dot: bool = False  # Triton 3.9's interpreter multiplies bf16 dot operands wrongly; fp32 copies
    # of them give the same exact products that a bf16 tensor-core dot sums in fp32
    kept_forward_stages: int = 0  # the forward's stages with a kept-set threshold; 0: num_stages. Stages
    # only schedule loads, so the logits are the same bits either way.


GROUP_N = 8  # row blocks side by side: 8 hidden blocks (8 MiB at H = 4096) stay in L2 while weights stream
TILES_PER_SPLIT = 32  # vocabulary tiles per forward work item: at N = 8192, V = 131072, 2048 items (15.5 waves)
_GPU_16BIT = _Blocks(128, 128, 64, 8, 3, (128, 128, 64), 8, 3, 2048, 32768, 8192, "ieee")  # 16-bit products are exact
# Exact fp32 products run on FMA units: small tiles; the GEMM takes 8 warps because 4 leave a stack
# frame on sm_90 under Triton 3.6 (the GPU image's version).
# With a kept-set threshold its forward spills 24 bytes on sm_90 at 2 stages (compile check), so it takes 1.
_GPU_FP32 = _Blocks(64, 64, 32, 4, 2, (64, 64, 16), 8, 3, 1024, 16384, 16384, "ieee", kept_forward_stages=1)
# fp32 where torch.matmul may use TF32 (e.g. set_float32_matmul_precision("high")): tensor-core products (10-bit
# mantissa, as torch.matmul then uses) on the 16-bit path's tile sizes with BLOCK_K 32, which compile
# without spills on sm_80 / sm_90 under Triton 3.6 and 3.9; fp32's chunk budget.
_GPU_TF32 = _Blocks(128, 128, 32, 8, 3, (128, 128, 32), 8, 3, 1024, 16384, 16384, "tf32")
# Under the interpreter (CPU) small blocks keep the tests fast and still cross every tile, split and
# chunk boundary at the tested shapes.
_INTERPRETER = _Blocks(16, 64, 32, 4, 1, (32, 32, 32), 4, 1, 48, 512, 256, "ieee", upcast_dot=True)


def _blocks(t: torch.Tensor) -> _Blocks:
    if not t.is_cuda:
        return _INTERPRETER
    return _gpu_blocks(t.dtype, _cuda_fp32_matmul_precision())


def _cuda_fp32_matmul_precision() -> str:
    """"tf32" where torch.matmul may multiply fp32 CUDA tensors in TF32, else "ieee"; read the way
    cuBLAS reads it, whichever of torch's switches the user set."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        # torch >= 2.9: the per-backend setting, which inherits torch.backends.fp32_precision and
        # follows set_float32_matmul_precision / allow_tf32 (get_float32_matmul_precision raises
        # once the old and new APIs are mixed).
        return "tf32" if matmul.fp32_precision == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _gpu_blocks(dtype: torch.dtype, fp32_precision: str) -> _Blocks:
    """fp32 follows torch's switch for fp32 matmuls, as torch.matmul (and so the torch backend) does:
    exact fp32 products by default ("ieee"), TF32 where the user allowed it ("tf32")."""
    if dtype != torch.float32:
        return _GPU_16BIT
    return _GPU_TF32 if fp32_precision == "tf32" else _GPU_FP32


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, enough to split the vocabulary in tests
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def _vocab_splits(n_row_blocks: int, n_tiles: int, n_sm: int) -> tuple[int, int]:
    """(ranges per row block, tiles per range): about TILES_PER_SPLIT tiles per work item, and at least
    two work items per SM when N is small, so that the GPU fills up at any N."""
    wanted = max(triton.cdiv(n_tiles, TILES_PER_SPLIT), triton.cdiv(2 * n_sm, n_row_blocks))
    tiles = triton.cdiv(n_tiles, min(wanted, n_tiles))
    return triton.cdiv(n_tiles, tiles), tiles


def _work_items(n_rows: int, vocab_size: int, cfg: "_Blocks", device, batch_invariant: bool):
    """(row blocks, vocabulary ranges per row block, tiles per range) of the forward kernel.

    batch_invariant: the ranges depend on V only (TILES_PER_SPLIT tiles each), so a row's partials
    and their merge are the same whatever N is; otherwise small batches get more ranges to fill the
    GPU (_vocab_splits), which changes the order in which a row's ranges are merged."""
    n_row_blocks = triton.cdiv(n_rows, cfg.block_n)
    n_tiles = triton.cdiv(vocab_size, cfg.block_v)
    if batch_invariant:
        return n_row_blocks, *_vocab_splits(1, n_tiles, 0)
    return n_row_blocks, *_vocab_splits(n_row_blocks, n_tiles, _num_sms(device))


def _forward_stages(cfg: "_Blocks", kept: bool) -> int:
    return cfg.kept_forward_stages if kept and cfg.kept_forward_stages else cfg.num_stages


def _forward_stats(hidden, weight, bias, targets, options: "_Options", tau=None):
    """The forward kernel's per-range partials [4, N, splits] (over the kept set {z >= tau} if given)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    cfg = _blocks(hidden)
    n_row_blocks, splits, tiles = _work_items(n_rows, vocab_size, cfg, hidden.device, options.batch_invariant)
    stats = torch.empty(4, n_rows, splits, dtype=torch.float32, device=hidden.device)  # each slot written once
    _forward_kernel[(n_row_blocks * splits,)](
        hidden, weight, weight if bias is None else bias, targets, stats, stats if tau is None else tau,
        n_rows, hidden_size, vocab_size, splits, tiles, options.ignore_index, options.vocab_start,
        hidden.stride(0), weight.stride(0),
        options.inv_temperature,
        HAS_BIAS=bias is not None, HAS_THRESHOLD=tau is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        GROUP_N=GROUP_N, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
        num_warps=cfg.num_warps, num_stages=_forward_stages(cfg, tau is not None),
    )
    return stats


def _threshold(hidden, weight, bias, options: "_Options"):
    """tau [N] of the kept set (kernels/_kept_set.py), searched on the op's own logit tiles."""
    pieces = triton_linear_pieces(hidden, weight, bias, options.inv_temperature, _blocks(hidden), GROUP_N)
    source = PieceHistograms(pieces, 1.0, hidden.device)
    return kept_threshold(source, hidden.shape[0], options.top_k, options.top_p, hidden.device,
                          options.process_group, block_rows=SEARCH_ROWS)


def _forward(hidden, weight, bias, targets, options: "_Options", tau=None):
    """lp, H and lse for [N, H] hidden, [V, H] weight and [N] int64 targets (all fp32, [N]); with
    vocab_start > 0 of a vocabulary slice, whose rows with a target elsewhere get a meaningless lp."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    stats = _forward_stats(hidden, weight, bias, targets, options, tau)
    return _combine(stats, targets != options.ignore_index, options.batch_invariant)


def _combine(stats: torch.Tensor, valid: torch.Tensor, in_order: bool = False):
    """Merge the per-range partials of each row (the same algebra as the kernel's online update).

    in_order: add the ranges one at a time, first to last (a few elementwise launches per range), so
    that a row's sums do not depend on how torch splits a reduction over an [N, ranges] tensor."""
    m, s, t, target_logit = stats.unbind(0)
    top = m.amax(1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    scale = torch.exp(m - top)
    shift = torch.where(scale > 0, m - top, 0.0)  # ranges that saw only -inf logits add nothing
    weighted = scale * (t + shift * s)
    scale_s = scale * s
    if in_order:
        total, weighted_sum, target_sum = scale_s[:, 0], weighted[:, 0], target_logit[:, 0]
        for j in range(1, m.shape[1]):
            total, weighted_sum = total + scale_s[:, j], weighted_sum + weighted[:, j]
            target_sum = target_sum + target_logit[:, j]
    else:
        total, weighted_sum, target_sum = scale_s.sum(1), weighted.sum(1), target_logit.sum(1)
    log_total = torch.log(total)
    lse = top.squeeze(1) + log_total
    entropy = log_total - weighted_sum / total
    logprobs = target_sum - lse
    # Rows of fully ignored blocks were skipped (no partials): lse there is meaningless, so 0.
    return torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0), torch.where(valid, lse, 0.0)


def _matmul_acc(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cfg: _Blocks,
                k_targets: torch.Tensor | None = None, ignore_index: int = 0) -> None:
    """c (fp32) += a @ b, where a is row-major or the transpose of a row-major tensor; with k_targets,
    the rows of b whose target is ignore_index read as zeros."""
    (m, k), n = a.shape, b.shape[1]
    transposed = a.stride(0) == 1 and a.stride(1) != 1
    stride_a = a.stride(1) if transposed else a.stride(0)
    bm, bn, bk = cfg.gemm_block
    _matmul_acc_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        a, b, c, c if k_targets is None else k_targets, m, n, k, stride_a, b.stride(0), c.stride(0), ignore_index,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_N, A_TRANSPOSED=transposed,
        MASK_K=k_targets is not None,
        DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
        num_warps=cfg.gemm_warps, num_stages=cfg.gemm_stages,
    )


ROWS_OUTER, VOCAB_OUTER = "rows_outer", "vocab_outer"


def _chunks(order: str, n_rows: int, vocab_size: int, cfg: _Blocks) -> tuple[int, int]:
    """(rows, columns) of one backward step for the given loop order."""
    cols = cfg.chunk_cols if order == ROWS_OUTER else cfg.vocab_outer_cols
    return min(n_rows, cfg.chunk_rows), min(vocab_size, cols)


def backward_extra_bytes(order: str, n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                         needs: tuple[bool, bool, bool], cfg: _Blocks) -> int:
    """Bytes the backward allocates beyond the returned gradients, for one loop order (module docstring).

    fp32 gradients are accumulated in place, so only 16-bit inputs pay for fp32 accumulators."""
    need_h, need_w, need_b = needs
    rows, cols = _chunks(order, n_rows, vocab_size, cfg)
    acc = 0 if dtype == torch.float32 else 4
    hidden_acc_rows = rows if order == ROWS_OUTER else n_rows
    weight_acc_rows = vocab_size if order == ROWS_OUTER else cols
    return (
        rows * cols * dtype.itemsize  # the dz workspace
        + need_h * hidden_acc_rows * hidden_size * acc
        + need_w * weight_acc_rows * hidden_size * acc
        + need_b * (triton.cdiv(rows, cfg.block_n) * cols + vocab_size) * 4  # bias column sums, fp32 d bias
        + 2 * n_rows * 4  # the masked fp32 upstream gradients
    )


def _loop_order(n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                needs: tuple[bool, bool, bool], cfg: _Blocks) -> str:
    """The loop order with the smaller extra memory (rows-outer on a tie)."""
    extra = {order: backward_extra_bytes(order, n_rows, vocab_size, hidden_size, dtype, needs, cfg)
             for order in (ROWS_OUTER, VOCAB_OUTER)}
    return VOCAB_OUTER if extra[VOCAB_OUTER] < extra[ROWS_OUTER] else ROWS_OUTER


def _backward(hidden, weight, bias, targets, lse, entropy, tau, grad_lp, grad_entropy, options, needs):
    """Gradients for (hidden, weight, bias), each None where not needed; see the module docstring."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    cfg = _blocks(hidden)
    valid = targets != options.ignore_index
    grad_lp = torch.where(valid, grad_lp.float(), 0.0).contiguous()  # ignored rows contribute nothing
    grad_entropy = torch.where(valid, grad_entropy.float(), 0.0).contiguous()
    need_h, need_w, need_b = needs
    order = _loop_order(n_rows, vocab_size, hidden_size, hidden.dtype, needs, cfg)
    rows, cols = _chunks(order, n_rows, vocab_size, cfg)
    in_place = hidden.dtype == torch.float32  # fp32 gradients are their own accumulators
    # With a process group the ranks' partial hidden gradients are summed in fp32, then rounded once.
    hidden_grad_dtype = hidden.dtype if options.process_group is None else torch.float32
    in_place_h = hidden_grad_dtype == torch.float32
    workspace = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
    dbias_blocks = (torch.empty(triton.cdiv(rows, cfg.block_n) * cols, dtype=torch.float32, device=hidden.device)
                    if need_b else None)
    db = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if need_b else None

    def step(r0, r1, c0, c1, dh, dw):
        """Recompute dz for rows r0:r1 x columns c0:c1; dh (fp32, rows r0:r1) += dz @ W[c0:c1],
        dw (fp32, columns c0:c1) += dz^T @ h[r0:r1], db[c0:c1] += column sums of dz."""
        dz = workspace[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        n_row_blocks = triton.cdiv(r1 - r0, cfg.block_n)
        _dlogits_kernel[(n_row_blocks * triton.cdiv(c1 - c0, cfg.block_v),)](
            hidden[r0:r1], weight[c0:c1], weight if bias is None else bias[c0:c1], targets[r0:r1],
            lse[r0:r1], entropy[r0:r1], grad_lp[r0:r1], grad_entropy[r0:r1],
            lse if tau is None else tau[r0:r1],
            dz, grad_lp if dbias_blocks is None else dbias_blocks,  # an fp32 stand-in: never touched
            r1 - r0, hidden_size, c1 - c0, c0 + options.vocab_start, options.ignore_index,
            hidden.stride(0), weight.stride(0),
            options.inv_temperature,
            HAS_BIAS=bias is not None, HAS_THRESHOLD=tau is not None, BIAS_GRAD=need_b,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            GROUP_N=GROUP_N, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if need_b:
            db[c0:c1] += dbias_blocks[: n_row_blocks * (c1 - c0)].view(n_row_blocks, c1 - c0).sum(0)
        if need_h:
            _matmul_acc(dz, weight[c0:c1], dh, cfg)
        if need_w:
            _matmul_acc(dz.t(), hidden[r0:r1], dw, cfg, targets[r0:r1], options.ignore_index)

    def fp32_zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float32, device=hidden.device)

    grad_hidden = grad_weight = None
    if order == ROWS_OUTER:
        # Each row chunk's hidden gradient is complete after one sweep over the vocabulary; the weight
        # gradient needs all rows, so it accumulates in fp32 [V, H] and is converted once at the end.
        dw = fp32_zeros(vocab_size, hidden_size) if need_w else None
        if need_h:
            grad_hidden = torch.empty(hidden.shape, dtype=hidden_grad_dtype, device=hidden.device)
            dh_chunk = None if in_place_h else fp32_zeros(rows, hidden_size)
        for r0 in range(0, n_rows, rows):
            r1 = min(n_rows, r0 + rows)
            dh = None
            if need_h:
                dh = grad_hidden[r0:r1] if in_place_h else dh_chunk[: r1 - r0]
                dh.zero_()
            for c0 in range(0, vocab_size, cols):
                c1 = min(vocab_size, c0 + cols)
                step(r0, r1, c0, c1, dh, None if dw is None else dw[c0:c1])
            if need_h and not in_place_h:
                grad_hidden[r0:r1] = dh
        if need_w:
            grad_weight = dw.to(weight.dtype)  # a no-op for fp32; else the fp32 buffer dies on return
    else:
        # Each vocabulary chunk's weight gradient is complete after one sweep over the rows; the hidden
        # gradient needs all columns, so it accumulates in fp32 [N, H] and is converted once at the end.
        dh = fp32_zeros(n_rows, hidden_size) if need_h else None
        if need_w:
            grad_weight = torch.empty_like(weight)
            dw_chunk = None if in_place else fp32_zeros(cols, hidden_size)
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            dw = None
            if need_w:
                dw = grad_weight[c0:c1] if in_place else dw_chunk[: c1 - c0]
                dw.zero_()
            for r0 in range(0, n_rows, rows):
                r1 = min(n_rows, r0 + rows)
                step(r0, r1, c0, c1, None if dh is None else dh[r0:r1], dw)
            if need_w and not in_place:
                grad_weight[c0:c1] = dw
        if need_h:
            grad_hidden = dh.to(hidden_grad_dtype)
    if options.process_group is not None:
        grad_hidden = sum_hidden_grad(grad_hidden, hidden.dtype, options.process_group, options.batch_invariant)
    return grad_hidden, grad_weight, None if db is None else db.to(bias.dtype)


@dataclasses.dataclass(frozen=True)
class _Options:
    inv_temperature: float
    ignore_index: int
    process_group: object = None  # vocabulary parallelism: the ranks that hold the other slices
    vocab_start: int = 0  # vocabulary id of this rank's first weight row
    top_k: int | None = None  # the sampler's kept set (kernels/_kept_set.py), effective() settings
    top_p: float | None = None
    batch_invariant: bool = False  # vocabulary ranges fixed by V (_work_items); ranges merged in order


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: _Options):
        with device_guard(hidden):
            keeps_all = options.top_k is None and options.top_p is None
            tau = None if keeps_all or hidden.shape[0] == 0 else _threshold(hidden, weight, bias, options)
            logprobs, entropy, lse = _forward(hidden, weight, bias, targets, options, tau)
        if options.process_group is not None:
            valid = targets != options.ignore_index
            logprobs, entropy, lse = combine_lse_slices(logprobs, entropy, lse, targets, valid, options.vocab_start,
                                                        weight.shape[0], options.process_group)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, tau)
        ctx.options = options
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, tau = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with device_guard(hidden):
            grads = _backward(hidden, weight, bias, targets, lse, entropy, tau, grad_lp, grad_entropy, ctx.options,
                              needs)
        return (*grads, None, None)


BACKENDS = ("auto", "triton", "torch")


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    vocab_start: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [..., H] final hidden states, float32 / bfloat16 / float16.
        weight: [V, H] output embedding, the dtype of `hidden` (often tied to the input embedding).
        targets: integer ids of the leading shape of `hidden`, each in [0, V) or equal to `ignore_index`.
        bias: optional [V] output bias, the dtype of `hidden`.
        temperature: T > 0, a runtime value (changing it never recompiles).
        ignore_index: rows whose target equals it get lp = H = 0 and add nothing to any gradient.
        backend: "triton" (fused kernels; CUDA, or the interpreter with TRITON_INTERPRET=1), "torch"
            (chunked plain PyTorch, fusedrl.kernels.torch_backend), or "auto" (triton on CUDA, else torch).
        process_group: vocabulary parallelism (a torch.distributed group, or None): each rank passes the
            same hidden states and targets (global ids) and its slice weight[V_r, H] (and bias[V_r]) of
            the output embedding, starting at id `vocab_start`; the slices, in rank order, must tile
            [0, V). lp and H are those of the full softmax on every rank. The hidden gradient is the
            full one on every rank (the op sums the ranks' parts in fp32: do not all-reduce it again);
            weight and bias get their slice's gradient. See docs/linear_logprobs_and_entropy.md.
        vocab_start: the vocabulary id of this rank's first weight row; 0 without a process_group.
        top_k, top_p: the sampler's kept set, as in fusedrl.kernels.logprobs_and_entropy (vLLM's order;
            a target outside gets lp = -inf; gradients through the kept set only). The threshold search
            recomputes the logits: top-k costs 4 extra forward matmuls, top-p 5, both 8 (Triton backend;
            docs/linear_logprobs_and_entropy.md).
        batch_invariant: every row's lp, H and hidden gradient bitwise the same whether the row is
            computed alone or in any batch, at any offset (docs/linear_logprobs_and_entropy.md, "Batch
            invariance": the Triton backend then splits the vocabulary by V only; the torch backend
            multiplies one row at a time, which is slow).

    Returns:
        (logprobs, entropy), float32, of the leading shape. Differentiable with respect to hidden, weight
        and bias through either or both outputs; the weight gradient is accumulated in float32 and returned
        in the weight's dtype. No [N, V] tensor is allocated, forward or backward.

    Raises:
        ValueError: naming the argument, for wrong shapes, dtypes, devices, target ids, temperature or
            backend; raised before any kernel launch.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    vocab_size = weight.shape[0]
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (vocab_size,):
            raise ValueError(f"bias must have shape [V] = ({vocab_size},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
    if not isinstance(batch_invariant, bool):
        raise ValueError(f"batch_invariant must be a bool, got {batch_invariant!r}")
    full_vocab = check_vocab_slices(vocab_start, vocab_size, process_group, hidden.device)
    check_targets(targets, hidden.shape[:-1], full_vocab, ignore_index)
    top_k, top_p = effective(top_k, top_p, full_vocab)
    temperature = check_temperature(temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return torch_backend.linear_logprobs_and_entropy_torch(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            process_group=process_group, vocab_start=vocab_start, top_k=top_k, top_p=top_p,
            batch_invariant=batch_invariant,
        )

    leading = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    options = _Options(inv_temperature=1.0 / temperature, ignore_index=int(ignore_index),
                       process_group=process_group, vocab_start=int(vocab_start), top_k=top_k, top_p=top_p,
                       batch_invariant=batch_invariant)
    targets_1d = targets.reshape(-1).to(torch.int64).contiguous()
    logprobs, entropy = _LinearLogprobsEntropy.apply(hidden_2d, weight, bias, targets_1d, options)
    return logprobs.view(leading), entropy.view(leading)


def _specs() -> list[CompileSpec]:
    """Production configurations. Pointers and the sizes / strides that are multiples of 16 at the
    design shapes (H = 4096, V = 131072) are declared divisible by 16, as the JIT would specialise."""
    aligned = {"hidden_size", "vocab_size", "stride_h", "stride_w", "M", "N", "K", "stride_a", "stride_b", "stride_c"}

    specs = []
    for cfg, name, label in ((_GPU_16BIT, "bf16", "bf16"), (_GPU_16BIT, "fp16", "fp16"),
                             (_GPU_FP32, "fp32", "fp32"), (_GPU_TF32, "fp32", "tf32")):
        on_tensor_cores = not (name == "fp32" and cfg.dot_precision == "ieee")  # exact fp32: FMA units

        def spec(name, fn, signature, constexprs, warps, stages):
            divisible = tuple(a for a, ty in signature.items() if ty.startswith("*") or a in aligned)
            return CompileSpec(name, fn, signature, constexprs, warps, stages, divisible, on_tensor_cores)

        tile = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h, "GROUP_N": GROUP_N,
                "DOT_PRECISION": cfg.dot_precision, "UPCAST_DOT": False, "HAS_BIAS": True}
        common = {"hidden_ptr": f"*{name}", "weight_ptr": f"*{name}", "bias_ptr": f"*{name}", "targets_ptr": "*i64"}
        sizes = {"n_rows": "i32", "hidden_size": "i32", "vocab_size": "i32", "n_splits": "i32",
                 "tiles_per_split": "i32", "ignore_index": "i32"}
        # The kept-set variants (top-k / top-p threshold) where the tile shape differs: 16-bit and exact fp32.
        kept_variants = (False, True) if label in ("bf16", "fp32") else (False,)
        for kept in kept_variants:
            suffix = "_kept" if kept else ""
            specs.append(spec(
                f"forward{suffix}_{label}", _forward_kernel,
                {**common, "stats_ptr": "*fp32", "threshold_ptr": "*fp32", **sizes, "vocab_start": "i32",
                 "stride_h": "i32", "stride_w": "i32", "inv_temperature": "fp32"},
                {**tile, "HAS_THRESHOLD": kept}, cfg.num_warps, _forward_stages(cfg, kept),
            ))
            specs.append(spec(
                f"dlogits{suffix}_{label}", _dlogits_kernel,
                {**common, "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_lp_ptr": "*fp32",
                 "grad_entropy_ptr": "*fp32", "threshold_ptr": "*fp32", "dlogits_ptr": f"*{name}", "dbias_ptr": "*fp32",
                 "n_rows": "i32", "hidden_size": "i32", "vocab_size": "i32", "col_offset": "i32", "ignore_index": "i32",
                 "stride_h": "i32", "stride_w": "i32", "inv_temperature": "fp32"},
                {**tile, "HAS_THRESHOLD": kept, "BIAS_GRAD": True}, cfg.num_warps, cfg.num_stages,
            ))
        specs.append(spec(
            f"logits_{label}", _logits_kernel,
            {"hidden_ptr": f"*{name}", "weight_ptr": f"*{name}", "bias_ptr": f"*{name}", "out_ptr": "*fp32",
             "n_rows": "i32", "hidden_size": "i32", "vocab_size": "i32", "stride_h": "i32", "stride_w": "i32",
             "inv_temperature": "fp32"},
            tile, cfg.num_warps, cfg.num_stages,
        ))
        bm, bn, bk = cfg.gemm_block
        specs.extend(spec(
            f"matmul_acc_{label}{'_at' if transposed else ''}", _matmul_acc_kernel,
            {"a_ptr": f"*{name}", "b_ptr": f"*{name}", "c_ptr": "*fp32", "k_targets_ptr": "*i64", "M": "i32",
             "N": "i32", "K": "i32", "stride_a": "i32", "stride_b": "i32", "stride_c": "i32", "ignore_index": "i32"},
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_N, "A_TRANSPOSED": transposed,
             "MASK_K": transposed, "DOT_PRECISION": cfg.dot_precision, "UPCAST_DOT": False},
            cfg.gemm_warps, cfg.gemm_stages,
        ) for transposed in (False, True))
    return specs


COMPILE_SPECS = _specs()
