"""Per-token log-prob and entropy from logits, fused: lp = log softmax(x / T)[y], H = -sum p log p.

The forward reads each logits row once, streaming over the vocabulary with an online max, sum of
exponentials and sum of p * log p in fp32 (docs/algorithms.md section 1), and keeps only per-row state
for the backward: the row max and log S (lse = max / T + log S) and H, 12 bytes a row. The
backward reads the row once more, recomputes p tile by tile and writes
d logits = (g_lp (onehot(y) - p) - g_H p (log p + H)) / T once, in the logits' dtype, optionally
into the logits' own storage.

Block sizes. The op is memory-bound: at V = 151,936 bf16 a row is 297 KiB and the arithmetic is a
few flops per byte, so the design goal is bytes in flight per SM. A program walks its row in
tiles of BLOCK_V = 8192 elements with 16 warps: each thread holds 16 consecutive elements, two
16-byte vector loads for bf16 when V and the row strides are multiples of 8 (Triton's divisibility
specialisation sees this for every padded vocabulary: 32,000, 128,256, 151,936, 152,064). The
tile loop is software-pipelined (tl.range, 3 stages): the compiler issues the next two tiles'
loads as cp.async into shared memory (2 x 16 KiB for bf16) while this tile is reduced, so a
program keeps about 48 KiB in flight without spending registers on it; an H100 needs roughly
3.35 TB/s x ~0.7 us / 132 SMs = 18 KiB per SM. At V = 151,936 bf16 the forward uses about 90 registers
per thread and the backward about 85 (compile check: no spills on sm_80/sm_90). Each element costs one
exponential: the running max is a per-tile scalar (one reduction per tile), so the per-element
rescale is a broadcast multiply, not a second exp. At 3.35 TB/s of bf16 (1.7e12 elements/s) one
ex2 per element is about 40% of an H100's SFU throughput (16 per clock per SM); two would be 80%.
Vocabularies under 2048 put several rows in a program (BLOCK_N > 1) so that small-V calls do not
launch one tiny program per row. None of this is measured yet: see docs/logprobs_and_entropy.md.

Grid: one axis, cdiv(N, BLOCK_N) programs (CUDA allows 2^31 - 1 on axis 0), program ids cast to
int64 before any offset arithmetic, so N * V above 2^31 is addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fusedrl.kernels._checks import check_float, check_same_device, check_targets, check_temperature, device_guard
from fusedrl.kernels._compile_check import CompileSpec
from fusedrl.kernels._kept_set import check_top_k, check_top_p, effective, logits_threshold
from fusedrl.kernels._rows import RowLayout, row_layout, rows_are_disjoint
from fusedrl.kernels._vocab_parallel import check_vocab_slices, combine_slices, owner_mask
from fusedrl.kernels.torch_backend import LogprobsEntropyOptions, logprobs_and_entropy_torch


@triton.jit(do_not_specialize=["n_rows", "inner_rows", "ignore_index", "vocab_start"])
def _forward_kernel(
    logits_ptr, targets_ptr, lp_ptr, entropy_ptr, max_ptr, log_sum_ptr,
    threshold_ptr,  # [N] fp32 lowest kept logit of each row (if HAS_THRESHOLD): the sampler's kept set
    n_rows, vocab, inner_rows, stride_outer, stride_inner,  # row r at (r // inner) * so + (r % inner) * si
    inv_temperature, ignore_index, vocab_start,  # vocab_start: id of column 0 (a vocabulary-parallel slice)
    HAS_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    active = in_rows & (targets != ignore_index)  # ignored rows read nothing
    # Row index -> (outer, inner) in int32 (the launcher guarantees N < 2^31; 64-bit division costs
    # ~100 registers), then 64-bit offsets.
    outer = (rows.to(tl.int32) // inner_rows).to(tl.int64)
    inner = (rows.to(tl.int32) % inner_rows).to(tl.int64)
    row_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    cols = tl.arange(0, BLOCK_V)
    tau = tl.full([BLOCK_N], float("-inf"), tl.float32)
    if HAS_THRESHOLD:
        tau = tl.load(threshold_ptr + rows, mask=in_rows, other=float("-inf"))

    # Online statistics relative to the running max m of the raw logits, with d = (x - m) / T:
    # s = sum exp(d) and t = sum exp(d) d, per lane, reduced once at the end. Subtracting before
    # scaling keeps d exact near the max (bf16/fp16 differences are exact in fp32), so a peaked
    # row's lp = d_y - log S keeps full relative precision; H = log S - t / S never cancels large
    # numbers, unlike lse - sum p z.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        mask = active[:, None] & (offs < vocab)[None, :]
        # Lanes past V load -inf: exp(-inf) = 0 adds nothing (other=0 would add exp(-m / T)).
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_THRESHOLD:
            x = tl.where(x >= tau[:, None], x, float("-inf"))  # outside the kept set: p = 0
        m_new = tl.maximum(m, tl.max(x, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        alpha = tl.exp((m - ref) * inv_temperature)[:, None]
        shift = tl.where(m == float("-inf"), 0.0, (m - ref) * inv_temperature)[:, None]  # s = 0 there
        d = (x - ref[:, None]) * inv_temperature
        e = tl.exp(d)
        e_d = tl.where(x == float("-inf"), 0.0, e * d)  # p = 0 adds 0, never 0 * -inf
        t = alpha * (t + shift * s) + e_d
        s = alpha * s + e
        m = m_new

    s_row = tl.sum(s, axis=1)
    log_s = tl.log(s_row)  # an all -inf row has no distribution: S = 0, and lp, H are nan
    entropy = log_s - tl.sum(t, axis=1) / s_row
    local = targets - vocab_start
    has_target = active & (local >= 0) & (local < vocab)  # always, without vocabulary parallelism
    x_target = tl.load(row_ptr + local, mask=has_target, other=0.0).to(tl.float32)
    if HAS_THRESHOLD:
        x_target = tl.where(x_target >= tau, x_target, float("-inf"))  # a target outside: lp = -inf
    lp = (x_target - m) * inv_temperature - log_s
    tl.store(lp_ptr + rows, tl.where(has_target, lp, 0.0), mask=in_rows)
    tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=in_rows)
    # lse = max / T + log S, kept as its two parts for the same precision in the backward.
    tl.store(max_ptr + rows, m, mask=in_rows)
    tl.store(log_sum_ptr + rows, log_s, mask=in_rows)


@triton.jit(do_not_specialize=["n_rows", "inner_rows", "ignore_index", "vocab_start"])
def _backward_kernel(
    logits_ptr, grad_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr, grad_lp_ptr, grad_entropy_ptr,
    threshold_ptr,
    n_rows, vocab, inner_rows, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    inv_temperature, ignore_index, vocab_start,
    HAS_THRESHOLD: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,  # which outputs carry a gradient
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    active = in_rows & (targets != ignore_index)
    row_max = tl.load(max_ptr + rows, mask=active, other=0.0)
    log_s = tl.load(log_sum_ptr + rows, mask=active, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
    # Per-row coefficients, already divided by T. Ignored rows load no logits (x = -inf, p = 0) and
    # zero coefficients, so their gradient row is exactly zero.
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
    local = targets - vocab_start  # matches no column when the target is on another rank's slice
    tau = tl.full([BLOCK_N], float("-inf"), tl.float32)
    if HAS_THRESHOLD:
        tau = tl.load(threshold_ptr + rows, mask=in_rows, other=float("-inf"))
    cols = tl.arange(0, BLOCK_V)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        in_vocab = (offs < vocab)[None, :]
        x = tl.load(in_ptr[:, None] + offs[None, :], mask=active[:, None] & in_vocab, other=float("-inf"))
        x = x.to(tl.float32)
        is_target = offs[None, :] == local[:, None]
        if HAS_THRESHOLD:
            kept = x >= tau[:, None]
            x = tl.where(kept, x, float("-inf"))
            is_target = is_target & kept  # a target outside the kept set has lp = -inf: no one-hot term
        logp = (x - row_max[:, None]) * inv_temperature - log_s[:, None]
        p = tl.exp(logp)
        d = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        if HAS_GRAD_LP:
            d += tl.where(is_target, g_lp[:, None], 0.0) - g_lp[:, None] * p
        if HAS_GRAD_ENTROPY:
            # log p = -inf means p = 0: the term is 0, never 0 * -inf.
            d -= g_h[:, None] * tl.where(logp == float("-inf"), 0.0, p * (logp + entropy[:, None]))
        tl.store(out_ptr[:, None] + offs[None, :], d.to(grad_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab)


# Block sizes (see the module docstring): a thread holds 16 consecutive elements of a long row's tile.
MAX_BLOCK_V = 8192
SMALL_TILE = 2048  # elements per tile when several short rows share a program...
MAX_BLOCK_N = 32  # ...but at most this many
ELEMENTS_PER_THREAD = 16
NUM_STAGES = 3


def _config(vocab: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps, num_stages) for a vocabulary size. Depends on V only, which
    is fixed per model, so a changing number of rows never recompiles."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    block_n = min(MAX_BLOCK_N, max(1, SMALL_TILE // block_v))
    if block_n == 1:
        return 1, block_v, max(1, block_v // (32 * ELEMENTS_PER_THREAD)), NUM_STAGES
    # Short rows are rarely aligned for vector loads: each element then carries its own 64-bit
    # pointer, so threads take half as many elements, and the loop (a single tile) is not pipelined.
    return block_n, block_v, max(1, block_n * block_v // (16 * ELEMENTS_PER_THREAD)), 1


def _grid(n_rows: int, block_n: int) -> tuple[int]:
    # Axis 0 only: CUDA allows 2^31 - 1 programs there (65,535 on axes 1 and 2).
    return (triton.cdiv(n_rows, block_n),)


def _forward(logits: torch.Tensor, targets: torch.Tensor, layout: RowLayout, options: LogprobsEntropyOptions, tau):
    """lp, H, row max and log S (lse = max / T + log S), each fp32 [N], of validated logits [..., V]
    and flat int64 targets [N]; over the kept set {x >= tau} where tau [N] is given."""
    n_rows, vocab = layout.n_rows, logits.shape[-1]
    lp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy, row_max, log_sum = torch.empty_like(lp), torch.empty_like(lp), torch.empty_like(lp)
    if n_rows == 0:
        return lp, entropy, row_max, log_sum
    block_n, block_v, num_warps, num_stages = _config(vocab)
    with device_guard(logits):
        _forward_kernel[_grid(n_rows, block_n)](
            logits, targets, lp, entropy, row_max, log_sum, lp if tau is None else tau,
            n_rows, vocab, layout.inner, layout.stride_outer, layout.stride_inner,
            1.0 / options.temperature, options.ignore_index, options.vocab_start,
            HAS_THRESHOLD=tau is not None, BLOCK_N=block_n, BLOCK_V=block_v, NUM_STAGES=num_stages,
            num_warps=num_warps,
        )  # fmt: skip
    return lp, entropy, row_max, log_sum


def _backward(
    logits, targets, row_max, log_sum, entropy, tau, grad_lp, grad_entropy, layout: RowLayout,
    options: LogprobsEntropyOptions,
):
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
    with device_guard(logits):
        _backward_kernel[_grid(layout.n_rows, block_n)](
            logits, grad, targets, row_max, log_sum, entropy,
            grad_lp if grad_lp is not None else entropy, grad_entropy if grad_entropy is not None else entropy,
            entropy if tau is None else tau,
            layout.n_rows, vocab, layout.inner, layout.stride_outer, layout.stride_inner, *grad_strides,
            1.0 / options.temperature, options.ignore_index, options.vocab_start,
            HAS_THRESHOLD=tau is not None,
            HAS_GRAD_LP=grad_lp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_N=block_n, BLOCK_V=block_v, NUM_STAGES=num_stages, num_warps=num_warps,
        )  # fmt: skip
    return grad


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, options: LogprobsEntropyOptions):
        layout = row_layout(logits)
        flat_targets = targets.reshape(-1).long().contiguous()  # the kernels index it densely
        tau = logits_threshold(logits, options.top_k, options.top_p, options.temperature, options.chunk_bytes,
                               options.process_group)
        lp, entropy, row_max, log_sum = _forward(logits, flat_targets, layout, options, tau)
        if options.process_group is not None:
            valid = flat_targets != options.ignore_index
            owner = owner_mask(flat_targets, options.vocab_start, logits.shape[-1]) & valid
            row_max, log_sum, entropy, lp = combine_slices(
                row_max, log_sum, entropy, lp, owner, 1.0 / options.temperature, options.process_group
            )
            lp, entropy = torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(logits, flat_targets, row_max, log_sum, entropy, tau)
        ctx.layout, ctx.options = layout, options
        ctx.set_materialize_grads(False)
        return lp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        if grad_lp is None and grad_entropy is None:
            return None, None, None
        logits, targets, row_max, log_sum, entropy, tau = ctx.saved_tensors
        grad = _backward(
            logits, targets, row_max, log_sum, entropy, tau, grad_lp, grad_entropy, ctx.layout, ctx.options
        )
        return grad, None, None


BACKENDS = ("auto", "triton", "torch")
# Whether triton.jit built interpreted kernels (TRITON_INTERPRET=1 when triton was imported): the
# only way the triton backend can run on a CPU tensor.
_INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)


def _check_inputs(
    logits, targets, temperature, ignore_index, backend, inplace_backward, process_group, vocab_start, top_k, top_p,
    batch_invariant,
) -> LogprobsEntropyOptions:
    check_float("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"logits' last dimension must be contiguous (stride 1), got strides {logits.stride()}")
    check_same_device(logits=logits, targets=targets if isinstance(targets, torch.Tensor) else None)
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__"):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    temperature = check_temperature(temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if _resolve_backend(backend, logits) == "triton":
        if logits.device.type != "cuda" and not _INTERPRETED:
            raise ValueError(
                "backend='triton' needs logits on a CUDA device, or TRITON_INTERPRET=1 set before triton "
                f"is imported to run on {logits.device.type}"
            )
        n_rows = logits[..., 0].numel()
        if n_rows >= 2**31:
            raise ValueError(f"logits must have fewer than 2^31 rows for backend='triton', got {n_rows}")
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
    if not isinstance(batch_invariant, bool):
        raise ValueError(f"batch_invariant must be a bool, got {batch_invariant!r}")
    vocab = check_vocab_slices(vocab_start, logits.shape[-1], process_group, logits.device)
    check_targets(targets, logits.shape[:-1], vocab, ignore_index)  # reads the targets: last
    top_k, top_p = effective(top_k, top_p, vocab)
    return LogprobsEntropyOptions(
        temperature=temperature,
        ignore_index=ignore_index,
        inplace_backward=inplace_backward,
        process_group=process_group,
        vocab_start=int(vocab_start),
        top_k=top_k,
        top_p=top_p,
        batch_invariant=batch_invariant,
    )


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
    process_group=None,
    vocab_start: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_invariant: bool = False,
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
        process_group: vocabulary parallelism (a torch.distributed group, or None). Each rank passes
            its slice logits[..., V_r] of the vocabulary, which starts at id `vocab_start`; the slices
            of the ranks, in rank order, must tile [0, V). targets hold global ids, the same on every
            rank. lp and H are those of the full softmax, the same on every rank (three collectives
            of [N] floats); the gradient is that of the rank's own slice, and needs the same upstream
            gradients on every rank (docs/logprobs_and_entropy.md, "Vocabulary parallelism").
        vocab_start: the global id of this rank's first column; 0 without a process_group.
        top_k, top_p: the sampler's kept set (None: every token). lp and H are those of the
            renormalised distribution on the tokens that vLLM's sampler keeps after temperature, then
            top-k (ties at the k-th logit all kept), then top-p (a value threshold: tied logits are
            kept or dropped together); exact rules in fusedrl/kernels/_kept_set.py and the docs page.
            A target outside the kept set gets lp = -inf and no one-hot gradient term. Gradients flow
            through the kept set only. top_k >= V and top_p = 1 are the plain op, bit for bit.
        batch_invariant: every row's lp, H and gradient bitwise the same whether the row is computed
            alone or in any batch, at any offset. The Triton kernels always are (their tiles and
            reduction order depend on V only); the torch backend then processes one row at a time.

    Returns:
        (lp, H): two float32 tensors of the leading shape, both differentiable with respect to
        logits (either, both, or with any upstream gradients). targets get no gradient.

    Numerics: lanes past V and logits equal to -inf add exactly nothing (p = 0, no 0 * -inf); a
    target logit of -inf gives lp = -inf. A row whose logits are all -inf has no distribution: lp
    and H are nan, as torch.log_softmax gives. nan or +inf in a non-ignored row makes that row's
    outputs and gradient nan; other rows are unaffected. An empty batch (N = 0) returns empty outputs.

    Memory: the forward keeps 12 bytes per row for the backward (the row max, log S and H, fp32);
    neither backend allocates an fp32 [N, V] tensor, and the backward allocates at most the gradient.

    Raises:
        ValueError, before any kernel runs, on an unsupported dtype, shape mismatch, a non-contiguous
        last dimension, target ids outside [0, V) other than ignore_index, a temperature that is not
        a finite number > 0, or an unknown backend.
    """
    options = _check_inputs(
        logits, targets, temperature, ignore_index, backend, inplace_backward, process_group, vocab_start, top_k, top_p,
        batch_invariant,
    )
    if row_layout(logits) is None:
        logits = logits.contiguous()
    if _resolve_backend(backend, logits) == "torch":
        return logprobs_and_entropy_torch(logits, targets, options)
    return _LogprobsEntropy.apply(logits, targets, options)


