"""Per-token log-prob and entropy from logits, fused: lp = log softmax(x / T)[y], H = -sum p log p.

The forward reads each logits row once, streaming over the vocabulary with an online max, sum of
exponentials and sum of p * z in fp32 (ALGORITHMS.md section 1), and keeps only the per-row
log-sum-exp and entropy for the backward. The backward reads the row once more, recomputes p block
by block and writes d logits = (g_lp (onehot(y) - p) - g_H p (log p + H)) / T once, in the logits'
dtype, optionally into the logits' own storage.

Block sizes. The op is memory-bound: at V = 151,936 bf16 a row is 297 KiB and the arithmetic is a
few flops per byte. A program owns BLOCK_N rows and walks them in tiles of BLOCK_N x BLOCK_V
= 8192 elements with 16 warps, so each thread holds 16 consecutive elements per tile: two 16-byte
vector loads for bf16 (when V and the row strides are multiples of 8, which Triton's divisibility
specialisation sees for every padded vocabulary: 32,000, 128,256, 151,936, 152,064). The loop is
software-pipelined (tl.range num_stages=2), so the next tile's loads are in flight while this one
is reduced; together with several resident programs per SM that keeps the tens of KiB per SM in
flight that HBM3 needs. Each element costs one exponential: the running max is a per-tile scalar
(one reduction per tile), so the per-element rescale is a broadcast multiply, not a second exp, and
the kernel stays well under the SFU throughput at 3 TB/s. Short vocabularies put several rows in a
program (BLOCK_N > 1) so that small-V calls do not launch one tiny program per row.

Grid: one axis, cdiv(N, BLOCK_N) programs (CUDA allows 2^31 - 1 on axis 0), program ids cast to
int64 before any offset arithmetic, so N * V above 2^31 is addressed correctly.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from fusedrl.kernels._checks import check_float, check_same_device, check_targets, check_temperature
from fusedrl.kernels._compile_check import CompileSpec
from fusedrl.kernels._rows import RowLayout, row_layout, rows_are_disjoint
from fusedrl.kernels.reference import LogprobsEntropyOptions, logprobs_and_entropy_torch


@triton.jit(do_not_specialize=["n_rows", "inner_rows", "ignore_index"])
def _forward_kernel(
    logits_ptr, targets_ptr, lp_ptr, entropy_ptr, lse_ptr,
    n_rows, vocab, inner_rows, stride_outer, stride_inner,  # row r at (r // inner) * so + (r % inner) * si
    inv_temperature, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    active = in_rows & (targets != ignore_index)  # ignored rows read nothing
    row_ptr = logits_ptr + (rows.to(tl.int32) // inner_rows).to(tl.int64) * stride_outer + (rows.to(tl.int32) % inner_rows).to(tl.int64) * stride_inner
    cols = tl.arange(0, BLOCK_V)

    # Online statistics relative to the running max m: s = sum exp(z - m), t = sum exp(z - m) (z - m),
    # kept per lane and reduced once at the end. H = log S - T / S needs no cancellation of large
    # numbers, unlike lse - sum p z.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        mask = active[:, None] & (offs < vocab)[None, :]
        # Lanes past V load -inf: exp(-inf - m) = 0 adds nothing (other=0 would add exp(-m)).
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=mask, other=float("-inf"))
        z = x.to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        alpha = tl.exp(m - ref)[:, None]
        shift = tl.where(m == float("-inf"), 0.0, m - ref)[:, None]  # s = 0 there: avoid 0 * -inf
        e = tl.exp(z - ref[:, None])
        e_z = tl.where(z == float("-inf"), 0.0, e * (z - ref[:, None]))  # p = 0 adds 0, not 0 * -inf
        t = alpha * (t + shift * s) + e_z
        s = alpha * s + e
        m = m_new

    ref = tl.where(m == float("-inf"), 0.0, m)
    s_row = tl.sum(s, axis=1)
    log_s = tl.log(s_row)
    lse = ref + log_s
    entropy = log_s - tl.sum(t, axis=1) / s_row
    x_target = tl.load(row_ptr + targets, mask=active, other=0.0).to(tl.float32)
    lp = x_target * inv_temperature - lse
    tl.store(lp_ptr + rows, tl.where(active, lp, 0.0), mask=in_rows)
    tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=in_rows)
    tl.store(lse_ptr + rows, lse, mask=in_rows)


@triton.jit(do_not_specialize=["n_rows", "inner_rows", "ignore_index"])
def _backward_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_entropy_ptr,
    n_rows, vocab, inner_rows, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    inv_temperature, ignore_index,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,  # which outputs carry a gradient
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    active = in_rows & (targets != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
    # Per-row coefficients, already divided by T; zero on ignored rows.
    g_lp = tl.zeros([BLOCK_N], tl.float32)
    g_h = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GRAD_LP:
        g_lp = tl.load(grad_lp_ptr + rows, mask=active, other=0.0) * inv_temperature
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=active, other=0.0) * inv_temperature
    outer = (rows.to(tl.int32) // inner_rows).to(tl.int64)
    inner = (rows.to(tl.int32) % inner_rows).to(tl.int64)
    in_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    out_ptr = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    cols = tl.arange(0, BLOCK_V)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        in_vocab = (offs < vocab)[None, :]
        x = tl.load(in_ptr[:, None] + offs[None, :], mask=active[:, None] & in_vocab, other=float("-inf"))
        logp = x.to(tl.float32) * inv_temperature - lse[:, None]
        p = tl.exp(logp)
        d = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        if HAS_GRAD_LP:
            d += tl.where(offs[None, :] == targets[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
        if HAS_GRAD_ENTROPY:
            # log p = -inf means p = 0: the term is 0, never 0 * -inf.
            d -= g_h[:, None] * tl.where(logp == float("-inf"), 0.0, p * (logp + entropy[:, None]))
        d = tl.where(active[:, None], d, 0.0)  # ignored rows: an exact zero row
        tl.store(out_ptr[:, None] + offs[None, :], d.to(grad_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab)


# Block sizes (see the module docstring): every thread holds 16 consecutive elements of a tile.
MAX_BLOCK_V = 8192
SMALL_TILE = 2048  # elements per tile when several short rows share a program...
MAX_BLOCK_N = 128  # ...but at most this many (unaligned rows keep a 64-bit pointer per element)
ELEMENTS_PER_THREAD = 16
NUM_STAGES = 3


def _config(vocab: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) for a vocabulary size. Depends on V only, which is fixed per
    model, so a changing number of rows never recompiles."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    block_n = min(MAX_BLOCK_N, max(1, SMALL_TILE // block_v))
    num_warps = max(1, block_n * block_v // (32 * ELEMENTS_PER_THREAD))
    return block_n, block_v, num_warps, (NUM_STAGES if block_n == 1 else 1)


def _grid(n_rows: int, block_n: int) -> tuple[int]:
    # Axis 0 only: CUDA allows 2^31 - 1 programs there (65,535 on axes 1 and 2).
    return (triton.cdiv(n_rows, block_n),)


def _forward(logits: torch.Tensor, targets: torch.Tensor, layout: RowLayout, options: LogprobsEntropyOptions):
    """lp, H and lse, each fp32 [N], of validated logits [..., V] and flat int64 targets [N]."""
    n_rows, vocab = layout.n_rows, logits.shape[-1]
    lp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy, lse = torch.empty_like(lp), torch.empty_like(lp)
    if n_rows == 0:
        return lp, entropy, lse
    block_n, block_v, num_warps, num_stages = _config(vocab)
    _forward_kernel[_grid(n_rows, block_n)](
        logits, targets, lp, entropy, lse,
        n_rows, vocab, layout.inner, layout.stride_outer, layout.stride_inner,
        1.0 / options.temperature, options.ignore_index,
        BLOCK_N=block_n, BLOCK_V=block_v, NUM_STAGES=num_stages, num_warps=num_warps,
    )  # fmt: skip
    return lp, entropy, lse


def _backward(logits, targets, lse, entropy, grad_lp, grad_entropy, layout: RowLayout, options: LogprobsEntropyOptions):
    """d logits in the logits' dtype; written over the logits when options.inplace_backward allows it
    and no two rows share memory."""
    in_place = options.inplace_backward and rows_are_disjoint(logits)
    grad = logits if in_place else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if layout.n_rows == 0:
        return grad
    # Upstream gradients may be expanded (stride 0, e.g. from .sum()); an [N] copy is cheap.
    grad_lp = None if grad_lp is None else grad_lp.reshape(-1).float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
    # The gradient is the logits themselves (their strides) or contiguous: row o * inner + i at
    # (o * inner + i) * V.
    vocab = logits.shape[-1]
    if in_place:
        grad_strides = (layout.stride_outer, layout.stride_inner)
    else:
        grad_strides = (layout.inner * vocab, vocab)
    block_n, block_v, num_warps, num_stages = _config(vocab)
    _backward_kernel[_grid(layout.n_rows, block_n)](
        logits, grad, targets, lse, entropy,
        grad_lp if grad_lp is not None else lse, grad_entropy if grad_entropy is not None else lse,
        layout.n_rows, vocab, layout.inner, layout.stride_outer, layout.stride_inner, *grad_strides,
        1.0 / options.temperature, options.ignore_index,
        HAS_GRAD_LP=grad_lp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_N=block_n, BLOCK_V=block_v, NUM_STAGES=num_stages, num_warps=num_warps,
    )  # fmt: skip
    return grad


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, options: LogprobsEntropyOptions):
        layout = row_layout(logits)
        flat_targets = targets.reshape(-1).long()
        lp, entropy, lse = _forward(logits, flat_targets, layout, options)
        ctx.save_for_backward(logits, flat_targets, lse, entropy)
        ctx.layout, ctx.options = layout, options
        ctx.set_materialize_grads(False)
        return lp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        if grad_lp is None and grad_entropy is None:
            return None, None, None
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = _backward(logits, targets, lse, entropy, grad_lp, grad_entropy, ctx.layout, ctx.options)
        return grad, None, None


BACKENDS = ("auto", "triton", "torch")


def _check_inputs(logits, targets, temperature, ignore_index, backend, inplace_backward) -> LogprobsEntropyOptions:
    check_float("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"logits' last dimension must be contiguous (stride 1), got strides {logits.stride()}")
    check_same_device(logits=logits, targets=targets if isinstance(targets, torch.Tensor) else None)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    temperature = check_temperature(temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if _resolve_backend(backend, logits) == "triton":
        if logits.device.type != "cuda" and not isinstance(_forward_kernel, InterpretedFunction):
            raise ValueError(
                "backend='triton' needs logits on a CUDA device, or TRITON_INTERPRET=1 set before triton "
                f"is imported to run on {logits.device.type}"
            )
        if targets.numel() >= 2**31:
            raise ValueError(f"logits must have fewer than 2^31 rows for backend='triton', got {targets.numel()}")
    return LogprobsEntropyOptions(temperature=temperature, ignore_index=ignore_index, inplace_backward=inplace_backward)


def _resolve_backend(backend: str, logits: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if logits.device.type == "cuda" else "torch"
    return backend


def logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the targets and full-vocabulary entropy, at temperature T.

    lp[...] = log softmax(logits[...] / T)[targets[...]] and H[...] = -sum_j p_j log p_j with
    p = softmax(logits[...] / T), computed with fp32 accumulation whatever the input dtype.

    Args:
        logits: [..., V] float32, bfloat16 or float16. The last dimension must be contiguous; the
            leading ones may have any strides, e.g. logits[:, :-1, :] of a [B, L + 1, V] tensor is
            used without a copy. (Leading dimensions that do not collapse to two strides, such as
            slices along two axes of a 4-D tensor, are copied once.)
        targets: integer tensor of the leading shape [...], ids in [0, V) or equal to ignore_index.
        temperature: T > 0, finite; a runtime argument (changing it never recompiles).
        ignore_index: rows whose target equals it give lp = 0, H = 0 and a zero gradient row.
        backend: "triton" (fused kernels; on a CPU tensor they run under the Triton interpreter,
            which needs TRITON_INTERPRET=1 before triton is imported), "torch" (plain PyTorch
            streaming over row chunks, bounded extra memory) or "auto" (triton on CUDA, torch elsewhere).
        inplace_backward: allow the backward to write the gradient into the logits' own storage
            (saves an [N, V] allocation; the logits' values are destroyed, so only use it when
            nothing else needs them afterwards). Ignored when rows share memory (e.g. expanded logits).

    Returns:
        (lp, H): two float32 tensors of the leading shape, both differentiable with respect to
        logits (either, both, or with any upstream gradients). targets get no gradient.

    Numerics: lanes past V and logits equal to -inf add exactly nothing (p = 0, no 0 * -inf); a
    target logit of -inf gives lp = -inf. A row whose logits are all -inf has no distribution: lp
    and H are nan, as torch.log_softmax gives. nan or +inf in a non-ignored row makes that row's
    outputs and gradient nan; other rows are unaffected. An empty batch (N = 0) returns empty outputs.

    Memory: the forward keeps the per-row log-sum-exp and entropy (8 bytes per row) for the backward;
    neither backend allocates an fp32 [N, V] tensor, and the backward allocates at most the gradient.

    Raises:
        ValueError, before any kernel runs, on an unsupported dtype, shape mismatch, a non-contiguous
        last dimension, target ids outside [0, V) other than ignore_index, a temperature that is not
        a finite number > 0, or an unknown backend.
    """
    options = _check_inputs(logits, targets, temperature, ignore_index, backend, inplace_backward)
    if row_layout(logits) is None:
        logits = logits.contiguous()
    if _resolve_backend(backend, logits) == "torch":
        return logprobs_and_entropy_torch(logits, targets, options)
    return _LogprobsEntropy.apply(logits, targets, options)


