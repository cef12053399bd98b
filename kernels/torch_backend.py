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

from fusedrl.kernels._kept_set import PieceHistograms, kept_threshold, logits_threshold, target_kept
from fusedrl.kernels._rows import row_layout, rows_are_disjoint
from fusedrl.kernels._vocab_parallel import combine_lse_slices, combine_slices, owner_mask, sum_hidden_grad


# ---------------------------------------------------------------------------------------------------
# linear_logprobs_and_entropy: lp and H from hidden states and the output embedding
# ---------------------------------------------------------------------------------------------------

# Chunk budget: a step handles at most LINEAR_CHUNK_COLS vocabulary columns of at most
# LINEAR_CHUNK_ELEMENTS // LINEAR_CHUNK_COLS tokens, so each fp32 temporary of a step holds at most
# LINEAR_CHUNK_ELEMENTS values (16 MiB; a step keeps a handful alive), whatever N is. Vocabulary chunks
# of 8192 keep the token chunk at 512 rows, large enough for efficient matmuls. The token chunk does
# not depend on V, so that the ranks of a vocabulary-parallel group walk the same row blocks.
LINEAR_CHUNK_ELEMENTS = 1 << 22
LINEAR_CHUNK_COLS = 8192


def _linear_chunks(n_rows: int, vocab_size: int, batch_invariant: bool = False) -> tuple[int, int]:
    """(rows, columns) of one step. batch_invariant: one row a step, so that a row's logits come from
    the same matmul shape whatever the batch (BLAS picks its kernels and splits by shape)."""
    cols = max(1, min(vocab_size, LINEAR_CHUNK_COLS))
    rows = 1 if batch_invariant else LINEAR_CHUNK_ELEMENTS // LINEAR_CHUNK_COLS
    return max(1, min(n_rows, rows)), cols


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


@dataclasses.dataclass(frozen=True)
class _LinearOptions:
    inv_temperature: float
    ignore_index: int
    vocab_start: int = 0  # vocabulary id of weight row 0 (a vocabulary-parallel slice)
    process_group: object = None
    top_k: int | None = None  # the sampler's kept set (kernels/_kept_set.py), effective() settings
    top_p: float | None = None
    batch_invariant: bool = False  # one row per step (_linear_chunks)


def _linear_pieces(hidden, weight, bias, options: _LinearOptions):
    """pieces() of _kept_set.PieceHistograms: the same logit chunks, bitwise, as the forward and
    backward below compute (same row and column chunks, so the same matmul shapes)."""
    rows, cols = _linear_chunks(hidden.shape[0], weight.shape[0], options.batch_invariant)
    inv_temperature = options.inv_temperature

    def pieces(r0, r1):  # r0, r1: one row chunk (kept_threshold walks blocks of `rows`)
        for c0 in range(0, weight.shape[0], cols):
            c1 = min(weight.shape[0], c0 + cols)
            yield r0, r1, _linear_logit_chunk(hidden[r0:r1], weight[c0:c1], None if bias is None else bias[c0:c1],
                                              inv_temperature)

    return pieces, rows


def _linear_threshold(hidden, weight, bias, options: _LinearOptions):
    if options.top_k is None and options.top_p is None:
        return None
    pieces, rows = _linear_pieces(hidden, weight, bias, options)
    source = PieceHistograms(pieces, 1.0, hidden.device)
    return kept_threshold(source, hidden.shape[0], options.top_k, options.top_p, hidden.device,
                          options.process_group, block_rows=rows)


def _linear_forward(hidden, weight, bias, targets, tau, options: _LinearOptions):
    """lp, H and lse, [N] fp32, by an online reduction over vocabulary chunks (see the Triton kernel),
    over the kept set {z >= tau} where tau is given. With vocab_start > 0 the weight is a slice of the
    vocabulary from that id on; rows whose target lies outside it get a meaningless lp (masked later)."""
    inv_temperature, ignore_index, vocab_start = options.inv_temperature, options.ignore_index, options.vocab_start
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size, options.batch_invariant)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(lse)
    target_logit = torch.zeros_like(lse)
    local_targets = targets - vocab_start
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        y = local_targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            z = _linear_logit_chunk(hidden[r0:r1], weight[c0:c1], None if bias is None else bias[c0:c1],
                                    inv_temperature)
            if tau is not None:
                z.masked_fill_(z < tau[r0:r1, None], float("-inf"))  # outside the kept set
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