def _spec(fn, name, dtype, vocab, **flags) -> CompileSpec:
    """One kernel at vocabulary `vocab`, with the divisibility Triton's JIT sees there: every pointer
    16-byte aligned (fresh PyTorch allocations are), and the vocabulary and the row strides (multiples
    of V) divisible by 16 when V is. Aligned rows are what lets the compiler use 16-byte vector loads;
    n_rows, inner_rows and ignore_index are never specialised (do_not_specialize)."""
    block_n, block_v, num_warps, num_stages = _config(vocab)
    constexprs = {**flags, "BLOCK_N": block_n, "BLOCK_V": block_v, "NUM_STAGES": num_stages}
    pointers = {
        _forward_kernel: ("logits", "targets", "lp", "entropy", "max", "log_sum", "threshold"),
        _backward_kernel: ("logits", "grad", "targets", "max", "log_sum", "entropy", "grad_lp", "grad_entropy",
                           "threshold"),
    }[fn]
    types = {"logits": f"*{dtype}", "grad": f"*{dtype}", "targets": "*i64"}
    signature = {f"{p}_ptr": types.get(p, "*fp32") for p in pointers}
    signature |= {"n_rows": "i32", "vocab": "i32", "inner_rows": "i32", "stride_outer": "i64", "stride_inner": "i64"}
    if fn is _backward_kernel:
        signature |= {"grad_stride_outer": "i64", "grad_stride_inner": "i64"}
    signature |= {"inv_temperature": "fp32", "ignore_index": "i32", "vocab_start": "i32"}
    signature |= {k: "constexpr" for k in constexprs}
    multiples_of_v = ("vocab", "stride_outer", "stride_inner", "grad_stride_outer", "grad_stride_inner")
    aligned_rows = vocab % 16 == 0
    divisible = tuple(a for a, ty in signature.items() if ty.startswith("*") or (aligned_rows and a in multiples_of_v))
    return CompileSpec(
        name=f"{name}_{dtype}_{block_n}x{block_v}_v{vocab}",
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
        divisible_by_16=divisible,
    )