def _compile_specs() -> list[CompileSpec]:
    specs = []
    common = {
        "n_rows": "i32", "vocab": "i32", "inner_rows": "i32", "stride_outer": "i64", "stride_inner": "i64",
    }  # fmt: skip
    for dtype in ("bf16", "fp16", "fp32"):
        for vocab in (151936, 1000, 100, 3):  # one row per tile, and short rows sharing a tile
            block_n, block_v, num_warps, num_stages = _config(vocab)
            constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "NUM_STAGES": num_stages}
            specs.append(
                CompileSpec(
                    name=f"fwd_{dtype}_{block_n}x{block_v}",
                    fn=_forward_kernel,
                    signature={
                        "logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "lp_ptr": "*fp32",
                        "entropy_ptr": "*fp32", "lse_ptr": "*fp32", **common,
                        "inv_temperature": "fp32", "ignore_index": "i32",
                        **{k: "constexpr" for k in constexprs},
                    },  # fmt: skip
                    constexprs=constexprs,
                    num_warps=num_warps,
                    num_stages=num_stages,
                )
            )
            for has_lp, has_h in ((True, True), (True, False), (False, True)):
                bwd_constexprs = {"HAS_GRAD_LP": has_lp, "HAS_GRAD_ENTROPY": has_h, **constexprs}
                specs.append(
                    CompileSpec(
                        name=f"bwd_{dtype}_{block_n}x{block_v}_lp{int(has_lp)}_h{int(has_h)}",
                        fn=_backward_kernel,
                        signature={
                            "logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "targets_ptr": "*i64",
                            "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_lp_ptr": "*fp32",
                            "grad_entropy_ptr": "*fp32", **common,
                            "grad_stride_outer": "i64", "grad_stride_inner": "i64",
                            "inv_temperature": "fp32", "ignore_index": "i32",
                            **{k: "constexpr" for k in bwd_constexprs},
                        },  # fmt: skip
                        constexprs=bwd_constexprs,
                        num_warps=num_warps,
                        num_stages=num_stages,
                    )
                )
    return specs


# Production configurations for the sm_80 / sm_90 compile and spill check (tests/kernels/test_compile.py).
COMPILE_SPECS = _compile_specs()
