"""Plain-PyTorch versions of every fusedrl op.

These are the "torch" backends (used on CPU and wherever Triton is unavailable) and the baselines the
benchmarks compare against. They stream over row chunks with a bounded chunk budget, so that their
peak extra memory does not grow with the number of rows; none of them allocates an fp32 [N, V]
tensor. The tests' oracle is separate: a naive float64 computation in the tests themselves.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from fusedrl.kernels._rows import row_layout, rows_are_disjoint

# ----------------------------------------------------------------------------------------------
# logprobs_and_entropy: lp = log softmax(x / T)[y] and H = -sum p log p (ALGORITHMS.md section 1)
# ----------------------------------------------------------------------------------------------

# Byte budget of one fp32 [rows, V] working tensor. Rows are processed in chunks of
# max(1, LOGITS_CHUNK_BYTES // (4 V)) rows. A chunk's work lives in its own function call, so that
# its temporaries die before the next chunk starts: at most two fp32 chunks and a bool mask are
# alive at once. Peak extra memory is therefore about 2.25 * LOGITS_CHUNK_BYTES plus O(N) per-row
# state, whatever N is.
# 64 MiB keeps a chunk of a 151,936-word vocabulary at 110 rows: large enough that the per-chunk
# overhead (a dozen kernel launches) is negligible next to the work.
LOGITS_CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class LogprobsEntropyOptions:
    """Options of logprobs_and_entropy, validated by its entry point; shared by both backends."""

    temperature: float = 1.0
    ignore_index: int = -100
    inplace_backward: bool = False  # the backward may write the gradient into the logits' storage
    chunk_bytes: int = LOGITS_CHUNK_BYTES  # torch backend only


def _row_chunks(logits: torch.Tensor, chunk_bytes: int):
    """Yield (rows, view): consecutive flat-row slices covering logits in order, each view [r, V] or
    [o, inner, V] holding at most max(1, chunk_bytes // (4 V)) rows, without copying."""
    vocab = logits.shape[-1]
    layout = row_layout(logits)
    grid = torch.as_strided(
        logits,
        (layout.outer, layout.inner, vocab),
        (layout.stride_outer, layout.stride_inner, 1),
        logits.storage_offset(),
    )
    rows_per_chunk = max(1, chunk_bytes // (4 * vocab))
    if layout.inner <= rows_per_chunk:
        step = rows_per_chunk // layout.inner
        for o in range(0, layout.outer, step):
            view = grid[o : o + step]
            yield slice(o * layout.inner, o * layout.inner + view.shape[0] * layout.inner), view
    else:
        for o in range(layout.outer):
            for i in range(0, layout.inner, rows_per_chunk):
                view = grid[o, i : i + rows_per_chunk]
                yield slice(o * layout.inner + i, o * layout.inner + i + view.shape[0]), view


def _chunk_logp(chunk: torch.Tensor, temperature: float, row_max=None, log_sum=None):
    """fp32 log-probabilities [r, V] of one chunk as (x - max) / T - log S, and the row max and
    log S (computed when not given). Subtracting the max before dividing by T keeps log p exact
    near the max, which peaked rows need."""
    # A contiguous fp32 copy (never the input itself, which the in-place ops below would change).
    x = chunk.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(-1, chunk.shape[-1])
    if row_max is None:
        row_max = x.amax(dim=-1)  # all -inf: the row has no distribution and gives nan
    z = x.sub_(row_max[:, None]).div_(temperature)
    if log_sum is None:
        log_sum = torch.logsumexp(z, dim=-1)
    return z.sub_(log_sum[:, None]), row_max, log_sum


def _chunk_forward(chunk, safe_targets, temperature):
    logp, row_max, log_sum = _chunk_logp(chunk, temperature)
    lp = logp.gather(1, safe_targets[:, None]).squeeze(1)
    # -inf logits have p = 0: their p log p is 0, never 0 * -inf (= nan).
    neg_inf = torch.isneginf(logp)
    entropy = -logp.exp().mul_(logp).masked_fill_(neg_inf, 0.0).sum(dim=-1)
    return lp, entropy, row_max, log_sum


def _chunk_grad(chunk, safe_targets, ignored, row_max, log_sum, entropy, g_lp, g_h, temperature):
    """dx = g_lp onehot - p (g_lp + g_H (log p + H)) for one chunk, g_* already divided by T."""
    logp, _, _ = _chunk_logp(chunk, temperature, row_max, log_sum)
    neg_inf = torch.isneginf(logp)
    p = logp.exp()
    weight = logp  # reuse the buffer: two fp32 chunks at most
    if g_h is not None:
        weight.add_(entropy[:, None]).mul_(g_h[:, None])
        if g_lp is not None:
            weight.add_(g_lp[:, None])
    else:
        weight.copy_(g_lp[:, None].expand_as(weight))
    # Where log p = -inf, p = 0 and the term is 0, never 0 * -inf.
    d = weight.mul_(p).masked_fill_(neg_inf, 0.0).neg_()
    if g_lp is not None:
        d.scatter_add_(1, safe_targets[:, None], g_lp[:, None])
    # Ignored rows get an exact zero row, even where their logits hold nan or inf.
    return d.masked_fill_(ignored[:, None], 0.0)

class _TorchLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, options: LogprobsEntropyOptions):
        flat_targets = targets.reshape(-1).long()
        ignored = flat_targets == options.ignore_index
        safe_targets = flat_targets.masked_fill(ignored, 0)
        lp = torch.empty(flat_targets.numel(), dtype=torch.float32, device=logits.device)
        entropy, row_max, log_sum = torch.empty_like(lp), torch.empty_like(lp), torch.empty_like(lp)
        for rows, chunk in _row_chunks(logits, options.chunk_bytes):
            lp[rows], entropy[rows], row_max[rows], log_sum[rows] = _chunk_forward(
                chunk, safe_targets[rows], options.temperature
            )
        lp.masked_fill_(ignored, 0.0)
        entropy.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, flat_targets, row_max, log_sum, entropy)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return lp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, flat_targets, row_max, log_sum, entropy = ctx.saved_tensors
        options: LogprobsEntropyOptions = ctx.options
        if grad_lp is None and grad_entropy is None:
            return None, None, None
        ignored = flat_targets == options.ignore_index
        safe_targets = flat_targets.masked_fill(ignored, 0)
        keep = (~ignored).float().div_(options.temperature)
        g_lp = grad_lp.reshape(-1).float() * keep if grad_lp is not None else None
        g_h = grad_entropy.reshape(-1).float() * keep if grad_entropy is not None else None
        in_place = options.inplace_backward and rows_are_disjoint(logits)
        grad = logits if in_place else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = None if in_place else grad.view(-1, grad.shape[-1])
        for rows, chunk in _row_chunks(logits, options.chunk_bytes):
            d = _chunk_grad(
                chunk,
                safe_targets[rows],
                ignored[rows],
                row_max[rows],
                log_sum[rows],
                entropy[rows],
                None if g_lp is None else g_lp[rows],
                None if g_h is None else g_h[rows],
                options.temperature,
            )
            out = chunk if in_place else flat_grad[rows]
            out.copy_(d.view(out.shape))
            del d  # free this chunk's buffer before the next one is allocated
        return grad, None, None


def logprobs_and_entropy_torch(logits: torch.Tensor, targets: torch.Tensor, options: LogprobsEntropyOptions):
    """The "torch" backend of fusedrl.kernels.logprobs_and_entropy, on inputs that its entry point
    has validated and whose leading dimensions have a two-level row layout (see _rows.py).

    Streams over row chunks of options.chunk_bytes: no fp32 [N, V] tensor exists in either pass, and
    the backward allocates nothing of size [N, V] but the gradient (not even that when
    options.inplace_backward lets it overwrite the logits).
    """
    return _TorchLogprobsEntropy.apply(logits, targets, options)