def _compile_specs() -> list[CompileSpec]:
    """Every kernel variant at the production vocabulary (V = 151,936: one row per 8192-wide tile,
    aligned) in each dtype; the same tile at an unpadded vocabulary (GPT-2's V = 50,257: rows not
    16-byte aligned, so one load per element); and the other tile shapes _config picks (a single
    2048-wide tile; several short rows per tile, aligned or not) in bf16; and the kept-set (top-k /
    top-p threshold) variants at the production vocabulary and at a short one."""
    specs = []
    plain = {"HAS_THRESHOLD": False}
    grad_flags = {"bwd": (True, True), "bwd_lp": (True, False), "bwd_h": (False, True)}
    for dtype in ("bf16", "fp16", "fp32"):
        specs.append(_spec(_forward_kernel, "fwd", dtype, 151936, **plain))
        for name, (has_lp, has_h) in grad_flags.items():
            specs.append(_spec(_backward_kernel, name, dtype, 151936, **plain, HAS_GRAD_LP=has_lp,
                               HAS_GRAD_ENTROPY=has_h))
    for vocab in (50257, 2048, 1024, 1000, 100, 3):
        specs.append(_spec(_forward_kernel, "fwd", "bf16", vocab, **plain))
        specs.append(_spec(_backward_kernel, "bwd", "bf16", vocab, **plain, HAS_GRAD_LP=True, HAS_GRAD_ENTROPY=True))
    for vocab in (151936, 1000):
        kept = {"HAS_THRESHOLD": True}
        specs.append(_spec(_forward_kernel, "fwd_kept", "bf16", vocab, **kept))
        specs.append(_spec(_backward_kernel, "bwd_kept", "bf16", vocab, **kept, HAS_GRAD_LP=True, HAS_GRAD_ENTROPY=True))
    return specs


# Production configurations for the sm_80 / sm_90 compile and spill check (tests/kernels/test_compile.py).
COMPILE_SPECS = _compile_specs()