def _linear_backward(hidden, weight, bias, targets, lse, entropy, tau, grad_lp, grad_entropy, options, needs):
    """Recomputes each logit chunk and accumulates all three gradients in fp32."""
    inv_temperature, ignore_index, vocab_start = options.inv_temperature, options.ignore_index, options.vocab_start
    group = options.process_group
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size, options.batch_invariant)
    valid = targets != ignore_index
    grad_lp = torch.where(valid, grad_lp.float(), 0.0)  # ignored rows contribute nothing
    grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
    need_h, need_w, need_b = needs
    # With a process group the ranks' partial hidden gradients are summed in fp32, then rounded once.
    hidden_grad_dtype = hidden.dtype if group is None else torch.float32
    grad_hidden = torch.empty(hidden.shape, dtype=hidden_grad_dtype, device=hidden.device) if need_h else None
    local_targets = targets - vocab_start
    dw = torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=hidden.device) if need_w else None
    db = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if need_b else None
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        y, live = local_targets[r0:r1], valid[r0:r1, None]
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
            here = ((y >= c0) & (y < c1))[:, None]
            local = (y - c0).clamp(0, c1 - c0 - 1)[:, None]
            if tau is not None:
                kept = z >= tau[r0:r1, None]
                here &= kept.gather(1, local)  # a target outside the kept set: no one-hot term
                z.masked_fill_(~kept, float("-inf"))
            p = torch.exp(z - lse_c)
            ent_term = torch.where(p > 0, p * (z - lse_c + ent_c), 0.0)
            dz = -(g_lp * p + g_ent * ent_term)
            dz.scatter_add_(1, local, torch.where(here, g_lp, 0.0))
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
    if group is not None:
        grad_hidden = sum_hidden_grad(grad_hidden, hidden.dtype, group, options.batch_invariant)
    return (
        grad_hidden,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: _LinearOptions):
        tau = _linear_threshold(hidden, weight, bias, options)
        logprobs, entropy, lse = _linear_forward(hidden, weight, bias, targets, tau, options)
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
        grads = _linear_backward(hidden, weight, bias, targets, lse, entropy, tau, grad_lp, grad_entropy,
                                 ctx.options, needs)
        return (*grads, None, None)


def linear_logprobs_and_entropy_torch(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                      process_group=None, vocab_start=0, top_k=None, top_p=None,
                                      batch_invariant=False):
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
        hidden_2d, weight, bias, targets_1d,
        _LinearOptions(1.0 / float(temperature), int(ignore_index), int(vocab_start), process_group, top_k, top_p,
                       batch_invariant),
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
    process_group: object = None  # vocabulary parallelism: the ranks that hold the other slices
    vocab_start: int = 0  # global id of this rank's first column
    top_k: int | None = None  # the sampler's kept set (kernels/_kept_set.py); None where it keeps every token
    top_p: float | None = None
    batch_invariant: bool = False  # torch backend: one row per chunk (the Triton kernels are invariant anyway)

    def row_chunk_bytes(self, vocab: int) -> int:
        """The torch backend's chunk budget: one row when batch_invariant, since torch may reduce a
        long row in a way (threads, vector widths) that depends on how many rows share the call."""
        return 4 * vocab if self.batch_invariant else self.chunk_bytes


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


def _chunk_logp(chunk: torch.Tensor, temperature: float, tau, row_max=None, log_sum=None):
    """fp32 log-probabilities [r, V] of one chunk as (x - max) / T - log S, and the row max and
    log S (computed when not given). Subtracting the max before dividing by T keeps log p exact
    near the max, which peaked rows need. Logits below the kept-set threshold tau (if any) are -inf."""
    # A contiguous fp32 copy (never the input itself, which the in-place ops below would change).
    x = chunk.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(-1, chunk.shape[-1])
    if tau is not None:
        x.masked_fill_(x < tau[:, None], float("-inf"))
    if row_max is None:
        row_max = x.amax(dim=-1)  # all -inf: the row has no distribution and gives nan
    z = x.sub_(row_max[:, None]).div_(temperature)
    if log_sum is None:
        log_sum = torch.logsumexp(z, dim=-1)
    return z.sub_(log_sum[:, None]), row_max, log_sum


def _local_targets(targets, ignored, vocab_start, local_vocab):
    """Target columns on this rank's slice, clamped into it (rows whose target is elsewhere or
    ignored read some column, and are masked afterwards)."""
    return (targets - vocab_start).masked_fill(ignored, 0).clamp(0, local_vocab - 1)


