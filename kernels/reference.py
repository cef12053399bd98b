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


# ---------------------------------------------------------------------------------------------------
# linear_logprobs_and_entropy: lp and H from hidden states and the output embedding
# ---------------------------------------------------------------------------------------------------

# Chunk budget: a step handles at most LINEAR_CHUNK_COLS vocabulary columns of at most
# LINEAR_CHUNK_ELEMENTS // LINEAR_CHUNK_COLS tokens, so each fp32 temporary of a step holds at most
# LINEAR_CHUNK_ELEMENTS values (16 MiB; a step keeps a handful alive), whatever N is. Vocabulary chunks
# of 8192 keep the token chunk at 512 rows, large enough for efficient matmuls.
LINEAR_CHUNK_ELEMENTS = 1 << 22
LINEAR_CHUNK_COLS = 8192


def _linear_chunks(n_rows: int, vocab_size: int) -> tuple[int, int]:
    cols = max(1, min(vocab_size, LINEAR_CHUNK_COLS))
    return max(1, min(n_rows, LINEAR_CHUNK_ELEMENTS // cols)), cols


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with products of the given (possibly 16-bit) values summed and returned in fp32."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _linear_logit_chunk(hidden, weight, bias, inv_temperature):
    z = _mm_fp32(hidden, weight.t())
    if bias is not None:
        z += bias.float()
    return z.mul_(inv_temperature)


def _linear_forward(hidden, weight, bias, targets, inv_temperature, ignore_index):
    """lp, H and lse, [N] fp32, by an online reduction over vocabulary chunks (see the Triton kernel)."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(lse)
    target_logit = torch.zeros_like(lse)
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        y = targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            z = _linear_logit_chunk(hidden[r0:r1], weight[c0:c1], None if bias is None else bias[c0:c1],
                                    inv_temperature)
            m_new = torch.maximum(m, z.amax(1))
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf so far stay finite
            alpha = torch.exp(m - m_safe)
            shift = torch.where(m == float("-inf"), 0.0, m - m_safe)
            here = (y >= c0) & (y < c1)  # masks and gathers, no data-dependent shapes: no device sync
            local = (y - c0).clamp(0, c1 - c0 - 1)[:, None]
            target_logit[r0:r1] = torch.where(here, z.gather(1, local)[:, 0], target_logit[r0:r1])
            zc = z.sub_(m_safe[:, None])
            e = torch.exp(zc)
            t = alpha * (t + shift * s) + torch.where(e > 0, e * zc, 0.0).sum(1)  # p = 0 adds 0, not 0 * -inf
            s = alpha * s + e.sum(1)
            m = m_new
        top = torch.where(m == float("-inf"), 0.0, m)
        lse[r0:r1] = top + torch.log(s)
        entropy[r0:r1] = torch.log(s) - t / s
    valid = targets != ignore_index
    return torch.where(valid, target_logit - lse, 0.0), torch.where(valid, entropy, 0.0), lse


def _linear_backward(hidden, weight, bias, targets, lse, entropy, grad_lp, grad_entropy, ctx_options, needs):
    """Recomputes each logit chunk and accumulates all three gradients in fp32."""
    inv_temperature, ignore_index = ctx_options
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size)
    valid = targets != ignore_index
    grad_lp = torch.where(valid, grad_lp.float(), 0.0)  # ignored rows contribute nothing
    grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
    need_h, need_w, need_b = needs
    grad_hidden = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=hidden.device) if need_w else None
    db = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if need_b else None
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        y, live = targets[r0:r1], valid[r0:r1, None]
        # An ignored row's hidden state may be anything (NaN padding): zeroed, it adds exactly nothing
        # to the weight gradient, where 0 * NaN would have spread NaN over every column.
        h = torch.where(live, hidden[r0:r1], 0.0)
        g_lp, g_ent = grad_lp[r0:r1, None], grad_entropy[r0:r1, None]
        lse_c, ent_c = lse[r0:r1, None], entropy[r0:r1, None]
        dh = torch.zeros(r1 - r0, hidden_size, dtype=torch.float32, device=hidden.device) if need_h else None
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            w = weight[c0:c1]
            z = _linear_logit_chunk(h, w, None if bias is None else bias[c0:c1], inv_temperature)
            p = torch.exp(z - lse_c)
            ent_term = torch.where(p > 0, p * (z - lse_c + ent_c), 0.0)
            dz = -(g_lp * p + g_ent * ent_term)
            here = ((y >= c0) & (y < c1))[:, None]
            dz.scatter_add_(1, (y - c0).clamp(0, c1 - c0 - 1)[:, None], torch.where(here, g_lp, 0.0))
            dz = torch.where(live, dz.mul_(inv_temperature), 0.0)  # lse there is from the raw row: maybe NaN
            if need_b:
                db[c0:c1] += dz.sum(0)
            dz_low = dz.to(hidden.dtype)  # the gradient matmuls run in the input dtype, summed in fp32
            if need_h:
                dh += _mm_fp32(dz_low, w)
            if need_w:
                dw[c0:c1] += _mm_fp32(dz_low.t(), h)
        if need_h:
            grad_hidden[r0:r1] = dh
    return (
        grad_hidden,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index):
        logprobs, entropy, lse = _linear_forward(hidden, weight, bias, targets, inv_temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.chunk_options = (inv_temperature, ignore_index)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grads = _linear_backward(hidden, weight, bias, targets, lse, entropy, grad_lp, grad_entropy,
                                 ctx.chunk_options, needs)
        return (*grads, None, None, None)


def linear_logprobs_and_entropy_torch(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100):
    """The "torch" backend of fusedrl.kernels.linear_logprobs_and_entropy (which validates the inputs).

    Chunks over tokens and vocabulary (LINEAR_CHUNK_ELEMENTS / LINEAR_CHUNK_COLS) with an online
    log-sum-exp, and a custom backward that recomputes each logit chunk: the largest temporary does not
    depend on N and no tensor of N * V elements is ever allocated (beyond the budget itself). Gradient
    matmuls run in the input dtype with fp32 sums; the weight gradient accumulates in fp32.
    """
    leading = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1).to(torch.int64)
    logprobs, entropy = _LinearLogprobsEntropy.apply(
        hidden_2d, weight, bias, targets_1d, 1.0 / float(temperature), int(ignore_index)
    )
    return logprobs.view(leading), entropy.view(leading)


# ----------------------------------------------------------------------------------------------
# logprobs_and_entropy: lp = log softmax(x / T)[y] and H = -sum p log p (docs/algorithms.md section 1)
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