def _chunk_forward(chunk, safe_targets, temperature, tau):
    """lp (of the clamped local target: the caller masks rows whose target is elsewhere), H, max, log S."""
    logp, row_max, log_sum = _chunk_logp(chunk, temperature, tau)
    lp = logp.gather(1, safe_targets[:, None]).squeeze(1)
    # -inf logits have p = 0: their p log p is 0, never 0 * -inf (= nan).
    neg_inf = torch.isneginf(logp)
    entropy = -logp.exp().mul_(logp).masked_fill_(neg_inf, 0.0).sum(dim=-1)
    return lp, entropy, row_max, log_sum


def _chunk_grad(chunk, safe_targets, ignored, row_max, log_sum, entropy, g_lp, g_h, g_onehot, temperature, tau):
    """dx = g_onehot onehot - p (g_lp + g_H (log p + H)) for one chunk, g_* already divided by T;
    g_onehot is g_lp on rows whose target is on this slice and in the kept set, else 0."""
    logp, _, _ = _chunk_logp(chunk, temperature, tau, row_max, log_sum)
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
        d.scatter_add_(1, safe_targets[:, None], g_onehot[:, None])
    # Ignored rows get an exact zero row, even where their logits hold nan or inf.
    return d.masked_fill_(ignored[:, None], 0.0)

class _TorchLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, options: LogprobsEntropyOptions):
        flat_targets = targets.reshape(-1).long()
        ignored = flat_targets == options.ignore_index
        safe_targets = _local_targets(flat_targets, ignored, options.vocab_start, logits.shape[-1])
        lp = torch.empty(flat_targets.numel(), dtype=torch.float32, device=logits.device)
        entropy, row_max, log_sum = torch.empty_like(lp), torch.empty_like(lp), torch.empty_like(lp)
        tau = logits_threshold(logits, options.top_k, options.top_p, options.temperature, options.chunk_bytes,
                               options.process_group)
        for rows, chunk in _row_chunks(logits, options.row_chunk_bytes(logits.shape[-1])):
            lp[rows], entropy[rows], row_max[rows], log_sum[rows] = _chunk_forward(
                chunk, safe_targets[rows], options.temperature, None if tau is None else tau[rows]
            )
        owner = owner_mask(flat_targets, options.vocab_start, logits.shape[-1]) & ~ignored
        lp.masked_fill_(~owner, 0.0)
        if options.process_group is not None:
            row_max, log_sum, entropy, lp = combine_slices(
                row_max, log_sum, entropy, lp, owner, 1.0 / options.temperature, options.process_group
            )
        lp.masked_fill_(ignored, 0.0)
        entropy.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, flat_targets, row_max, log_sum, entropy, tau)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return lp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, flat_targets, row_max, log_sum, entropy, tau = ctx.saved_tensors
        options: LogprobsEntropyOptions = ctx.options
        if grad_lp is None and grad_entropy is None:
            return None, None, None
        ignored = flat_targets == options.ignore_index
        safe_targets = _local_targets(flat_targets, ignored, options.vocab_start, logits.shape[-1])
        keep = (~ignored).float().div_(options.temperature)
        g_lp = grad_lp.reshape(-1).float() * keep if grad_lp is not None else None
        g_h = grad_entropy.reshape(-1).float() * keep if grad_entropy is not None else None
        # The one-hot term only where the target is on this rank's slice.
        owner = owner_mask(flat_targets, options.vocab_start, logits.shape[-1])
        if tau is not None:  # ...and only where the target is in the kept set (lp = -inf otherwise)
            owner &= target_kept(logits, safe_targets, tau)
        g_onehot = None if g_lp is None else torch.where(owner, g_lp, 0.0)
        in_place = options.inplace_backward and rows_are_disjoint(logits)
        grad = logits if in_place else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = None if in_place else grad.view(-1, grad.shape[-1])
        for rows, chunk in _row_chunks(logits, options.row_chunk_bytes(logits.shape[-1])):
            d = _chunk_grad(
                chunk,
                safe_targets[rows],
                ignored[rows],
                row_max[rows],
                log_sum[rows],
                entropy[rows],
                None if g_lp is None else g_lp[rows],
                None if g_h is None else g_h[rows],
                None if g_onehot is None else g_onehot[rows],
                options.temperature,
                None if tau is None else tau[rows],
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
